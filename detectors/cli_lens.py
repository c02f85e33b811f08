"""``galsift train lens`` and ``galsift eval lens``.

Heavy modules (torch, torchvision, GalSim, lenstronomy) are imported inside the handlers so that
``galsift --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from galsift.cli import CommandGroups
    from galsift.settings import Settings

#: the shipped detector and where the ResNet50 baseline is written next to it (not shipped: ~50 MB)
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_OUT = str(CHECKPOINT_DIR / "lens_{backbone}.safetensors")
DEFAULT_MODELS = (CHECKPOINT_DIR / "lens_lvm.safetensors", CHECKPOINT_DIR / "lens_resnet50.safetensors")


def _device(name: str | None, settings: Settings) -> str:
    import torch

    wanted = name or settings.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _cache_dir(args: argparse.Namespace, settings: Settings) -> Path | None:
    return None if args.no_cache else settings.data_dir / "cache" / "model_input"


def _finite(value: Any) -> Any:
    """NaN and infinities become None, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    doc = {**doc, "results": [{k: _finite(v) for k, v in row.items()} for row in doc["results"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def _fail(command: str, exc: Exception) -> int:
    print(f"galsift {command}: {exc}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[Exception], ...]:
    from detectors.lens_data import LensDataError
    from detectors.lens_eval import LensEvalError
    from detectors.lens_head import LensHeadError
    from detectors.lens_train import LensTrainingError
    from detectors.lensfinder import LensFinderError
    from encoder.checkpoint import CheckpointError
    from encoder.data import DataError

    return (
        LensTrainingError,
        LensDataError,
        LensEvalError,
        LensHeadError,
        LensFinderError,
        CheckpointError,
        DataError,
    )


def _add_train(groups: CommandGroups) -> None:
    p = groups.train.add_parser(
        "lens",
        help="train the lens finder (Mask R-CNN, LVM backbone) and/or its ResNet50 baseline",
        description="Train Mask R-CNN lens detectors on simulated lenses (exact arc masks) and "
        "negatives, every backbone on the same images and budget; score them on held-out "
        "simulations (detection accuracy, mask IoU) and write checkpoints with their cards.",
    )
    p.add_argument("--backbone", choices=("lvm", "resnet50", "both"), default="lvm")
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="checkpoint path, *.safetensors; {backbone} is replaced (default: %(default)s)",
    )
    p.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--n-test", type=int, default=200, help="held-out simulations (half lenses)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimiser steps per backbone")
    budget.add_argument("--epochs", type=float, default=1.0, help="passes over the training set (default 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--image-size", type=int, default=96, help="side of the model input (the LVM's size)")
    p.add_argument("--lvm-checkpoint", type=Path, default=None, help="encoder checkpoint (default: shipped)")
    p.add_argument(
        "--trainable-layers",
        type=int,
        default=None,
        help="backbone parts left trainable, from the deepest, 0-5 (default: 3 pretrained LVM, 5 ResNet50)",
    )
    p.add_argument(
        "--negatives",
        action="append",
        default=[],
        metavar="DIR[:COL=VALUE]",
        help="labels.csv folder of real non-lenses, optionally filtered (COL=VALUE or COL!=VALUE); repeatable",
    )
    p.add_argument(
        "--negative-fraction",
        type=float,
        default=0.5,
        help="share of each negatives folder used for training, picked by a hash of the file name; "
        "the rest stay unseen (default 0.5)",
    )
    p.add_argument("--lens-fraction", type=float, default=0.5, help="share of simulated lenses")
    p.add_argument("--real-fraction", type=float, default=0.25, help="share of real negatives")
    p.add_argument(
        "--painted-fraction",
        type=float,
        default=0.0,
        help="share of images that are real negatives with simulated arcs painted on, as lenses "
        "(default 0: off)",
    )
    p.add_argument(
        "--colour-fraction", type=float, default=0.5, help="share of sims rendered as JPEG composites"
    )
    p.add_argument("--half", action="store_true", help="write float16 weights (to ship)")
    p.add_argument("--json", type=Path, default=None, help="write the held-out table as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device or 'auto' (default: settings.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--no-cache", action="store_true", help="do not use the preprocessing and simulation caches"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from detectors.lens_data import LensDataConfig
    from detectors.lens_train import LensTrainConfig, format_table, result_rows, train_lens
    from detectors.lensfinder import DEFAULT_ENCODER_CHECKPOINT

    _threads(args.threads)
    backbones = ("lvm", "resnet50") if args.backbone == "both" else (args.backbone,)
    t0 = time.perf_counter()
    try:
        cfg = LensTrainConfig(
            out=args.out,
            backbones=backbones,
            n_train=args.n_train,
            n_test=args.n_test,
            steps=args.steps,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            lvm_checkpoint=args.lvm_checkpoint or DEFAULT_ENCODER_CHECKPOINT,
            trainable_layers=args.trainable_layers,
            negatives=tuple(args.negatives),
            negative_fraction=args.negative_fraction,
            data=LensDataConfig(
                size=args.image_size,
                lens_fraction=args.lens_fraction,
                real_fraction=args.real_fraction,
                painted_fraction=args.painted_fraction,
                colour_fraction=args.colour_fraction,
            ),
            seed=args.seed,
            device=_device(args.device, settings),
            half=args.half,
            progress=not args.no_progress,
            cache_dir=_cache_dir(args, settings),
            sim_cache_dir=None if args.no_cache else settings.data_dir / "cache" / "lens_sims",
        )
        results = train_lens(cfg)
    except _user_errors() as exc:
        return _fail("train lens", exc)
    rows = result_rows(results)
    print(f"trained {', '.join(backbones)} in {time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    if args.json:
        _write_json(
            args.json,
            {
                "command": "train lens",
                "data": "simulations" + "".join(f" + {n}" for n in args.negatives),
                "model_version": rows[0]["model"],
                "results": rows,
            },
        )
    return 0


def _add_train_head(groups: CommandGroups) -> None:
    from detectors.lens_head import DEFAULT_C, DEFAULT_LENS_HEAD

    p = groups.train.add_parser(
        "lens-head",
        help="fit the lens head: real graded images turn the lens finder's score into a probability",
        description="Fit a class-balanced logistic regression over the stored LVM embedding and the "
        "lens finder's top score on real images graded lens / non-lens (a hash-chosen share of each "
        "folder; the rest stays held out for galsift eval lens).",
    )
    p.add_argument(
        "--positives",
        action="append",
        required=True,
        metavar="DIR[:COL=V|:COL!=V]",
        help="labels.csv folder (optionally filtered) of real lenses; repeatable",
    )
    p.add_argument(
        "--negatives",
        action="append",
        required=True,
        metavar="DIR[:COL=V|:COL!=V]",
        help="labels.csv folder (optionally filtered) of real non-lenses; repeatable",
    )
    p.add_argument(
        "--fraction", type=float, default=0.5, help="share of each folder trained on (default 0.5)"
    )
    p.add_argument(
        "--detector", type=Path, default=None, help="lens finder checkpoint (default: the shipped one)"
    )
    p.add_argument("--encoder", type=Path, default=None, help="encoder checkpoint (default: the shipped one)")
    p.add_argument(
        "--target",
        default=None,
        metavar="DIR",
        help="folder (of --positives/--negatives) of the survey the head is judged on: its images "
        "weigh as much as all the others together",
    )
    p.add_argument(
        "--field-only",
        action="store_true",
        help="read the stored embedding alone (no centre view, no colour rings: the format-1 head)",
    )
    p.add_argument("--c", type=float, default=DEFAULT_C, help="inverse regularisation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cross-fitting folds")
    p.add_argument("--out", type=Path, default=DEFAULT_LENS_HEAD, help="card path (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device or 'auto' (default: settings.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-cache", action="store_true", help="do not use the preprocessing cache")
    p.set_defaults(func=_cmd_train_head)


def _cmd_train_head(args: argparse.Namespace, settings: Settings) -> int:
    from detectors.lens_data import NegativeSpec
    from detectors.lens_head import LensHeadError, fit_lens_head, load_labelled, views_of
    from detectors.lensfinder import DEFAULT_ENCODER_CHECKPOINT, LensFinder
    from encoder import checkpoint

    _threads(args.threads)
    device = _device(args.device, settings)
    try:
        if not 0 < args.fraction <= 1:
            raise LensHeadError(f"--fraction must be within (0, 1], got {args.fraction}")
        finder = (
            LensFinder.load(args.detector, device=device) if args.detector else LensFinder.load(device=device)
        )
        model, card = checkpoint.load_model(args.encoder or DEFAULT_ENCODER_CHECKPOINT)
        model.eval().to(device)
        pos = [NegativeSpec.parse(t) for t in args.positives]
        neg = [NegativeSpec.parse(t) for t in args.negatives]
        cache = _cache_dir(args, settings)
        labelled = load_labelled(pos, neg, size=model.img_size, fraction=args.fraction, cache_dir=cache)
        finder_images = labelled.images
        if finder.image_size != model.img_size:
            finder_images = load_labelled(
                pos, neg, size=finder.image_size, fraction=args.fraction, cache_dir=cache
            ).images
        views = None
        if not args.field_only:
            detail = load_labelled(pos, neg, size=2 * model.img_size, fraction=args.fraction, cache_dir=cache)
            views = views_of(detail.images, model.embed_array)
        head = fit_lens_head(
            model.embed_array(labelled.images),
            finder.scores(finder_images),
            labelled.labels,
            encoder_version=str(card["version"]),
            detector_version=finder.version,
            data=labelled.data,
            c=args.c,
            seed=args.seed,
            views=views,
            target=args.target,
        )
    except _user_errors() as exc:
        return _fail("train lens-head", exc)
    head.save(args.out)
    m = head.card["metrics"]
    target = f"; among the target's {m['cross_fitted_auroc_target']:.3f}" if args.target else ""
    print(
        f"{head.version}: {m['n_lenses']} lenses, {m['n_non_lenses']} non-lenses; cross-fitted AUROC "
        f"{m['cross_fitted_auroc']:.3f}{target} (without the finder's score "
        f"{m['cross_fitted_auroc_without_finder']:.3f}; the finder alone {m['finder_auroc']:.3f}) -> {args.out}"
    )
    return 0


def _add_eval(groups: CommandGroups) -> None:
    p = groups.eval.add_parser(
        "lens",
        help="AUROC, TPR at FPR 1%% and TPR at 0 FP of the lens detectors (LVM vs ResNet50 backbone)",
        description="Score a graded labels.csv folder with each lens detector (top detection score per "
        "image) and report AUROC, TPR at FPR 1%% and TPR at zero false positives, on the same images.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    p.add_argument("--score-col", required=True, help="numeric grade column (e.g. expert_grade)")
    p.add_argument("--positive-min", type=float, required=True, help="grade >= this: lens")
    p.add_argument("--negative-max", type=float, required=True, help="grade <= this: non-lens")
    p.add_argument(
        "--model",
        type=Path,
        action="append",
        default=None,
        help="detector checkpoint (repeatable; default: the shipped LVM detector and the ResNet50 "
        f"baseline in {CHECKPOINT_DIR})",
    )
    p.add_argument(
        "--head",
        type=Path,
        action="append",
        default=None,
        help="lens head card (repeatable; default: the shipped one, when its lens finder is evaluated)",
    )
    p.add_argument(
        "--encoder", type=Path, default=None, help="encoder checkpoint the heads read (default: shipped)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="torch device or 'auto' (default: settings.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-cache", action="store_true", help="do not use the preprocessing cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _head_scorers(args: argparse.Namespace, finders: list[Any], device: str) -> list[Any]:
    """The lens heads to evaluate, each with the encoder it reads (checked against its card)."""
    from detectors.lens_eval import HeadScorer
    from detectors.lens_head import DEFAULT_LENS_HEAD, LensHead, LensHeadError
    from detectors.lensfinder import DEFAULT_ENCODER_CHECKPOINT
    from encoder import checkpoint

    paths = list(args.head or [])
    if not paths and DEFAULT_LENS_HEAD.is_file():
        shipped = LensHead.load(DEFAULT_LENS_HEAD)
        if shipped.detector_version in {f.version for f in finders}:
            paths = [DEFAULT_LENS_HEAD]
    if not paths:
        return []
    model, card = checkpoint.load_model(args.encoder or DEFAULT_ENCODER_CHECKPOINT)
    model.eval().to(device)
    scorers = []
    for path in paths:
        head = LensHead.load(path, encoder_version=str(card["version"]))
        if head.detector_version not in {f.version for f in finders}:
            raise LensHeadError(f"{path} reads lens finder {head.detector_version}: pass it with --model")
        scorers.append(HeadScorer(head, model.embed_array, int(model.img_size)))
    return scorers


def _cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from detectors.lens_eval import format_table, json_document, run_lens_eval
    from detectors.lensfinder import LensFinder

    _threads(args.threads)
    device = _device(args.device, settings)
    paths = list(args.model) if args.model else []
    if not paths:
        paths = [p for p in DEFAULT_MODELS if p.is_file()]
        missing = [p for p in DEFAULT_MODELS if not p.is_file()]
        for p in missing:
            print(
                f"galsift eval lens: no detector at {p} (train it: galsift train lens --backbone "
                f"{p.stem.removeprefix('lens_')}); evaluating without it",
                file=sys.stderr,
            )
        if not paths:
            return _fail("eval lens", FileNotFoundError("no lens detector checkpoint found"))
    try:
        finders = [LensFinder.load(p, device=device) for p in paths]
        heads = _head_scorers(args, finders, device)
        run = run_lens_eval(
            args.data,
            finders,
            score_col=args.score_col,
            positive_min=args.positive_min,
            negative_max=args.negative_max,
            heads=heads,
            cache_dir=_cache_dir(args, settings),
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except _user_errors() as exc:
        return _fail("eval lens", exc)
    print(format_table(run))
    if args.json:
        _write_json(args.json, json_document(run, data_arg=str(args.data), model_version=run.versions[0]))
    return 0


def register(groups: CommandGroups) -> None:
    """Add ``galsift train lens``, ``galsift train lens-head`` and ``galsift eval lens``."""
    _add_train(groups)
    _add_train_head(groups)
    _add_eval(groups)
