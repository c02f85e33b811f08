"""The embedding service: ``tiles.accepted`` -> LVM -> pgvector -> ``tiles.embedded``.

Each worker is a member of the ``encoder`` consumer group, so adding workers (on more GPUs)
spreads the topic's partitions across them. A consumed batch is read from the object store,
embedded in micro-batches on the device, written to the ``embeddings`` table in one upsert keyed
by (tile, model version), announced on ``tiles.embedded`` and only then committed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from sqlalchemy import Engine

from db import repo
from db.models import EmbeddingCreate, IngestErrorCreate, ModelVersionPublic
from encoder.serving import (  # noqa: F401 - re-exported: callers import them from here
    SHIPPED_CHECKPOINT,
    checkpoint_path,
    model_version_for,
    promoted_version,
    resolve_checkpoint,
)
from galsift.settings import Settings
from galsift.stage import Envelope, Output, Rejected, Stage

log = logging.getLogger(__name__)

#: the checkpoint the demo and the evaluations use when none is configured


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Embedder:
    """A loaded LVM on its device, turning model inputs into 256-d unit vectors.

    Parameters
    ----------
    checkpoint
        Path of a ``.safetensors`` checkpoint with its JSON card.
    device
        Torch device name or ``auto``.
    batch
        Images per forward pass.
    """

    def __init__(self, checkpoint: Path, *, device: str = "auto", batch: int = 32) -> None:
        from encoder.checkpoint import load_model

        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.model, self.card = load_model(checkpoint, device=str(self.device))
        self.model.eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch = batch
        self.img_size = int(self.model.img_size)

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed float32 model inputs of shape (N, 3, S, S) -> (N, 256) float32, L2-normalised."""
        out = []
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch])).to(self.device)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                z = self.model.embed(x)
            out.append(z.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_tile(uri: str, checksum: str | None, size: int, bands: Sequence[str] | None = None) -> np.ndarray:
    """Read one stored tile as model input; unreadable or corrupt pixels are :class:`Rejected`.

    ``bands`` (the tile's band names) picks, orders and stretches the planes by band
    (:mod:`galsift.bands`); None assumes g,r,z flux or R,G,B colour.
    """
    from encoder.data import UnknownBandError, read_stored_tile

    try:
        return read_stored_tile(uri, checksum=checksum, bands=bands, size=size)
    except UnknownBandError as exc:
        # a tile stored before ingest enforced the band contract
        raise Rejected("bands", f"{uri}: {exc}") from exc
    except FileNotFoundError as exc:
        raise Rejected("pixels", f"stored pixels missing: {uri}") from exc
    except (OSError, ValueError) as exc:
        raise Rejected("pixels", f"stored pixels unreadable: {uri}: {exc}") from exc


class EncodeStage(Stage[np.ndarray]):
    """Consumer-group member embedding accepted tiles with one model version at a time.

    Parameters
    ----------
    settings, engine
        Configuration and the galsift database.
    embedder
        The model it starts with.
    follow_promotions
        Switch to a newer promoted LVM (``promotions`` row of role ``lvm``, written by the
        continual-pretraining job) between batches, looking every ``settings.promotion_check_s``.
        ``galsift encode`` sets it when no model is pinned (``--model``, ``GALSIFT_MODEL_CHECKPOINT``).
    """

    name: ClassVar[str] = "encoder"
    input_schema: ClassVar[str] = "accepted"
    output_schema: ClassVar[str | None] = "embedded"

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        embedder: Embedder,
        *,
        follow_promotions: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(settings, repo.DbRecorder(engine), **kw)
        self.engine = engine
        self.embedder = embedder
        self.version: ModelVersionPublic = repo.register_model_version(
            engine, model_version_for(embedder.checkpoint, embedder.card)
        )
        self.follow_promotions = follow_promotions
        self._next_promotion_check = 0.0

    def follow_promotion(self) -> bool:
        """Serve the newest promoted LVM if it is not the one served; whether the model changed.

        A promoted checkpoint that cannot be loaded is logged and the current model kept (the
        next look tries again), so a bad promotion never stops the embedding of new tiles.
        """
        now = time.monotonic()
        if not self.follow_promotions or now < self._next_promotion_check:
            return False
        self._next_promotion_check = now + self.settings.promotion_check_s
        promoted = promoted_version(self.engine)
        if promoted is None or promoted.name == self.version.name:
            return False
        try:
            embedder = Embedder(
                checkpoint_path(promoted), device=self.settings.device, batch=self.embedder.batch
            )
        except Exception as exc:
            log.error(
                "encoder: promoted %s not loaded, keeping %s: %s", promoted.name, self.version.name, exc
            )
            return False
        log.info("encoder: serving the promoted %s (was %s)", promoted.name, self.version.name)
        self.embedder, self.version = embedder, promoted
        return True

    @property
    def input_topic(self) -> str:
        """Tiles that ingest stored."""
        return self.settings.topics.accepted

    @property
    def output_topic(self) -> str:
        """Tiles whose vectors are in pgvector."""
        return self.settings.topics.embedded

    def prepare(self, item: Envelope) -> np.ndarray:
        """Read the tile's pixels from the object store as model input."""
        value = item.value
        return load_tile(value["pixels_uri"], value["checksum"], self.embedder.img_size, bands=value["bands"])

    def write(self, prepared: Sequence[tuple[Envelope, np.ndarray]]) -> list[Output]:
        """Embed the batch, upsert the vectors, and return the ``tiles.embedded`` messages."""
        images = [x for _, x in prepared]
        if self.follow_promotion() and images[0].shape[-1] != self.embedder.img_size:
            images = [self.prepare(env) for env, _ in prepared]  # the new model's input size
        vectors = self.embedder.embed(np.stack(images))
        if not np.isfinite(vectors).all():
            # a non-finite vector would poison the HNSW index; the base class isolates the culprit
            raise Rejected("nonfinite", "the model produced a non-finite embedding")
        rows = [
            EmbeddingCreate(
                tile_id=env.value["tile_id"], model_version=self.version.name, embedding=vec.tolist()
            )
            for (env, _), vec in zip(prepared, vectors, strict=True)
        ]
        repo.upsert_embeddings(self.engine, rows)
        return [
            Output(
                key=env.key,
                value={
                    "tile_id": env.value["tile_id"],
                    "model_version": self.version.name,
                    "dim": vectors.shape[1],
                },
            )
            for env, _ in prepared
        ]


def backfill(
    engine: Engine, embedder: Embedder, *, chunk: int = 256, progress: bool = True
) -> dict[str, int]:
    """(Re-)embed every stored tile that lacks a vector from this model version.

    Returns
    -------
    dict
        ``{"embedded": n, "failed": m}``; failures are logged and recorded in ``ingest_errors``.
    """
    from tqdm import tqdm

    version = repo.register_model_version(engine, model_version_for(embedder.checkpoint, embedder.card))
    total = repo.count_missing_embeddings(engine, version.name)
    done = failed = 0
    bar = tqdm(total=total, desc=f"backfill {version.name}", unit="tile", disable=not progress)
    for rows in repo.iter_missing_embeddings(engine, version.name, chunk=chunk):
        ok_ids, images, errors = [], [], []
        for tid, uri, checksum, bands in rows:
            try:
                images.append(load_tile(uri, checksum, embedder.img_size, bands=bands))
                ok_ids.append(tid)
            except Rejected as exc:
                # one error row per tile: the tile id stands in for the Kafka position
                errors.append(
                    IngestErrorCreate(
                        stage="encoder.backfill",
                        reason=exc.reason,
                        detail=exc.detail,
                        topic=f"backfill/{tid}",
                        partition=0,
                        offset=0,
                        key=tid.encode(),
                        payload=b"",
                    )
                )
        if images:
            vectors = embedder.embed(np.stack(images))
            repo.upsert_embeddings(
                engine,
                [
                    EmbeddingCreate(tile_id=uuid.UUID(tid), model_version=version.name, embedding=v.tolist())
                    for tid, v in zip(ok_ids, vectors, strict=True)
                ],
            )
        if errors:
            repo.record_errors(engine, errors)
        done += len(ok_ids)
        failed += len(errors)
        bar.update(len(rows))
    bar.close()
    return {"embedded": done, "failed": failed}


def run(
    settings: Settings,
    *,
    model: str | None = None,
    group: str | None = None,
    do_backfill: bool = False,
    max_batches: int | None = None,
    idle_exit_s: float | None = None,
) -> int:
    """Entry point of ``galsift encode``: the streaming service, or a backfill with ``do_backfill``."""
    from db.engine import get_engine

    engine = get_engine(settings)
    checkpoint = resolve_checkpoint(engine, model, settings)
    embedder = Embedder(checkpoint, device=settings.device, batch=settings.encode_batch)
    log.info("encoder: %s (%s) on %s", checkpoint.name, embedder.card.get("version"), embedder.device)
    if do_backfill:
        result = backfill(engine, embedder)
        print(f"backfill: {result['embedded']} embedded, {result['failed']} failed (see ingest_errors)")
        return 1 if result["failed"] else 0
    pinned = model is not None or settings.model_checkpoint is not None
    EncodeStage(settings, engine, embedder, group_id=group, follow_promotions=not pinned).run(
        max_batches=max_batches, idle_exit_s=idle_exit_s
    )
    return 0
