"""The detector service: ``tiles.embedded`` → detectors → ``detections``, ``alerts.lens``, ``tiles.detected``.

Each worker is a member of the ``detector`` consumer group. Per consumed batch it reads the tiles
and their embeddings from the database and runs:
- the morphology heads on the embeddings;
- the Mask R-CNN lens finder on the stored pixels (its lens masks go to the object store);
- the real-label lens head (:mod:`detectors.lens_head`) on the finder's score and the embedding,
  for the tiles of the renderings it was trained on (its score is then their lens score).

It upserts every score keyed by (tile, detector model version, detector, label) and creates alerts
(and their webhook deliveries in the outbox) for lens scores at or above ``alert_threshold`` —
idempotently, so a replayed batch creates none twice. It publishes the batch's alerts on
``alerts.lens`` and one ``tiles.detected`` message per scored tile (the alert filters' input,
``galsift filters``), and only then commits. Webhooks are sent by the notifier (``galsift
notify``), never by this loop, so a failing webhook cannot slow the detectors down.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import astropy.units as u
import numpy as np
from sqlalchemy import Engine

from db.alerts import create_alerts
from db.detections import TileToScore, tiles_to_score, upsert_detections
from db.models import DetectionCreate
from db.repo import DbRecorder
from detectors.alerts import KnownLenses, ScoredTile, alert_messages, build_alerts
from detectors.lens_head import VARIANT as HEAD_VARIANT
from detectors.lens_head import rendering_of, views_of
from galsift.objectstore import ObjectStore
from galsift.settings import Settings
from galsift.stage import Envelope, Output, Rejected, Stage

if TYPE_CHECKING:
    from detectors.lens_head import LensHead
    from detectors.lensfinder import LensFinder
    from detectors.morphology import MorphologyHeads
    from encoder.models import LVM

log = logging.getLogger(__name__)

#: the ``detector`` column of the lens finder's rows
LENS_DETECTOR = "lens_finder"
#: the ``detector`` column of the lens head's rows; where a tile has one, it is the tile's lens
#: score (alerts, ``galsift_api.tile_scores``, the dashboard)
HEAD_DETECTOR = HEAD_VARIANT


@dataclass(frozen=True)
class Scored:
    """One tile's scores before they are written."""

    tile: TileToScore
    detections: list[DetectionCreate]
    lens_score: float | None
    #: the model version and detector that gave ``lens_score`` (the head's, where it applies)
    lens_model: str | None = None
    lens_detector: str | None = None


