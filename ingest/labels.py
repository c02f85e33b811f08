"""Catalogue labels into the database: ``galsift labels import DIR --label-set NAME --column COL``.

Every trainer reads its labels from the ``labels`` table (catalogue labels, and later the labels
scientists save), never from a CSV file. An import

1. reads one column of a ``labels.csv`` folder and turns it into integers by one rule (below);
2. declares the label set in ``label_sets`` (kind, class list, rule), or checks it against the
   stored declaration: a re-import with another rule is refused, new classes are appended;
3. finds the tiles the rows name by their deterministic id
   (:func:`galsift.messages.tile_id` of the survey and external id the publisher uses), publishes
   the ones not stored yet to ``tiles.raw`` and waits, bounded and with a progress bar, until the
   ingest service has stored them (or rejected them: ``ingest_errors``);
4. upserts one label per (tile, label set, author), so a re-import adds no duplicates.

How a column becomes integers (``labels.value``):

* ``--threshold T``: a numeric column (vote fractions) is binarised, ``value >= T`` -> 1, else 0;
  with ``--invert`` the other way round (``value < T`` -> 1), for "no" fractions such as Galaxy
  Zoo's ``disk-edge-on_no_fraction``. Kind ``binary``; the rule ``{"threshold": T, "invert": …}``
  is kept with the set.
* integers 0/1: kind ``binary`` as they are; other integers: kind ``integer`` (a catalogue's own
  codes) as they are.
* text (class names such as ``spiral``): kind ``classes``; the value is the index of the class in
  the set's class list (``label_sets.classes``), which is sorted on first import (or given with
  ``--classes``) and only ever grows at the end, so an index never changes meaning.
* non-integer numbers without ``--threshold`` are refused; empty cells are skipped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from db import labels as dblabels
from db.models import LabelCreate, LabelSetCreate, LabelSetPublic
from galsift import messages
from galsift.settings import Settings
from ingest.readers import ReaderError, Source, iter_sources

log = logging.getLogger(__name__)

#: seconds to wait for the ingest service to store published tiles, by default
DEFAULT_WAIT_S = 300.0
#: label rows per upsert statement
UPSERT_CHUNK = 5000


class LabelImportError(ValueError):
    """A folder, column or rule that cannot be imported (nothing was written)."""


@dataclass(frozen=True)
class LabelRule:
    """How one ``labels.csv`` column becomes integer labels (see the module docstring).

    Attributes
    ----------
    column
        The label column.
    threshold
        Binarise a numeric column at this value; None: take the values as they are.
    invert
        With ``threshold``: ``value < threshold`` -> 1 instead of ``>=``.
    classes
        Class order for a text column (every value must be one of them); None: sorted.
    """

    column: str
    threshold: float | None = None
    invert: bool = False
    classes: tuple[str, ...] | None = None

    def stored(self) -> dict[str, Any]:
        """The part of the rule a label set keeps: re-imports must use the same one."""
        if self.threshold is None:
            return {}
        return {"threshold": float(self.threshold), "invert": bool(self.invert)}


@dataclass(frozen=True)
class LabelledSource:
    """One ``labels.csv`` row with a label: the file to publish, its identity and its value."""

    source: Source
    external_id: str
    raw: str
    #: 0/1 or an integer code; for a ``classes`` column the class name is in ``raw``
    value: int | None

    @property
    def tile_id(self) -> str:
        """The deterministic id of the tile this row names."""
        return messages.tile_id(self.source.survey, self.external_id)

    @property
    def key(self) -> bytes:
        """The Kafka key ``survey/external_id`` the publisher sends it with."""
        return f"{self.source.survey}/{self.external_id}".encode()


@dataclass(frozen=True)
class ParsedColumn:
    """A column read and converted, before anything is written."""

    kind: str
    classes: list[str]
    rule: LabelRule
    rows: list[LabelledSource]
    skipped_empty: int


@dataclass
class ImportReport:
    """What one import did."""

    label_set: str
    kind: str = ""
    classes: list[str] = field(default_factory=list)
    rows: int = 0
    skipped_empty: int = 0
    already_stored: int = 0
    published: int = 0
    publish_failed: int = 0
    stored_after_wait: int = 0
    rejected: int = 0
    timed_out: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    #: ``{value: rows}`` of the labels written by this import
    value_counts: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: files that could not be labelled, with why (the first 20)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labelled(self) -> int:
        """Rows whose label is in the database now."""
        return self.inserted + self.updated + self.unchanged

    @property
    def complete(self) -> bool:
        """Whether every labelled row of the folder got its label."""
        return self.labelled == self.rows


def _external_id(source: Source) -> str:
    # the same identity Source.read() gives the tile (ingest.readers), without opening the file
    from ingest.readers import _external_id as reader_external_id

    return reader_external_id(source.path, source.row)


def parse_column(folder: Path, rule: LabelRule, *, survey: str | None = None) -> ParsedColumn:
    """Read ``rule.column`` of a ``labels.csv`` folder and convert it (see the module docstring).

    Parameters
    ----------
    folder
        A dataset folder with ``labels.csv``.
    rule
        Column and conversion.
    survey
        Survey name the tiles are published under (default: the folder's name, as ``galsift
        publish`` does).

    Raises
    ------
    LabelImportError
        If there is no ``labels.csv`` or no such column, no labelled row, two rows name one tile
        with different labels, or the values do not fit the rule.
    """
    folder = Path(folder)
    if not (folder / "labels.csv").is_file():
        raise LabelImportError(f"{folder}: no labels.csv (labels are imported from dataset folders)")
    try:
        sources = list(iter_sources([folder], survey=survey))
    except (ReaderError, ValueError) as exc:
        raise LabelImportError(str(exc)) from exc
    if sources and rule.column not in (sources[0].row or {}):
        columns = sorted(sources[0].row or {})
        raise LabelImportError(f"{folder / 'labels.csv'}: no column {rule.column!r} (columns: {columns})")
    cells = [(s, (s.row or {}).get(rule.column, "").strip()) for s in sources]
    kept = [(s, v) for s, v in cells if v != ""]
    if not kept:
        raise LabelImportError(f"{folder}: column {rule.column!r} has no value in any row")
    texts = [v for _, v in kept]
    kind, values, classes = _convert(texts, rule)
    rows: dict[str, LabelledSource] = {}
    for (source, raw), value in zip(kept, values, strict=True):
        row = LabelledSource(source=source, external_id=_external_id(source), raw=raw, value=value)
        other = rows.get(row.tile_id)
        if other is not None and (other.value != row.value or (other.raw != row.raw and value is None)):
            raise LabelImportError(
                f"{source.path.name} and {other.source.path.name} name the same tile "
                f"{source.survey}/{row.external_id} with different labels ({other.raw!r}, {raw!r})"
            )
        rows.setdefault(row.tile_id, row)
    return ParsedColumn(
        kind=kind, classes=classes, rule=rule, rows=list(rows.values()), skipped_empty=len(cells) - len(kept)
    )


def _convert(texts: Sequence[str], rule: LabelRule) -> tuple[str, list[int | None], list[str]]:
    """``(kind, values, classes)``; values are None for a ``classes`` column (indexed later)."""
    numbers: list[float] | None
    try:
        numbers = [float(t) for t in texts]
    except ValueError:
        numbers = None
    if rule.threshold is not None:
        if numbers is None:
            bad = next(t for t in texts if not _is_number(t))
            raise LabelImportError(f"--threshold needs a numeric column; {rule.column!r} has {bad!r}")
        t = float(rule.threshold)
        return "binary", [int((x < t) if rule.invert else (x >= t)) for x in numbers], []
    if rule.invert:
        raise LabelImportError("--invert needs --threshold")
    if numbers is not None:
        if any(x != round(x) for x in numbers):
            example = next(t for t, x in zip(texts, numbers, strict=True) if x != round(x))
            raise LabelImportError(
                f"column {rule.column!r} has fractional values (e.g. {example}); pass --threshold T "
                "to binarise them (value >= T -> 1)"
            )
        ints = [round(x) for x in numbers]
        kind = "binary" if set(ints) <= {0, 1} else "integer"
        if rule.classes is not None:
            raise LabelImportError(f"--classes is for text columns; {rule.column!r} is numeric")
        return kind, list(ints), []
    found = sorted(set(texts))
    if rule.classes is not None:
        unknown = [c for c in found if c not in rule.classes]
        if unknown:
            raise LabelImportError(
                f"values {unknown} of {rule.column!r} are not in --classes {list(rule.classes)}"
            )
        return "classes", [None] * len(texts), list(rule.classes)
    return "classes", [None] * len(texts), found


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def declare(engine: Engine, label_set: str, parsed: ParsedColumn, *, folder: Path) -> LabelSetPublic:
    """Declare (or check and extend) the label set in ``label_sets``.

    Raises
    ------
    LabelImportError
        If the set exists with another kind, rule or class order.
    """
    spec = LabelSetCreate(
        name=label_set,
        kind=parsed.kind,
        classes=parsed.classes,
        rule=parsed.rule.stored(),
        description=f"imported from {Path(folder).resolve().name}/labels.csv column {parsed.rule.column}",
    )
    try:
        return dblabels.ensure_label_set(engine, spec, ordered=parsed.rule.classes is not None)
    except dblabels.LabelSetConflictError as exc:
        raise LabelImportError(str(exc)) from exc


def import_labels(
    settings: Settings,
    engine: Engine,
    folder: Path,
    *,
    label_set: str,
    rule: LabelRule,
    author: str | None = None,
    survey: str | None = None,
    publish: bool = True,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = 1.0,
    progress: bool = True,
    publish_fn: Callable[[Settings, Sequence[Source]], Any] | None = None,
) -> ImportReport:
    """Import one column of a ``labels.csv`` folder as label set ``label_set``.

    Parameters
    ----------
    settings
        Process settings (Kafka, topics, object store).
    engine
        Engine of the galsift database.
    folder
        The dataset folder.
    label_set
        Name of the label set (``labels.label_set``), e.g. ``gz_decals_morphology``.
    rule
        Column and conversion (see the module docstring).
    author
        ``labels.author`` of the rows; default ``catalogue:<label_set>``.
    survey
        Survey name of the tiles (default: the folder's name, as ``galsift publish`` uses).
    publish
        Publish the tiles not stored yet and wait for the ingest service; False: label only the
        tiles already stored.
    wait_s
        At most this many seconds to wait for published tiles to be stored.
    poll_s
        Seconds between looks at the ``tiles`` table while waiting.
    progress
        Show progress bars (stderr).
    publish_fn
        Publishes sources and returns a report with ``published``, ``failed`` and ``errors``
        (default :func:`ingest.publish.publish_sources`); tests may replace it.

    Returns
    -------
    ImportReport
        Counts of every step; ``complete`` is False when some labelled rows could not be stored.

    Raises
    ------
    LabelImportError
        If the folder, column or rule is unusable, or the label set exists with another meaning.
    """
    t0 = time.perf_counter()
    parsed = parse_column(folder, rule, survey=survey)
    declared = declare(engine, label_set, parsed, folder=folder)
    report = ImportReport(
        label_set=label_set,
        kind=declared.kind,
        classes=list(declared.classes),
        rows=len(parsed.rows),
        skipped_empty=parsed.skipped_empty,
    )
    index = {c: i for i, c in enumerate(declared.classes)}
    by_id = {r.tile_id: r for r in parsed.rows}
    stored = dblabels.existing_tile_ids(engine, list(by_id))
    report.already_stored = len(stored)
    missing = [r for tid, r in by_id.items() if tid not in stored]
    if missing and publish:
        stored |= _publish_and_wait(
            settings,
            engine,
            missing,
            report=report,
            wait_s=wait_s,
            poll_s=poll_s,
            progress=progress,
            publish_fn=publish_fn,
        )
    elif missing:
        report.timed_out = len(missing)
        for r in missing[:20]:
            report.problems.append((str(r.source.path), "not stored and --no-publish"))
    who = author if author is not None else f"catalogue:{label_set}"
    rows = [
        LabelCreate(
            tile_id=uuid.UUID(tid),
            label_set=label_set,
            value=index[r.raw] if r.value is None else r.value,
            author=who,
        )
        for tid, r in by_id.items()
        if tid in stored
    ]
    for row in rows:
        report.value_counts[row.value] = report.value_counts.get(row.value, 0) + 1
    report.value_counts = dict(sorted(report.value_counts.items()))
    for start in range(0, len(rows), UPSERT_CHUNK):
        counts = dblabels.upsert_labels(engine, rows[start : start + UPSERT_CHUNK])
        report.inserted += counts.inserted
        report.updated += counts.updated
        report.unchanged += counts.unchanged
    report.seconds = time.perf_counter() - t0
    log.info(
        "labels %s: %d rows, %d inserted, %d updated, %d unchanged",
        label_set,
        report.rows,
        report.inserted,
        report.updated,
        report.unchanged,
    )
    return report


def _publish_and_wait(
    settings: Settings,
    engine: Engine,
    missing: Sequence[LabelledSource],
    *,
    report: ImportReport,
    wait_s: float,
    poll_s: float,
    progress: bool,
    publish_fn: Callable[[Settings, Sequence[Source]], Any] | None,
) -> set[str]:
    """Publish the missing tiles, wait until ingest stored or rejected each; returns the stored ids."""
    from tqdm import tqdm

    if publish_fn is None:
        from ingest.publish import publish_sources

        publish_fn = publish_sources
    result = publish_fn(settings, [r.source for r in missing])
    report.published = int(result.published)
    report.publish_failed = int(result.failed)
    failed_paths = {str(p) for p, _ in result.errors}
    report.problems.extend((p, f"not published: {why}") for p, why in result.errors[:20])
    pending = {r.tile_id: r for r in missing if str(r.source.path) not in failed_paths}
    if report.publish_failed and len(failed_paths) < report.publish_failed:
        # the publisher lists only its first failures: find the rest by what never arrives
        log.warning("%d files failed to publish; only %d named", report.publish_failed, len(failed_paths))
    stored: set[str] = set()
    deadline = time.monotonic() + wait_s
    bar = tqdm(total=len(pending), desc="waiting for ingest", unit="tile", disable=not progress)
    try:
        while pending:
            arrived = dblabels.existing_tile_ids(engine, list(pending))
            for tid in arrived:
                pending.pop(tid)
            stored |= arrived
            rejected = dblabels.rejected_keys(engine, [r.key for r in pending.values()])
            for tid in [t for t, r in pending.items() if r.key in rejected]:
                row = pending.pop(tid)
                report.rejected += 1
                if len(report.problems) < 20:
                    report.problems.append((str(row.source.path), "rejected by ingest (see ingest_errors)"))
            bar.update(bar.total - len(pending) - bar.n)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    finally:
        bar.close()
    report.stored_after_wait = len(stored)
    report.timed_out = len(pending)
    for row in list(pending.values())[: max(0, 20 - len(report.problems))]:
        report.problems.append(
            (str(row.source.path), f"not stored within {wait_s:g} s (is `galsift ingest` running?)")
        )
    return stored


def format_report(report: ImportReport) -> str:
    """The lines ``galsift labels import`` prints."""
    lines = [
        f"label set {report.label_set} ({report.kind}"
        + (f": {', '.join(f'{i}={c}' for i, c in enumerate(report.classes))}" if report.classes else "")
        + ")",
        f"  rows with a label: {report.rows} ({report.skipped_empty} empty cells skipped)",
        f"  tiles already stored: {report.already_stored}; published: {report.published} "
        f"({report.publish_failed} failed), stored by ingest: {report.stored_after_wait}, "
        f"rejected: {report.rejected}, not stored in time: {report.timed_out}",
        f"  labels: {report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged "
        f"(values {report.value_counts}) in {report.seconds:.1f} s",
    ]
    lines.extend(f"  not labelled: {path}: {why}" for path, why in report.problems)
    return "\n".join(lines)
