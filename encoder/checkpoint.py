"""Checkpoints: weights in safetensors, a JSON card beside them, training state apart.

A checkpoint ``NAME.safetensors`` is three files:

* ``NAME.safetensors`` — the model's ``state_dict`` only (parameters optionally in float16;
  loading casts back to float32);
* ``NAME.json`` — the card: format, variant, config, step, metrics, data, git commit, version,
  and the input contract (``preprocess_version``, ``input_channels``, ``band_sets``);
* ``NAME.train.safetensors`` (optional) — what resuming needs beyond the weights: optimizer
  state tensors and auxiliary training modules (projection heads, task heads), with the
  optimizer's hyper-parameters as JSON metadata.

Loading never happens inside a model constructor: :func:`load_model` builds the architecture
named by the card through the registry, then loads the weights and refuses missing, unexpected
or mis-shaped keys (torchvision's explicit-weights habit). It also refuses a checkpoint whose
card names another preprocessing version or other input channels than this code produces
(:class:`IncompatibleCheckpoint`): such weights would load fine and embed garbage. Cards written
before these fields existed are read with the values of that time (preprocessing ``"1"``,
channels z, r, g), so the shipped ``lvm_tiny`` stays loadable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from encoder import data as _data
from galsift.bands import ACCEPTED_BAND_SETS, NATIVE_CHANNELS, normalise_band

if TYPE_CHECKING:
    from encoder.models import LVM

#: written into every card; bump when the layout changes
CHECKPOINT_FORMAT = "galsift-lvm-checkpoint/1"


#: preprocessing version of cards written before the field was recorded: "1" was the only one then
LEGACY_PREPROCESS_VERSION = "1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed or does not match its architecture."""


class IncompatibleCheckpoint(CheckpointError):  # noqa: N818 - named for what it is, like its parent
    """A well-formed checkpoint made for other model input than this code produces.

    Attributes
    ----------
    field
        The card field that differs (``preprocess_version`` or ``input_channels``).
    found
        The checkpoint's value.
    expected
        This code's value.
    """

    def __init__(self, path: Path, field: str, found: Any, expected: Any) -> None:
        super().__init__(
            f"{card_path(path)}: {field} is {found!r} in the checkpoint but {expected!r} in this code; "
            "its weights expect other model input. Retrain (galsift train pretrain) or use a "
            "galsift version whose preprocessing matches."
        )
        self.field = field
        self.found = found
        self.expected = expected


def card_path(path: Path) -> Path:
    """The JSON card next to a weights file."""
    return Path(path).with_suffix(".json")


def train_state_path(path: Path) -> Path:
    """The training-state file next to a weights file."""
    p = Path(path)
    return p.with_name(p.stem + ".train.safetensors")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(repo: Path | None = None) -> str | None:
    """The commit of the source tree (with ``+dirty`` when it has changes), or None."""
    where = repo or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def input_contract() -> dict[str, Any]:
    """The card fields that describe the model input this code produces.

    Returns
    -------
    dict
        ``preprocess_version`` (:data:`encoder.data.PREPROCESS_VERSION`), ``input_channels``
        (band of model channel 0, 1, 2, red first: :data:`galsift.bands.NATIVE_CHANNELS`) and
        ``band_sets`` (the accepted band sets of :mod:`galsift.bands`, for readers of the card).
    """
    return {
        "preprocess_version": _data.PREPROCESS_VERSION,
        "input_channels": list(NATIVE_CHANNELS),
        "band_sets": [s.label for s in ACCEPTED_BAND_SETS],
    }


