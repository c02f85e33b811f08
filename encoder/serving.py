"""Which LVM checkpoint serves, and how a checkpoint is named in the model registry.

One rule for every caller (the embedding service, continual pretraining, HITL seeds embedded on
the fly, the benchmarks), so vectors made anywhere land in the same model version's space:

- ``--model`` names a checkpoint file or a registered model version;
- without it: ``settings.model_checkpoint`` when set (an operator's pin), else the newest ``lvm``
  row of ``promotions`` (the continual-pretraining job's), else the shipped checkpoint.

This is library code (no Kafka, no service loop), so the HITL engine and the dashboard may import
it (see the import-linter contracts in ``pyproject.toml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy import Engine, text

from db import repo
from db.models import ModelVersionCreate, ModelVersionPublic
from galsift.settings import Settings

#: the checkpoint made by ``galsift train pretrain`` that ships in the repository
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "lvm_tiny.safetensors"


def model_version_for(checkpoint: Path, card: dict[str, Any] | None = None) -> ModelVersionCreate:
    """The registry entry of a checkpoint: named by variant and weights checksum unless the card names it."""
    from encoder.checkpoint import file_sha256, read_card

    card = read_card(checkpoint) if card is None else card
    checksum = file_sha256(checkpoint)
    return ModelVersionCreate(
        name=str(card.get("version") or f"{card['variant']}-{checksum[:10]}"),
        variant=str(card["variant"]),
        checkpoint_uri=Path(checkpoint).resolve().as_uri(),
        checksum=checksum,
        card=card,
    )


def promoted_version(engine: Engine) -> ModelVersionPublic | None:
    """The model version of the newest ``promotions`` row of role ``lvm``, or None.

    The continual-pretraining job (:mod:`encoder.continual`) writes these rows.
    """
    with engine.connect() as conn:
        name = conn.execute(
            text("SELECT model_version FROM promotions WHERE role = 'lvm' ORDER BY id DESC LIMIT 1")
        ).scalar()
    return None if name is None else repo.get_model_version(engine, str(name))


def checkpoint_path(version: ModelVersionPublic) -> Path:
    """The local path of a registered model version's checkpoint (``file://`` URI)."""
    return Path(unquote(urlparse(version.checkpoint_uri).path))


def resolve_checkpoint(engine: Engine | None, model: str | None, settings: Settings | None) -> Path:
    """A checkpoint path from ``--model``: a file, a registered version name, or the serving default.

    Raises
    ------
    FileNotFoundError
        If nothing matches, or the file is missing.
    """
    pinned = settings.model_checkpoint if settings is not None else None
    if model is None:
        promoted = promoted_version(engine) if pinned is None and engine is not None else None
        path = checkpoint_path(promoted) if promoted is not None else Path(pinned or SHIPPED_CHECKPOINT)
    elif Path(model).exists():
        path = Path(model)
    else:
        version = repo.get_model_version(engine, model) if engine is not None else None
        if version is None:
            raise FileNotFoundError(f"{model!r} is neither a checkpoint file nor a registered model version")
        path = checkpoint_path(version)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} not found; train one with `galsift train pretrain` (see README)"
        )
    return path
