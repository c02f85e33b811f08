"""``galsift train pretrain``, ``galsift train finetune`` and ``galsift bench encoder``.

Heavy modules (torch, the models, GalSim) are imported inside the handlers so ``galsift --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from galsift.cli import CommandGroups
    from galsift.settings import Settings

log = logging.getLogger(__name__)


def _cache_dir(args: argparse.Namespace, settings: Settings) -> Path | None:
    # the same preprocessing cache as ``galsift eval``
    return None if args.no_cache else settings.data_dir / "cache" / "model_input"


def _device(args: argparse.Namespace, settings: Settings) -> str:
    return str(args.device or settings.device)


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device or 'auto' (default: settings.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (deterministic on CPU)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per folder")
    p.add_argument("--no-cache", action="store_true", help="do not use the preprocessing cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_pretrain(train: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = train.add_parser(
        "pretrain",
        help="self-supervised pretraining: reconstruction + masked modelling + contrastive",
        description="Pretrain an LVM variant on survey folders (labels unused) and simulations.",
    )
    p.add_argument("--model", default="lvm_tiny", help="registered variant (encoder.models.list_models)")
    p.add_argument("--data", type=Path, action="append", default=[], help="image folder (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint path, *.safetensors")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps of the schedule")
    p.add_argument("--stop-after", type=int, default=None, help="stop this run after N steps (resume later)")
    p.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--w-recon", type=float, default=1.0, help="weight of degraded-input reconstruction")
    p.add_argument("--w-mim", type=float, default=1.0, help="weight of masked image modelling")
    p.add_argument("--w-contrast", type=float, default=0.5, help="weight of the NT-Xent term")
    p.add_argument(
        "--w-sim",
        type=float,
        default=0.5,
        help="weight of predicting the simulator's truth (lens/ring/spiral) of simulated images",
    )
    p.add_argument(
        "--recon-fraction",
        type=float,
        default=1.0,
        help="share of each batch that goes through the decoder (cheaper steps)",
    )
    p.add_argument("--mask-ratio", type=float, default=0.4)
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    p.add_argument("--sim-fraction", type=float, default=0.5, help="share of each batch simulated")
    p.add_argument("--sim-pool", type=int, default=1024, help="simulated images generated at start")
    p.add_argument("--sim-lens-fraction", type=float, default=0.35, help="share of lenses among sims")
    p.add_argument(
        "--sim-cache",
        type=Path,
        default=None,
        help="folder keeping the simulated pools (8-bit .npz): reused when the seed, size and "
        "simulation options match, so reruns and GPU nodes without GalSim skip the simulation",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--img-size", type=int, default=None, help="override the variant's input size")
    p.add_argument(
        "--half", action="store_true", help="final weights in float16, no training state (to ship)"
    )
    _common(p)
    p.set_defaults(func=_cmd_pretrain)


def _add_finetune(train: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = train.add_parser(
        "finetune",
        help="multi-task finetuning (classification, restoration, reconstruction), active or equal",
        description="Finetune a pretrained checkpoint on one labelled folder; --compare runs both "
        "strategies on the same budget and prints the validation metric per task.",
    )
    p.add_argument("--init", type=Path, required=True, help="pretrained checkpoint (*.safetensors)")
    p.add_argument("--data", type=Path, required=True, help="labels.csv folder")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        help="label column (repeatable: one classify task each; needed when --tasks has classify)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        action="append",
        default=[],
        help="binarise the matching --label (>= T -> 1), in order",
    )
    p.add_argument(
        "--tasks",
        default="classify,restore,reconstruct",
        help="comma-separated task kinds among classify, restore, reconstruct",
    )
    p.add_argument("--strategy", choices=("active", "equal"), default="active")
    p.add_argument("--compare", action="store_true", help="run equal and active, print a table")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=25, help="steps between share updates")
    p.add_argument("--temperature", type=float, default=0.25, help="softmax temperature of active shares")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--out", type=Path, default=None, help="write the finetuned checkpoint here")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    _common(p)
    p.set_defaults(func=_cmd_finetune)


def _add_bench(groups: CommandGroups) -> None:
    p = groups.bench.add_parser(
        "encoder",
        help="encoder images/s and fraction of the measured matmul rate, vs timm swin_base",
        description="Throughput of an LVM variant and of timm's swin_base_patch4_window7_224 "
        "(random weights) in the same process, with FLOPs counted by torch's FlopCounterMode and "
        "compared with a large matmul measured in the same run.",
    )
    p.add_argument("--model", default=None, help="LVM variant (default: lvm_tiny on CPU, lvm_paper on CUDA)")
    p.add_argument(
        "--batch", type=int, default=None, help="images per forward (default: 4 on CPU, 64 on CUDA)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--seconds", type=float, default=None, help="timed seconds per model (default 8 CPU, 5 CUDA)"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip timm swin_base")
    p.add_argument("--compile", action="store_true", help="also time the embedding under torch.compile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.set_defaults(func=_cmd_bench)


def register(groups: CommandGroups) -> None:
    """Add ``train pretrain``, ``train finetune``, ``train continual``, ``bench encoder`` and ``encode``."""
    _add_pretrain(groups.train)
    _add_finetune(groups.train)
    _add_bench(groups)
    _add_encode(groups)
    from encoder import continual

    continual.register(groups.train)


def _add_encode(groups: CommandGroups) -> None:
    p = groups.top.add_parser(
        "encode",
        help="run the embedding service (tiles.accepted -> pgvector), or --backfill stored tiles",
        description="A consumer-group member on tiles.accepted: reads pixels, embeds them in "
        "micro-batches on the device, upserts vectors keyed by (tile, model version), publishes "
        "tiles.embedded, then commits. With --backfill, (re-)embeds every stored tile that has no "
        "vector from the model version yet; restartable.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint file or registered model version (default: GALSIFT_MODEL_CHECKPOINT, else the "
        "newest promoted LVM, else the shipped lvm_tiny)",
    )
    p.add_argument("--group", default=None, help="consumer group (default: encoder)")
    p.add_argument("--backfill", action="store_true", help="embed stored tiles instead of consuming")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--idle-exit", type=float, default=None, help="exit after S seconds without input")
    p.set_defaults(func=_cmd_encode)


def _cmd_encode(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.service import run

    return run(
        settings,
        model=args.model,
        group=args.group,
        do_backfill=args.backfill,
        max_batches=args.max_batches,
        idle_exit_s=args.idle_exit,
    )


def _user_errors() -> tuple[type[Exception], ...]:
    """What bad options, data or checkpoints raise: reported in one line, not as a traceback."""
    from encoder.checkpoint import CheckpointError
    from encoder.data import DataError
    from encoder.train import TrainingError

    return (TrainingError, DataError, CheckpointError)


def _fail(command: str, exc: Exception) -> int:
    print(f"galsift {command}: {exc}", file=sys.stderr)
    return 2


def _cmd_pretrain(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.train import PretrainConfig, pretrain

    _threads(args)
    cfg = PretrainConfig(
        out=args.out,
        data=tuple(args.data),
        model=args.model,
        steps=args.steps,
        stop_after=args.stop_after,
        resume=args.resume,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        w_recon=args.w_recon,
        w_mim=args.w_mim,
        w_contrast=args.w_contrast,
        w_sim=args.w_sim,
        recon_fraction=args.recon_fraction,
        mask_ratio=args.mask_ratio,
        temperature=args.temperature,
        sim_fraction=args.sim_fraction,
        sim_pool=args.sim_pool,
        sim_lens_fraction=args.sim_lens_fraction,
        val_fraction=args.val_fraction,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        device=_device(args, settings),
        limit=args.limit,
        cache_dir=_cache_dir(args, settings),
        sim_cache=args.sim_cache,
        half=args.half,
        progress=not args.no_progress,
        overrides={"img_size": args.img_size} if args.img_size else {},
    )
    t0 = time.perf_counter()
    try:
        result = pretrain(cfg)
    except _user_errors() as exc:
        return _fail("train pretrain", exc)
    first, last = result.history[0], result.history[-1]
    print(f"{result.card['version']}: {result.step} steps in {time.perf_counter() - t0:.0f} s -> {args.out}")
    print(f"{'metric':<22} {'start':>10} {'end':>10}")
    for key in sorted(k for k in last if k.startswith("val")):
        print(f"{key:<22} {first.get(key, float('nan')):>10.4f} {last[key]:>10.4f}")
    return 0


def _cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.train import (
        FinetuneConfig,
        compare_strategies,
        comparison_rows,
        finetune,
        format_comparison,
    )

    _threads(args)
    cfg = FinetuneConfig(
        init=args.init,
        data=args.data,
        labels=tuple(args.label),
        thresholds=tuple(args.threshold),
        out=args.out,
        strategy=args.strategy,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        temperature=args.temperature,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=_device(args, settings),
        limit=args.limit,
        cache_dir=_cache_dir(args, settings),
        progress=not args.no_progress,
    )
    try:
        results = compare_strategies(cfg) if args.compare else {args.strategy: finetune(cfg)}
    except _user_errors() as exc:
        return _fail("train finetune", exc)
    rows = comparison_rows(results)
    print(format_comparison(rows))
    if args.json:
        from encoder.checkpoint import read_card

        doc = {
            "command": "train finetune" + (" --compare" if args.compare else f" --strategy {args.strategy}"),
            "data": str(args.data),
            "model_version": read_card(args.init).get("version"),
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.bench import bench_encoder, format_bench

    _threads(args)
    report = bench_encoder(
        model=args.model,
        batch=args.batch,
        device=args.device,
        seconds=args.seconds,
        baseline=not args.no_baseline,
        compile=args.compile,
    )
    print(format_bench(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
