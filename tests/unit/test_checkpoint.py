"""Checkpoint cards carry the input contract; loading refuses a checkpoint made for other input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import encoder.data
from encoder.checkpoint import (
    LEGACY_PREPROCESS_VERSION,
    CheckpointError,
    IncompatibleCheckpoint,
    card_path,
    load_model,
    read_card,
    save_checkpoint,
)
from encoder.models import create_model
from encoder.train import FinetuneConfig, PretrainConfig, finetune, pretrain
from galsift.bands import ACCEPTED_BAND_SETS, NATIVE_CHANNELS

SHIPPED = Path(__file__).resolve().parents[2] / "encoder" / "checkpoints" / "lvm_tiny.safetensors"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, create_model("lvm_tiny", img_size=64), card={"note": "test"})
    return path


def _edit_card(path: Path, **fields: object) -> None:
    doc = json.loads(card_path(path).read_text())
    for key, value in fields.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    card_path(path).write_text(json.dumps(doc))


def test_card_records_the_input_contract(tiny: Path) -> None:
    card = read_card(tiny)
    assert card["preprocess_version"] == encoder.data.PREPROCESS_VERSION
    assert card["input_channels"] == list(NATIVE_CHANNELS) == ["z", "r", "g"]
    assert card["band_sets"] == [s.label for s in ACCEPTED_BAND_SETS]
    assert {"g,r,z", "g,r,i", "R,G,B"} <= set(card["band_sets"])
    load_model(tiny)


def test_other_preprocess_version_is_refused(tiny: Path) -> None:
    _edit_card(tiny, preprocess_version="0-other")
    with pytest.raises(IncompatibleCheckpoint) as err:
        load_model(tiny)
    message = str(err.value)
    # both versions are named, and the error is a CheckpointError callers already handle
    assert "'0-other'" in message and repr(encoder.data.PREPROCESS_VERSION) in message
    assert err.value.field == "preprocess_version" and err.value.found == "0-other"
    assert err.value.expected == encoder.data.PREPROCESS_VERSION
    assert isinstance(err.value, CheckpointError)


def test_other_input_channels_are_refused(tiny: Path) -> None:
    _edit_card(tiny, input_channels=["i", "r", "g"])
    with pytest.raises(IncompatibleCheckpoint, match="input_channels"):
        load_model(tiny)
    # the names are compared case-insensitively
    _edit_card(tiny, input_channels=["Z", "R", "G"])
    load_model(tiny)


def test_cards_without_the_fields_get_the_legacy_contract(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _edit_card(tiny, preprocess_version=None, input_channels=None, band_sets=None)
    load_model(tiny)
    # the shipped checkpoint predates input_channels and stays loadable
    shipped = read_card(SHIPPED)
    assert "input_channels" not in shipped and shipped["preprocess_version"] == LEGACY_PREPROCESS_VERSION
    load_model(SHIPPED)
    # once the preprocessing changes, both are refused
    monkeypatch.setattr(encoder.data, "PREPROCESS_VERSION", "99")
    for path in (tiny, SHIPPED):
        with pytest.raises(IncompatibleCheckpoint, match=r"'1'.*'99'"):
            load_model(path)


def test_training_refuses_an_incompatible_start(tiny: Path, tmp_path: Path) -> None:
    _edit_card(tiny, preprocess_version="0-other")
    # refused before the (absent) data is read
    cfg = FinetuneConfig(init=tiny, data=tmp_path / "absent", labels=("lens",), device="cpu", progress=False)
    with pytest.raises(IncompatibleCheckpoint):
        finetune(cfg)
    resume = PretrainConfig(out=tmp_path / "r.safetensors", resume=tiny, sim_fraction=1.0, device="cpu")
    with pytest.raises(IncompatibleCheckpoint):
        pretrain(resume)
