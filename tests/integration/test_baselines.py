"""encoder.baselines: the ResNet18 baseline really trains (a short CPU training run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder import baselines
from encoder.data import read_folder

pytestmark = pytest.mark.integration


def test_resnet18_baseline_learns_and_is_deterministic(small_lenses: Path) -> None:
    data = read_folder(small_lenses, label="lens", size=64)
    assert data.labels is not None
    images = baselines.resize_images(data.images[:8], 16)
    config = baselines.ResNetConfig(size=16, steps=15, batch_size=8)
    model, losses = baselines.train_resnet18(images, data.labels[:8], config=config, seed=5)
    assert len(losses) == 15
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    short = baselines.ResNetConfig(size=16, steps=4, batch_size=8)
    _, again = baselines.train_resnet18(images, data.labels[:8], config=short, seed=5)
    assert again == losses[:4]
    scores = baselines.resnet_scores(model, images)
    assert scores.shape == (8,) and np.isfinite(scores).all()
