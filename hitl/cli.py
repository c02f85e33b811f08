"""``galsift hitl new|round|label|undo|save|list|show``: scripted HITL sessions.

The same :class:`hitl.engine.SearchEngine` the dashboard drives, from a terminal or a script::

    galsift hitl new --owner ana --concept ring --tile 3f2a… --coords "10.68 41.27"
    galsift hitl round 1                  # shows 12 tiles with the strategy that chose each
    galsift hitl label 1 3f2a…=good:4 9c1d…=bad
    galsift hitl save 1 --threshold 0.8   # a standing query over new tiles

This module also adds the package's other commands (``SUBMODULES``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from galsift.cli import CommandGroups, positive_int
from galsift.settings import Settings

#: modules of this package that add their own commands (eval hitl, bench hitl, scheduler, watcher)
SUBMODULES = ("hitl.evaluate", "hitl.bench", "hitl.scheduler", "hitl.service")


def register(groups: CommandGroups) -> None:
    """Add ``galsift hitl`` and the package's other commands to the command line."""
    p = groups.top.add_parser(
        "hitl",
        help="human-in-the-loop search sessions (new, round, label, undo, save, list, show)",
        description="Scripted HITL search: the engine the dashboard uses, from the terminal.",
    )
    sub = p.add_subparsers(dest="hitl_command", required=True, metavar="ACTION")

    q = sub.add_parser(
        "new", help="start a session from seeds (tiles, positions, images) or none (anomalies)"
    )
    q.add_argument("--owner", required=True, help="who searches (labels are theirs)")
    q.add_argument(
        "--concept", required=True, help="what is searched for, e.g. ring (labels are keyed by it)"
    )
    q.add_argument("--name", help="a name for the session")
    q.add_argument("--model-version", help="embedding model version (default: the promoted/most-used one)")
    q.add_argument("--tile", action="append", default=[], metavar="ID", help="seed tile id (repeatable)")
    q.add_argument(
        "--external-id", action="append", default=[], metavar="[SURVEY:]ID", help="seed by a survey's own id"
    )
    q.add_argument(
        "--coords",
        action="append",
        default=[],
        metavar="POS",
        help="seed position in any format astropy parses ('150.1 2.2', '10h00m24s +02d12m'; degrees if bare)",
    )
    q.add_argument("--radius", type=float, default=5.0, metavar="ARCSEC", help="position match radius")
    q.add_argument(
        "--image", action="append", default=[], type=Path, metavar="PATH", help="seed FITS/PNG/JPEG"
    )
    q.add_argument("--json", action="store_true", help="print the session as JSON")
    q.set_defaults(func=_new)

    q = sub.add_parser("round", help="fit the learner and show the next page of candidates")
    q.add_argument("session", type=int)
    q.add_argument("-k", "--per-round", type=positive_int, default=12, metavar="K", help="tiles per page")
    q.add_argument("--json", action="store_true", help="print the round as JSON")
    q.set_defaults(func=_round)

    q = sub.add_parser("label", help="label tiles: TILE=good|bad[:INTEREST 0-5]")
    q.add_argument("session", type=int)
    q.add_argument("labels", nargs="+", metavar="TILE=good|bad[:N]")
    q.set_defaults(func=_label)

    q = sub.add_parser("undo", help="retract the newest label of the session (kept in the history)")
    q.add_argument("session", type=int)
    q.set_defaults(func=_undo)

    q = sub.add_parser("save", help="keep the session as a standing query over new tiles")
    q.add_argument("session", type=int)
    q.add_argument("--threshold", type=float, default=0.8, help="notify at or above this score (0-1)")
    q.add_argument("--webhook", metavar="URL", help="also POST each notification here")
    q.set_defaults(func=_save)

    q = sub.add_parser("list", help="sessions and saved searches")
    q.add_argument("--owner", help="only this user's")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_list)

    q = sub.add_parser("show", help="a session's rounds: shown tiles, strategies, labels")
    q.add_argument("session", type=int)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_show)

    for name in SUBMODULES:
        importlib.import_module(name).register(groups)


# -- helpers -----------------------------------------------------------------------------------------
def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _json_default(obj: Any) -> Any:
    return str(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=_json_default))


