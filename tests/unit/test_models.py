"""The LVM registry and model API, for every registered variant, on CPU."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from encoder.models import (
    N_INPUT_STATS,
    InputSizeError,
    LVMConfig,
    UnknownModelError,
    create_model,
    describe,
    input_statistics,
    list_models,
)
from galsift.constants import EMBEDDING_DIM

# forward passes of the 100M lvm_paper are too slow for the unit suite: counted only
FORWARD_VARIANTS = [n for n in list_models() if n != "lvm_paper"]


def test_registry_lists_the_variants() -> None:
    assert {"lvm_paper", "lvm_small", "lvm_mini", "lvm_tiny"} <= set(list_models())
    with pytest.raises(UnknownModelError):
        create_model("lvm_huge")


def test_lvm_paper_parameter_count() -> None:
    model = create_model("lvm_paper")
    total, encoder = model.num_parameters(), model.encoder_parameters()
    print(describe(model))
    assert 95e6 <= total <= 105e6, total
    # the paper quotes about 77M for the encoder
    assert 73e6 <= encoder <= 81e6, encoder
    cfg = model.config
    assert (cfg.img_size, cfg.patch_size, cfg.window_size, cfg.embed_dim) == (128, 4, 8, 96)
    assert cfg.depths == (8, 8, 8, 8) and cfg.num_heads == (8, 8, 8, 8)


@pytest.mark.parametrize("name", FORWARD_VARIANTS)
def test_api_shapes_and_finite(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    s = model.img_size
    x = torch.rand(2, 3, s, s) * 0.5
    dims = model.config.dims
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in maps] == [
            (2, dims[i], s // 4 // 2**i, s // 4 // 2**i) for i in range(4)
        ]
        feats = model.forward_features(x)
        assert torch.equal(feats, maps[-1])
        z = model.embed(x)
        assert z.shape == (2, EMBEDDING_DIM)
        assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
        rec = model(x)
        assert rec.shape == x.shape
        pooled = model.pooled(x)
        assert pooled.shape == (2, sum(dims))
        backbone = model.backbone()
        out = backbone(x)
        assert isinstance(out, OrderedDict)
        assert list(out)[:4] == ["0", "1", "2", "3"]
        assert all(v.shape[1] == backbone.out_channels for v in out.values())
    for t in [*maps, z, rec, pooled, *out.values()]:
        assert torch.isfinite(t).all()


def test_mask_token_changes_the_output() -> None:
    torch.manual_seed(0)
    model = create_model("lvm_tiny", img_size=64).eval()
    x = torch.rand(1, 3, 64, 64)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(model(x, mask), plain)
        mask[:, :8] = True
        assert not torch.allclose(model(x, mask), plain)


def test_embedding_keeps_flux_and_colour() -> None:
    """Two images differing only in brightness or colour get different embeddings."""
    torch.manual_seed(0)
    model = create_model("lvm_tiny").eval()
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    blob = torch.exp(-((xx - 47.5) ** 2 + (yy - 47.5) ** 2) / 50)
    red = torch.stack([blob, 0.6 * blob, 0.4 * blob])[None]
    blue = torch.stack([0.4 * blob, 0.6 * blob, blob])[None]
    with torch.no_grad():
        z = model.embed(torch.cat([red, 0.3 * red, blue]))
    assert float(z[0] @ z[1]) < 0.999
    assert float(z[0] @ z[2]) < 0.999
    stats = input_statistics(torch.cat([red, blue]))
    assert stats.shape == (2, N_INPUT_STATS)
    # band differences (colours) flip sign between the red and the blue copy
    assert float(stats[0, 15]) > 0 > float(stats[1, 15])


def test_statistics_are_invariant_to_right_angle_turns() -> None:
    x = torch.rand(3, 3, 64, 64)
    turned = torch.rot90(x, 1, dims=(2, 3)).flip(3)
    assert torch.allclose(input_statistics(x), input_statistics(turned), atol=1e-5)


def test_wrong_input_size_is_refused() -> None:
    model = create_model("lvm_tiny")
    with pytest.raises(InputSizeError):
        model.embed(torch.rand(1, 3, 64, 64))


def test_config_round_trip_and_validation() -> None:
    model = create_model("lvm_tiny", img_size=64)
    cfg = LVMConfig.from_dict(model.config.to_dict())
    assert cfg == model.config
    with pytest.raises(ValueError, match="divisible"):
        create_model("lvm_tiny", img_size=100)
    with pytest.raises(ValueError, match="unknown"):
        LVMConfig.from_dict({"img_sise": 64})


@pytest.mark.parametrize("name", FORWARD_VARIANTS)
def test_variants_take_the_contract_channels(name: str) -> None:
    """The band contract (galsift.bands) feeds every variant exactly its input channels."""
    from galsift.bands import MODEL_CHANNELS, NATIVE_CHANNELS

    assert create_model(name).config.in_chans == MODEL_CHANNELS == len(NATIVE_CHANNELS)


def test_shipped_model_sees_gri_and_grz_differently() -> None:
    """The same flux named g,r,i or g,r,z reaches the shipped model as different input."""
    from pathlib import Path

    import numpy as np

    from encoder.checkpoint import load_model
    from encoder.data import to_model_input

    shipped = Path(__file__).resolve().parents[2] / "encoder" / "checkpoints" / "lvm_tiny.safetensors"
    model, _card = load_model(shipped)
    yy, xx = np.mgrid[:96, :96]
    blob = np.exp(-((xx - 47.5) ** 2 + (yy - 47.5) ** 2) / 60.0)
    flux = np.stack([0.3 * blob, 0.6 * blob, 1.2 * blob]).astype(np.float32)
    x = np.stack(
        [to_model_input(flux, bands=b, size=model.img_size) for b in (("g", "r", "z"), ("g", "r", "i"))]
    )
    with torch.no_grad():
        z = model.embed(torch.from_numpy(x))
    assert torch.isfinite(z).all() and float(z[0] @ z[1]) < 1 - 1e-6
