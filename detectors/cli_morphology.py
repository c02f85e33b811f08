"""``galsift train morphology``: morphology heads from the labels and embeddings in the database.

Heavy modules (scikit-learn, matplotlib, the database layer) are imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from galsift.cli import CommandGroups
    from galsift.settings import Settings

#: kept in step with detectors.morphology.DEFAULT_TASKS (not imported: --help stays light)
_DEFAULT_TASKS_HELP = (
    "morphology=gz_decals_morphology featured=gz_decals_featured edge_on_disk=gz_decals_edge_on "
    "spiral_arms=gz_decals_spiral_arms ring=gz_decals_ring"
)


def _task(text: str) -> tuple[str, str]:
    name, sep, label_set = text.partition("=")
    if not sep or not name.strip() or not label_set.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=LABEL_SET, got {text!r}")
    return name.strip(), label_set.strip()


def _c_value(text: str) -> str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def register(groups: CommandGroups) -> None:
    """Add ``galsift train morphology``."""
    p = groups.train.add_parser(
        "morphology",
        help="calibrated morphology heads on the LVM embeddings, from the labels in the database",
        description="Train one class-balanced logistic head per task on the embeddings of one "
        "encoder model version (the serving one by default) joined to the task's label set in the "
        "labels table; calibrate its probabilities on out-of-fold scores; measure AUC, ECE and "
        "Brier score on a held-out part; write the heads (JSON, not a pickle), their card and a "
        "reliability plot; register the model version. Import labels first with `galsift labels "
        "import`.",
    )
    p.add_argument(
        "--task",
        type=_task,
        action="append",
        default=None,
        metavar="TASK=LABEL_SET",
        help=f"a task and the label set it learns (repeatable; default: {_DEFAULT_TASKS_HELP}; "
        "label sets without embedded labels are skipped)",
    )
    p.add_argument(
        "--encoder-version",
        default=None,
        help="encoder model version of the embeddings (default: the one `galsift encode` serves)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights file (*.json; card and plot next to it; default: <data_dir>/models/morphology/<version>.json)",
    )
    p.add_argument("--plot", type=Path, default=None, help="reliability plot PNG (default: next to --out)")
    p.add_argument(
        "--holdout", type=_fraction, default=None, help="held-out share of each class (default 0.25)"
    )
    p.add_argument(
        "--calibration",
        choices=("sigmoid", "isotonic"),
        default="sigmoid",
        help="calibration map: Platt's sigmoid (default; small label sets) or isotonic",
    )
    p.add_argument(
        "--c",
        type=_c_value,
        default=None,
        metavar="C|auto",
        help="inverse L2 regularisation of the heads on standardised embeddings (default 0.1, as in "
        "`galsift eval morphology`); auto: per task, the best out-of-fold AUC of 0.01..3",
    )
    p.add_argument(
        "--min-per-class",
        type=int,
        default=None,
        help="leave out classes with fewer labels (default 3, the least that can be held out and calibrated)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and calibration folds")
    p.add_argument("--no-register", action="store_true", help="do not register the model version")
    p.add_argument("--json", type=Path, default=None, help="write the held-out metrics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from detectors import morphology as morph

    tasks = dict(args.task) if args.task else dict(morph.DEFAULT_TASKS)
    engine = get_engine(settings)
    try:
        encoder_version = args.encoder_version or morph.serving_encoder_version(settings)
        try:
            result = morph.train_from_database(
                engine,
                tasks=tasks,
                encoder_version=encoder_version,
                c=morph.DEFAULT_C if args.c is None else (None if args.c == "auto" else float(args.c)),
                holdout=morph.DEFAULT_HOLDOUT if args.holdout is None else args.holdout,
                calibration=args.calibration,
                min_per_class=morph.MIN_PER_CLASS if args.min_per_class is None else args.min_per_class,
                seed=args.seed,
                progress=not args.no_progress,
            )
        except morph.MorphologyError as exc:
            print(f"galsift train morphology: {exc}", file=sys.stderr)
            return 2
        heads = result.heads
        out = args.out or settings.data_dir / "models" / "morphology" / f"{heads.version}.json"
        heads.save(out)
        plot = morph.plot_reliability(result, args.plot or out.with_name(out.stem + ".reliability.png"))
        print(f"{heads.version}: heads on {encoder_version} embeddings (held-out metrics, calibrated)")
        print(morph.format_metrics(result))
        print(f"wrote {out}, {heads.card_path(out)} and {plot}")
        if not args.no_register:
            registered = heads.register(engine, out)
            print(f"registered model version {registered.name}")
    finally:
        engine.dispose()
    if args.json is not None:
        doc = {
            "command": "train morphology",
            "data": "database: " + ", ".join(f"{t}={s}" for t, s in tasks.items()),
            "model_version": heads.version,
            "encoder_version": encoder_version,
            "results": morph.metrics_rows(result),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
