"""The GPU-node job: a pack made on the data host trains where GalSim is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder import gpu_job, sim, train


def test_pack_holds_the_model_input_and_the_simulated_pools(
    small_lenses: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pack = tmp_path / "pack"
    summary = gpu_job.pack([small_lenses], pack, size=32, sims=4, seed=3)
    assert summary["real"] == {small_lenses.name: 24}
    # the packed images are the model input, up to 8-bit rounding
    direct = train.load_unlabelled([small_lenses], size=32, val_fraction=0.0).train
    packed = train.load_unlabelled([pack / "real" / small_lenses.name], size=32, val_fraction=0.0).train
    assert packed.shape == direct.shape
    assert np.abs(packed - direct).max() <= 0.5 / 255 + 1e-6

    # a node without GalSim: the pools must come from the pack, never from the simulator
    def no_galsim(*args: object, **kwargs: object) -> sim.SimBatch:
        raise ImportError("No module named 'galsim'")

    monkeypatch.setattr(sim, "simulate_batch", no_galsim)
    cfg = train.PretrainConfig(out=tmp_path / "m.safetensors", sim_pool=4, sim_cache=pack / "sims", seed=3)
    pool, val = train.simulated_pools(cfg, size=32)
    assert len(pool.images) == 4 and len(val.images) == cfg.val_sims
    # another seed is another pool: it is not taken from the pack
    with pytest.raises(ImportError, match="galsim"):
        train.simulated_pools(train.PretrainConfig(out=cfg.out, sim_pool=4, sim_cache=pack / "sims"), size=32)


def test_flux_images_are_refused_by_the_pack(repo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="8 bits"):
        gpu_job.pack([repo_data / "legacy_dr9_fits"], tmp_path / "pack", size=32, sims=0, seed=0)