def parse_label(text: str) -> tuple[str, bool, int | None]:
    """``TILE=good|bad[:N]`` -> (tile id, good, interest).

    Raises
    ------
    ValueError
        If the text is not of that form.
    """
    tile, sep, grade = text.partition("=")
    verdict, _, interest = grade.partition(":")
    if not sep or verdict.lower() not in ("good", "bad", "1", "0", "yes", "no"):
        raise ValueError(f"{text!r}: expected TILE=good|bad[:INTEREST]")
    uuid.UUID(tile)  # raises ValueError with a clear message on a bad id
    value = int(interest) if interest else None
    if value is not None and not 0 <= value <= 5:
        raise ValueError(f"{text!r}: interest must be 0-5")
    return tile, verdict.lower() in ("good", "1", "yes"), value


def parse_position(text: str) -> Any:
    """A :class:`~astropy.coordinates.SkyCoord` from any common notation (bare numbers are degrees).

    Raises
    ------
    ValueError
        If astropy cannot parse it.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    parts = text.replace(",", " ").split()
    try:
        if len(parts) == 2 and all(_is_number(p) for p in parts):
            return SkyCoord(float(parts[0]) * u.deg, float(parts[1]) * u.deg, frame="icrs")
        return SkyCoord(text, frame="icrs", unit=(u.hourangle, u.deg))
    except (ValueError, u.UnitsError) as exc:
        raise ValueError(f"cannot read position {text!r}: {exc}") from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _engine(settings: Settings) -> Any:
    from db.engine import get_engine

    return get_engine(settings)


# -- commands ---------------------------------------------------------------------------------------
def _new(args: argparse.Namespace, settings: Settings) -> int:
    import astropy.units as u

    from db import hitl as store
    from hitl.engine import HitlError, SearchEngine

    engine = _engine(settings)
    try:
        version = args.model_version or store.default_model_version(engine)
        if version is None:
            return _fail(
                "no embeddings in the database yet: run the encoder first (galsift up / galsift encode)"
            )
        tiles: list[Any] = list(args.tile)
        for ext in args.external_id:
            survey, _, ident = ext.rpartition(":")
            tid = store.tile_by_external_id(engine, survey or None, ident)
            if tid is None:
                return _fail(f"no tile with external id {ext!r}")
            tiles.append(tid)
        coords = [parse_position(c) for c in args.coords]
        images = []
        if args.image:
            from encoder.serving import resolve_checkpoint
            from hitl.embed import embed_file

            checkpoint = resolve_checkpoint(engine, version, settings)
            for path in args.image:
                images.append((path.name, embed_file(path, checkpoint=checkpoint)))
        session = SearchEngine(engine).new_session(
            owner=args.owner,
            concept=args.concept,
            model_version=version,
            name=args.name,
            tile_ids=tiles,
            coords=coords,
            images=images,
            radius=args.radius * u.arcsec,
        )
    except (HitlError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    finally:
        engine.dispose()
    if args.json:
        _print_json(session.model_dump())
    else:
        seeds = len(tiles) + len(coords) + len(images)
        start = f"{seeds} seed(s)" if seeds else "no seeds: the first round shows the most unusual tiles"
        print(f"session {session.id}: {session.owner} searching {session.concept!r} in {version}, {start}")
    return 0


def _round(args: argparse.Namespace, settings: Settings) -> int:
    from db import hitl as store
    from hitl.engine import HitlError, SearchEngine

    engine = _engine(settings)
    try:
        rnd = SearchEngine(engine).next_round(args.session, k=args.per_round)
        names = store.tile_names(engine, [s.tile_id for s in rnd.shown])
    except HitlError as exc:
        return _fail(str(exc))
    finally:
        engine.dispose()
    rows = [
        {
            "rank": s.rank,
            "tile_id": str(s.tile_id),
            "survey": names.get(s.tile_id, {}).get("survey"),
            "external_id": names.get(s.tile_id, {}).get("external_id"),
            "strategy": s.strategy,
            "score": round(s.score, 4),
        }
        for s in rnd.shown
    ]
    if args.json:
        _print_json({"session": rnd.session_id, "round": rnd.round_no, "learner": rnd.learner, "shown": rows})
        return 0
    print(
        f"session {rnd.session_id} round {rnd.round_no}: {rnd.learner} learner on {rnd.n_pos} good / "
        f"{rnd.n_neg} bad, {rnd.candidates} candidates, "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in rnd.timings_ms.items())
    )
    print(f"{'rank':>4}  {'tile id':36}  {'strategy':9}  {'score':>6}  survey:external id")
    for r in rows:
        print(
            f"{r['rank']:>4}  {r['tile_id']:36}  {r['strategy']:9}  {r['score']:>6.3f}  {r['survey']}:{r['external_id']}"
        )
    if not rows:
        print("nothing left to show: every embedded tile of this model version is shown or labelled")
    return 0


def _label(args: argparse.Namespace, settings: Settings) -> int:
    from hitl.engine import HitlError, SearchEngine

    try:
        parsed = [parse_label(t) for t in args.labels]
    except ValueError as exc:
        return _fail(str(exc))
    engine = _engine(settings)
    try:
        ids = SearchEngine(engine).label(
            args.session, [(t, g) for t, g, _ in parsed], interest=[i for _, _, i in parsed]
        )
    except HitlError as exc:
        return _fail(str(exc))
    except Exception as exc:  # a tile id that is not in the database: the foreign key refuses it
        from sqlalchemy.exc import IntegrityError

        if isinstance(exc, IntegrityError):
            return _fail("a labelled tile id is not in the database")
        raise
    finally:
        engine.dispose()
    good = sum(1 for _, g, _ in parsed if g)
    print(f"saved {len(ids)} label(s): {good} good, {len(ids) - good} bad")
    return 0


def _undo(args: argparse.Namespace, settings: Settings) -> int:
    from hitl.engine import HitlError, SearchEngine

    engine = _engine(settings)
    try:
        row = SearchEngine(engine).undo(args.session)
    except HitlError as exc:
        return _fail(str(exc))
    finally:
        engine.dispose()
    if row is None:
        print("nothing to undo")
    else:
        print(f"retracted label {row['id']}: {row['tile_id']} {'good' if row['good'] else 'bad'}")
    return 0


def _save(args: argparse.Namespace, settings: Settings) -> int:
    from hitl.engine import HitlError, SearchEngine

    engine = _engine(settings)
    try:
        saved = SearchEngine(engine).save(args.session, threshold=args.threshold, webhook_url=args.webhook)
    except HitlError as exc:
        return _fail(str(exc))
    finally:
        engine.dispose()
    print(
        f"saved search {saved.id} ({saved.name!r}, learner v{saved.learner_version}, "
        f"{saved.learner.get('kind')}): new tiles scoring >= {saved.threshold} notify {saved.owner}"
    )
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from db import hitl as store

    engine = _engine(settings)
    try:
        sessions = store.list_sessions(engine, owner=args.owner)
        saved = {s.session_id: s for s in store.saved_searches(engine, owner=args.owner)}
    finally:
        engine.dispose()
    if args.json:
        _print_json(
            [
                {
                    **s.model_dump(),
                    "saved": saved[s.id].model_dump(exclude={"learner"}) if s.id in saved else None,
                }
                for s in sessions
            ]
        )
        return 0
    print(f"{'id':>4}  {'owner':12}  {'concept':12}  {'rounds':>6}  {'saved':18}  name")
    for s in sessions:
        sv = saved.get(s.id)
        mark = f"#{sv.id} >= {sv.threshold:g} v{sv.learner_version}" if sv else "-"
        print(f"{s.id:>4}  {s.owner:12}  {s.concept:12}  {s.rounds:>6}  {mark:18}  {s.name}")
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from db import hitl as store

    engine = _engine(settings)
    try:
        session = store.get_session(engine, args.session)
        if session is None:
            return _fail(f"no HITL session {args.session}")
        rows = store.shown_tiles(engine, args.session)
    finally:
        engine.dispose()
    if args.json:
        _print_json({"session": session.model_dump(), "shown": rows})
        return 0
    print(
        f"session {session.id}: {session.owner} / {session.concept} / {session.model_version}, {session.rounds} round(s)"
    )
    for r in rows:
        label = "-" if r["good"] is None else ("good" if r["good"] else "bad")
        grade = "" if r["interest"] is None else f":{r['interest']}"
        print(
            f"round {r['round_no']:>2} #{r['rank']:>2}  {r['tile_id']}  {r['strategy']:9}  {r['score']:.3f}  {label}{grade}"
        )
    return 0