def check_compatible(card: Mapping[str, Any], path: Path) -> None:
    """Refuse a card whose input contract differs from this code's.

    A missing field means a card written before it existed: ``preprocess_version`` is then
    :data:`LEGACY_PREPROCESS_VERSION` and ``input_channels`` the native z, r, g.

    Parameters
    ----------
    card
        The checkpoint's card, as :func:`read_card` returned it.
    path
        The weights file (for the message).

    Raises
    ------
    IncompatibleCheckpoint
        If the preprocessing version or the input channels differ.
    """
    found = str(card.get("preprocess_version", LEGACY_PREPROCESS_VERSION))
    if found != _data.PREPROCESS_VERSION:
        raise IncompatibleCheckpoint(path, "preprocess_version", found, _data.PREPROCESS_VERSION)
    channels = [normalise_band(c) for c in card.get("input_channels", NATIVE_CHANNELS)]
    if channels != list(NATIVE_CHANNELS):
        raise IncompatibleCheckpoint(path, "input_channels", channels, list(NATIVE_CHANNELS))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    card: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra_modules: Mapping[str, nn.Module] | None = None,
    half: bool = False,
) -> dict[str, Any]:
    """Write weights, card and (when given) training state.

    Parameters
    ----------
    path
        Weights file, ``*.safetensors``; the card and training state go beside it.
    model
        An :class:`encoder.models.LVM` (needs ``variant`` and ``config``).
    card
        Card fields to record (data, metrics, training arguments, ...); format, variant,
        config, step, dtype, git commit, sha256 and version are filled in, and the input
        contract (:func:`input_contract`) unless the card states it.
    optimizer
        Saved to the training-state file for resuming.
    step
        Optimisation steps done.
    extra_modules
        Named auxiliary modules (heads) saved to the training-state file.
    half
        Store parameters as float16 (half the size; for shipping, not for resuming).

    Returns
    -------
    dict
        The card as written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    params = {name for name, _ in model.named_parameters()}
    weights = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu", copy=True).contiguous()
        if half and name in params and t.is_floating_point():
            t = t.half()
        weights[name] = t
    variant = str(getattr(model, "variant", "custom"))
    config_obj: Any = getattr(model, "config", None)
    config = config_obj.to_dict() if config_obj is not None else {}
    _atomic_save(weights, path, {"format": CHECKPOINT_FORMAT, "variant": variant})
    digest = file_sha256(path)
    full: dict[str, Any] = {
        **input_contract(),
        **dict(card),
        "format": CHECKPOINT_FORMAT,
        "variant": variant,
        "config": config,
        "step": int(step),
        "dtype": "float16" if half else "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": digest,
        "version": f"{variant}-{digest[:10]}",
        "git_commit": card.get("git_commit") or git_commit(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    _atomic_json(full, card_path(path))
    state_file = train_state_path(path)
    if optimizer is not None or extra_modules:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {"step": str(int(step))}
        for mname, module in (extra_modules or {}).items():
            for k, v in module.state_dict().items():
                tensors[f"module.{mname}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
        if optimizer is not None:
            sd = optimizer.state_dict()
            for idx, st in sd["state"].items():
                for k, v in st.items():
                    if not isinstance(v, torch.Tensor):
                        raise CheckpointError(f"optimizer state {k!r} is not a tensor")
                    tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
            meta["param_groups"] = json.dumps(sd["param_groups"])
        _atomic_save(tensors, state_file, meta)
    elif state_file.exists():
        # a stale training state must not be mistaken for this checkpoint's
        state_file.unlink()
    return full


def read_card(path: Path) -> dict[str, Any]:
    """The JSON card of a checkpoint."""
    cp = card_path(path)
    if not cp.is_file():
        raise CheckpointError(f"no card {cp} next to {path}")
    card: dict[str, Any] = json.loads(cp.read_text(encoding="utf-8"))
    if card.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{cp}: format {card.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return card


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a weights file into ``model``, refusing missing, unexpected or mis-shaped keys."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch for {wrong[:5]}")
    cast = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True)


def load_model(path: Path, *, device: str | torch.device = "cpu") -> tuple[LVM, dict[str, Any]]:
    """Build the architecture named by a checkpoint's card and load its weights.

    Parameters
    ----------
    path
        Weights file (``*.safetensors``) with its ``.json`` card.
    device
        Where to put the model.

    Returns
    -------
    tuple
        ``(model, card)``: an :class:`encoder.models.LVM` in eval mode, float32, and the card.

    Raises
    ------
    IncompatibleCheckpoint
        If the card names another preprocessing version or other input channels
        (see :func:`check_compatible`).
    CheckpointError
        If the card or weights are missing or do not match the architecture.
    """
    from encoder.models import create_model

    card = read_card(path)
    check_compatible(card, path)
    try:
        model = create_model(card["variant"], **card.get("config", {}))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{card_path(path)}: cannot build the architecture: {exc}") from exc
    load_weights(model, path)
    return model.to(device).eval(), card


def load_train_state(
    path: Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> int:
    """Restore optimizer state and auxiliary modules saved by :func:`save_checkpoint`.

    Returns
    -------
    int
        The step recorded with the training state.
    """
    from safetensors import safe_open

    state_file = train_state_path(path)
    if not state_file.is_file():
        raise CheckpointError(f"no training state {state_file} (was the checkpoint saved for shipping?)")
    with safe_open(str(state_file), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    for mname, module in (modules or {}).items():
        prefix = f"module.{mname}."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    if optimizer is not None:
        if "param_groups" not in meta:
            raise CheckpointError(f"{state_file} holds no optimizer state")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta.get("step", 0))