class DetectStage(Stage[tuple[str, str]]):
    """Consumer-group member scoring embedded tiles and raising lens-candidate alerts.

    Parameters
    ----------
    settings
        Process settings (topics, threshold, cross-match radius, webhooks).
    engine
        SQLAlchemy engine of the galsift database.
    lens
        The lens finder, or None to run the morphology heads only.
    morphology
        The morphology heads, or None to run the lens finder only.
    known
        Known-lens catalogue for the cross-match (``detectors.alerts.KnownLenses``).
    head
        The real-label lens head, or None; it scores (and gives the lens score of) the tiles it
        applies to (:meth:`detectors.lens_head.LensHead.applies_to`), the finder the others.
    head_encoder
        The encoder of the head's version (:func:`load_head_encoder`): it embeds the centres of
        the tiles for a head that reads them (:attr:`detectors.lens_head.LensHead.reads_views`).
    store
        Object store for lens masks; by default ``ObjectStore(settings.pixel_store_url)``.
    """

    name: ClassVar[str] = "detector"
    input_schema: ClassVar[str] = "embedded"
    output_schema: ClassVar[str | None] = "alert"

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        lens: LensFinder | None,
        morphology: MorphologyHeads | None,
        known: KnownLenses,
        head: LensHead | None = None,
        head_encoder: LVM | None = None,
        store: ObjectStore | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(settings, DbRecorder(engine), **kw)
        if lens is None and morphology is None:
            raise ValueError("the detector service needs the lens finder, the morphology heads or both")
        self.engine = engine
        self.lens = lens
        self.morphology = morphology
        self.known = known
        if head is not None and (lens is None or head.detector_version != lens.version):
            raise ValueError(
                "the lens head reads the lens finder's score: it needs the finder it was fitted on"
            )
        if head is not None and head.reads_views and head_encoder is None:
            raise ValueError(f"lens head {head.version} reads the tiles' centres: it needs its encoder")
        self.head = head
        self.head_encoder = head_encoder
        #: encoder versions whose composites the head had to leave to the finder (warned once each)
        self.head_passed_over: set[str] = set()
        self.store = store or ObjectStore(settings.pixel_store_url)

    @property
    def input_topic(self) -> str:
        """Tiles whose vectors are in pgvector."""
        return self.settings.topics.embedded

    @property
    def output_topic(self) -> str:
        """Lens-candidate alerts."""
        return self.settings.topics.alerts

    def prepare(self, item: Envelope) -> tuple[str, str]:
        """The (tile id, encoder model version) to score."""
        value = item.value
        try:
            tile_id = str(uuid.UUID(str(value["tile_id"])))
        except ValueError as exc:
            raise Rejected("identity", f"tile_id {value.get('tile_id')!r} is not a UUID") from exc
        return tile_id, str(value["model_version"])

    def write(self, prepared: Sequence[tuple[Envelope, tuple[str, str]]]) -> list[Output]:
        """Score the batch, upsert detections, create alerts, return the alert messages."""
        keys = list(dict.fromkeys(key for _, key in prepared))
        tiles = tiles_to_score(self.engine, keys)
        missing = len(keys) - len({(t.tile_id, t.encoder_version) for t in tiles})
        if missing:
            # the encoder commits only after the vector is stored: a missing row means the tile
            # or its embedding was deleted since; there is nothing to score and nothing to retry
            log.warning("%s: %d embedded tiles no longer in the database, skipped", self.name, missing)
        scored = self.score(tiles)
        upsert_detections(self.engine, [d for s in scored for d in s.detections])
        # the detections are durable: announce each scored tile on tiles.detected (the alert
        # filters' input). Like the alerts, a replayed batch announces its tiles again; the
        # filters store one match per (filter, tile), so a repeat publishes nothing twice
        detected = self.detected_messages(scored)
        if self.lens is None:
            return detected
        candidates = build_alerts(
            [
                ScoredTile(
                    tile_id=s.tile.tile_id,
                    survey=s.tile.survey,
                    external_id=s.tile.external_id,
                    ra=s.tile.ra,
                    dec=s.tile.dec,
                    score=s.lens_score,
                    model_version=s.lens_model or self.lens.version,
                    detector=s.lens_detector or LENS_DETECTOR,
                    pixels_uri=s.tile.pixels_uri,
                )
                for s in scored
                if s.lens_score is not None
            ],
            threshold=self.settings.alert_threshold,
            known=self.known,
            radius=self.settings.crossmatch_radius_arcsec * u.arcsec,
        )
        if not candidates:
            return detected
        stored = create_alerts(self.engine, [c.create() for c in candidates], self.settings.alert_webhooks)
        # every alert of the batch is published, new or replayed: the topic is at-least-once with
        # a stable alert id, while webhooks go through the outbox, which a replay never refills
        alerts = [Output(key=key, value=value) for key, value in alert_messages(candidates, stored.all)]
        return alerts + detected

    def detected_messages(self, scored: Sequence[Scored]) -> list[Output]:
        """One ``tiles.detected`` message per tile that got at least one detection row."""
        now = datetime.now(UTC)
        return [
            Output(
                key=s.tile.tile_id.encode(),
                value={
                    "tile_id": s.tile.tile_id,
                    "model_versions": sorted({d.model_version for d in s.detections}),
                    "detected_at": now,
                },
                topic=self.settings.topics.detected,
                schema="detected",
            )
            for s in scored
            if s.detections
        ]

    def score(self, tiles: Sequence[TileToScore]) -> list[Scored]:
        """Run the detectors on one batch of tiles (no database writes)."""
        if not tiles:
            return []
        rows: dict[str, list[DetectionCreate]] = {t.tile_id: [] for t in tiles}
        # tile -> (lens score, its model version, its detector)
        lens_scores: dict[str, tuple[float, str, str]] = {}
        if self.morphology is not None:
            usable = [t for t in tiles if t.encoder_version == self.morphology.encoder_version]
            if usable:
                probs = self.morphology.predict(np.stack([t.embedding for t in usable]))
                for head in probs:
                    for t, value in zip(usable, head.probability, strict=True):
                        rows[t.tile_id].append(
                            DetectionCreate(
                                tile_id=uuid.UUID(t.tile_id),
                                model_version=self.morphology.version,
                                detector=head.detector,
                                label=head.label,
                                score=float(value),
                            )
                        )
        if self.lens is not None:
            images, ok = self._images(tiles, self.lens.image_size)
            results = self.lens.detect(images) if len(images) else []
            for t, result in zip(ok, results, strict=True):
                extra: dict[str, Any] = {"boxes": np.asarray(result.boxes).round(2).tolist()}
                masks = np.asarray(result.masks)
                if masks.size:
                    uri, checksum = self.store.put_array(
                        f"masks/{t.survey}/{t.tile_id}/{self.lens.version}.npy", masks.astype(np.uint8)
                    )
                    extra |= {"masks_uri": uri, "masks_checksum": checksum}
                lens_scores[t.tile_id] = (float(result.score), self.lens.version, LENS_DETECTOR)
                rows[t.tile_id].append(
                    DetectionCreate(
                        tile_id=uuid.UUID(t.tile_id),
                        model_version=self.lens.version,
                        detector=LENS_DETECTOR,
                        label="lens",
                        score=float(result.score),
                        extra=extra,
                    )
                )
            lens_scores |= self._head_scores(ok, lens_scores, rows)
        return [Scored(t, rows[t.tile_id], *lens_scores.get(t.tile_id, (None, None, None))) for t in tiles]

    def _head_scores(
        self,
        tiles: Sequence[TileToScore],
        finder: dict[str, tuple[float, str, str]],
        rows: dict[str, list[DetectionCreate]],
    ) -> dict[str, tuple[float, str, str]]:
        """The lens head's scores of the tiles it applies to; their rows are added to ``rows``."""
        if self.head is None:
            return {}
        head = self.head
        usable = [
            t
            for t in tiles
            if t.tile_id in finder and head.applies_to(encoder_version=t.encoder_version, dtype=t.dtype)
        ]
        for t in tiles:
            # a rendering it knows, embedded by another encoder (a promoted LVM): say so once, since
            # these tiles' lens scores fall back to the finder's until a head is fitted on it
            if (
                t.encoder_version != head.encoder_version
                and rendering_of(t.dtype) in head.renderings
                and t.encoder_version not in self.head_passed_over
            ):
                self.head_passed_over.add(t.encoder_version)
                log.warning(
                    "lens head %s was fitted on encoder %s: %s tiles embedded by %s keep the finder's "
                    "lens score until `galsift train lens-head` fits a head on that encoder",
                    head.version,
                    head.encoder_version,
                    rendering_of(t.dtype),
                    t.encoder_version,
                )
        if not usable:
            return {}
        found = np.asarray([finder[t.tile_id][0] for t in usable])
        views = None
        if head.reads_views and self.head_encoder is not None:
            # the centre view and the colour rings come from the tile at twice the encoder's side
            detail, _ = self._images(usable, 2 * int(self.head_encoder.img_size))
            views = views_of(detail, self.head_encoder.embed_array)
        probability = head.predict(np.stack([t.embedding for t in usable]), found, views)
        out: dict[str, tuple[float, str, str]] = {}
        for t, p, f in zip(usable, probability, found, strict=True):
            out[t.tile_id] = (float(p), head.version, HEAD_DETECTOR)
            rows[t.tile_id].append(
                DetectionCreate(
                    tile_id=uuid.UUID(t.tile_id),
                    model_version=head.version,
                    detector=HEAD_DETECTOR,
                    label="lens",
                    score=float(p),
                    extra={"finder_score": float(f), "finder_version": head.detector_version},
                )
            )
        return out

    def _images(self, tiles: Sequence[TileToScore], size: int) -> tuple[np.ndarray, list[TileToScore]]:
        """Model inputs of the tiles, read from the object store with their bands.

        Raises
        ------
        Rejected
            When a tile's pixels are missing or corrupt; the base class then writes the batch
            item by item, so only that tile goes to ``tiles.dead``.
        """
        from encoder.data import read_stored_tile

        images = []
        for t in tiles:
            try:
                images.append(read_stored_tile(t.pixels_uri, checksum=t.checksum, bands=t.bands, size=size))
            except FileNotFoundError as exc:
                raise Rejected("pixels", f"stored pixels missing: {t.pixels_uri}") from exc
            except (ValueError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise  # the store's fault (a disk error): the batch is replayed later
                raise Rejected("pixels", f"stored pixels unreadable: {t.pixels_uri}: {exc}") from exc
        return (np.stack(images) if images else np.zeros((0, 3, size, size), np.float32)), list(tiles)


def register_versions(
    engine: Engine,
    *,
    lens: LensFinder | None = None,
    lens_path: Path | None = None,
    morphology: MorphologyHeads | None = None,
    morphology_path: Path | None = None,
    head: LensHead | None = None,
    head_path: Path | None = None,
) -> None:
    """Register the detectors' model versions (every stored score names one), idempotently."""
    from db.models import ModelVersionCreate
    from db.repo import register_model_version
    from detectors.lens_head import DEFAULT_LENS_HEAD
    from detectors.lensfinder import DEFAULT_LENS_CHECKPOINT
    from detectors.morphology import SHIPPED_HEADS
    from encoder.checkpoint import file_sha256

    if lens is not None:
        path = Path(lens_path or DEFAULT_LENS_CHECKPOINT)
        register_model_version(
            engine,
            ModelVersionCreate(
                name=lens.version,
                variant=f"lens_maskrcnn_{lens.backbone}",
                checkpoint_uri=path.resolve().as_uri(),
                checksum=file_sha256(path),
                card=lens.card,
            ),
        )
    if morphology is not None:
        morphology.register(engine, Path(morphology_path or SHIPPED_HEADS))
    if head is not None:
        path = Path(head_path or DEFAULT_LENS_HEAD)
        card = {k: v for k, v in head.card.items() if k != "data"}  # the file lists stay in the card file
        register_model_version(
            engine,
            ModelVersionCreate(
                name=head.version,
                variant=HEAD_VARIANT,
                checkpoint_uri=path.resolve().as_uri(),
                checksum=file_sha256(path),
                card=card,
            ),
        )


def load_head(settings: Settings, lens: LensFinder) -> tuple[LensHead | None, Path | None]:
    """The lens head the service applies, or None (switched off, or made for another finder).

    A head made for another lens finder is left out with a warning, not an error: the finder
    alone still scores every tile.
    """
    from detectors.lens_head import DEFAULT_LENS_HEAD, LensHead, LensHeadError

    if not settings.lens_head:
        return None, None
    path = Path(settings.lens_head_checkpoint or DEFAULT_LENS_HEAD)
    try:
        head = LensHead.load(path, detector_version=lens.version)
    except LensHeadError as exc:
        log.warning("detector: lens head not used: %s", exc)
        return None, None
    return head, path


def load_head_encoder(engine: Engine, head: LensHead, *, device: str = "cpu") -> LVM:
    """The encoder a head's views are embedded with: the checkpoint of its encoder version.

    The version's registered checkpoint (``model_versions``), else the shipped encoder's.

    Raises
    ------
    detectors.lens_head.LensHeadError
        If neither checkpoint is of the head's encoder version, or it cannot be loaded.
    """
    from db.repo import get_model_version
    from detectors.lens_head import LensHeadError
    from detectors.lensfinder import DEFAULT_ENCODER_CHECKPOINT
    from encoder.checkpoint import CheckpointError, load_model
    from encoder.serving import checkpoint_path

    registered = get_model_version(engine, head.encoder_version)
    path = checkpoint_path(registered) if registered is not None else DEFAULT_ENCODER_CHECKPOINT
    try:
        model, card = load_model(path, device=device)
    except (CheckpointError, OSError) as exc:
        raise LensHeadError(f"the encoder of lens head {head.version}: {exc}") from exc
    if card.get("version") != head.encoder_version:
        raise LensHeadError(
            f"lens head {head.version} reads encoder {head.encoder_version}; {path} is {card.get('version')}"
        )
    return model.eval()


def run(
    settings: Settings,
    *,
    group: str | None = None,
    max_batches: int | None = None,
    idle_exit_s: float | None = None,
    lens_checkpoint: Path | None = None,
    morphology_path: Path | None = None,
) -> int:
    """Entry point of ``galsift detect``."""
    import torch

    from db.engine import get_engine
    from detectors.lens_head import LensHeadError
    from detectors.lensfinder import LensFinder
    from detectors.morphology import MorphologyHeads
    from detectors.retrain import promoted_heads_path

    engine = get_engine(settings)
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lens_path = lens_checkpoint or settings.lens_checkpoint
    lens = LensFinder.load(lens_path, device=device) if lens_path else LensFinder.load(device=device)
    # the heads the retraining job promoted serve; the shipped ones until there are any
    morphology_path = morphology_path or promoted_heads_path(engine)
    morphology = MorphologyHeads.load(morphology_path, engine=engine)
    head, head_path = load_head(settings, lens)
    head_encoder = None
    if head is not None and head.reads_views:
        try:
            head_encoder = load_head_encoder(engine, head, device=device)
        except LensHeadError as exc:
            log.warning("detector: lens head not used: %s", exc)
            head = None
    register_versions(
        engine,
        lens=lens,
        lens_path=lens_path,
        morphology=morphology,
        morphology_path=morphology_path,
        head=head,
        head_path=head_path,
    )
    stage = DetectStage(
        settings,
        engine,
        lens=lens,
        morphology=morphology,
        known=KnownLenses.from_lenscat(),
        head=head,
        head_encoder=head_encoder,
        group_id=group,
    )
    log.info(
        "detector: lens finder %s, lens head %s, morphology %s",
        lens.version,
        f"{head.version} (on {', '.join(sorted(head.renderings))} tiles of {head.encoder_version})"
        if head
        else "off",
        morphology.version,
    )
    stage.run(max_batches=max_batches, idle_exit_s=idle_exit_s)
    return 0
