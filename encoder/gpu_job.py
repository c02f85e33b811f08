"""Benchmark and pretrain the encoder on a GPU node that has PyTorch but not the service.

GPU nodes usually come with torch and timm, but without GalSim, the survey folders or the
service's packages (Kafka and PostgreSQL drivers), and often without a network. The job is
therefore split in two:

``python -m encoder.gpu_job pack --data DIR [--data DIR ...] --out PACK``
    On the data host: the pretraining images as model input, written as lossless 8-bit WebP at the
    variants' input size (colour composites are 8-bit anyway, so only the resize is rounded), and
    the simulated pools through :func:`encoder.sim.cached_batch` (8-bit ``.npz``). Flux (FITS)
    folders are left out: 8 bits cannot hold their negative sky noise.

``python -m encoder.gpu_job run --pack PACK --out DIR --budget-s S``
    On the GPU node: ``bench encoder`` on CUDA (each variant, timm's Swin-B as reference), then
    pretrains every ``--models`` variant with the same recipe and the same number of steps: a
    short probe measures each model's step time and the steps are chosen so that all runs end
    within the budget. Writes float16 checkpoints with their cards (``encoder.checkpoint``), the
    bench JSON and a summary; ``galsift eval morphology --model DIR/VARIANT.safetensors`` then
    compares them with the shipped model on the data host.

Only ``encoder`` and ``galsift.bands``/``constants`` are imported (not the service), so the node needs torch,
timm, safetensors, numpy, Pillow and tqdm alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_job")

#: the recipe every variant is pretrained with (``galsift train pretrain`` defaults otherwise)
RECIPE: dict[str, Any] = {
    "batch_size": 128,
    "lr": 1e-3,
    "w_recon": 1.0,
    "w_mim": 1.0,
    "w_contrast": 1.0,
    "w_sim": 1.0,
    "recon_fraction": 0.25,
    "sim_fraction": 0.5,
    "seed": 0,
}


def pack(folders: list[Path], out: Path, *, size: int, sims: int, seed: int) -> dict[str, Any]:
    """Write the pretraining set of ``folders`` and ``sims`` simulations as model input.

    Parameters
    ----------
    folders
        ``labels.csv`` folders or folders of image files (labels are not used).
    out
        Pack folder: ``real/<folder>/<n>.webp`` and ``sims/pool<stream>.npz``.
    size
        Model input side (128 for ``lvm_mini``/``lvm_small``/``lvm_paper``).
    sims
        Simulated training pool size (the validation pool keeps its default).
    seed
        Pretraining seed: the simulated pools are a function of it.
    """
    import numpy as np
    from PIL import Image

    from encoder.train import PretrainConfig, load_unlabelled, simulated_pools

    written: dict[str, int] = {}
    for folder in folders:
        images = load_unlabelled([folder], size=size, val_fraction=0.0)
        target = out / "real" / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images.train):
            if img.min() < 0 or img.max() > 1:
                raise ValueError(f"{folder}: values outside [0, 1] (flux images cannot be packed in 8 bits)")
            pixels = np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(target / f"{i:05d}.webp", lossless=True, quality=80)
        written[folder.name] = len(images.train)
        log.info("%s: %d images", folder, len(images.train))
    # the pools exactly as pretraining makes them, through its own cache key
    cfg = PretrainConfig(out=out / "unused", sim_pool=sims, sim_cache=out / "sims", seed=seed)
    simulated_pools(cfg, size=size)
    summary = {"size": size, "sims": sims, "seed": seed, "real": written}
    (out / "pack.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(
    pack_dir: Path | None,
    out: Path,
    *,
    models: list[str],
    budget_s: float,
    bench: list[str],
    bench_batch: int,
    compile: bool = False,
) -> dict[str, Any]:
    """Benchmark ``bench`` variants and pretrain ``models`` on the pack within ``budget_s``."""
    import torch

    from encoder.bench import bench_encoder, format_bench
    from encoder.train import PretrainConfig, pretrain, step_seconds

    if not torch.cuda.is_available():
        log.warning("no CUDA device: running on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    summary: dict[str, Any] = {"bench": []}
    for i, name in enumerate(bench):
        report = bench_encoder(model=name, batch=bench_batch, baseline=i == 0, seconds=3.0, compile=compile)
        print(format_bench(report), flush=True)
        summary["bench"].append(report)
    (out / "bench_encoder.json").write_text(json.dumps(summary["bench"], indent=2) + "\n")
    if not models:
        return summary
    if pack_dir is None:
        raise ValueError("pretraining needs --pack")
    meta = summary["pack"] = json.loads((pack_dir / "pack.json").read_text())
    folders = tuple(sorted((pack_dir / "real").iterdir()))

    def config(model: str, steps: int) -> PretrainConfig:
        return PretrainConfig(
            out=out / f"{model}.safetensors",
            data=folders,
            model=model,
            steps=steps,
            warmup=max(10, steps // 20),
            sim_pool=meta["sims"],
            sim_cache=pack_dir / "sims",
            val_every=max(1, steps // 5),
            ckpt_every=steps + 1,
            half=True,
            progress=False,
            # the pools in the pack were simulated with the pack's seed: train with the same one
            **{**RECIPE, "seed": meta["seed"]},
        )

    t0 = time.perf_counter()
    per_step = {m: step_seconds(config(m, 100)) for m in models}
    left = budget_s - (time.perf_counter() - t0)
    # a run also loads its data and validates 6 times: keep a tenth of the budget for that
    steps = max(20, math.floor(0.9 * left / sum(per_step.values())))
    summary["steps"], summary["step_s"] = steps, per_step
    print(f"step seconds {per_step}; {steps} steps each in {left:.0f} s", flush=True)
    for model in models:
        start = time.perf_counter()
        result = pretrain(config(model, steps))
        summary[model] = {
            "version": result.card["version"],
            "seconds": round(time.perf_counter() - start, 1),
            "metrics": result.card["metrics"],
            "first": result.history[0],
        }
        print(json.dumps({model: summary[model]}, indent=1), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m encoder.gpu_job", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write the pretraining set as a small folder for a GPU node")
    p.add_argument("--data", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--sims", type=int, default=512)
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    r = sub.add_parser("run", help="bench and pretrain on the GPU node")
    r.add_argument("--pack", type=Path, default=None, help="the pack folder (needed to pretrain)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--models", default="lvm_mini,lvm_small", help="variants to pretrain, same steps")
    r.add_argument("--bench", default="lvm_paper,lvm_small,lvm_mini,lvm_tiny", help="variants to bench")
    r.add_argument("--bench-batch", type=int, default=256)
    r.add_argument("--compile", action="store_true", help="also bench the embedding under torch.compile")
    r.add_argument("--budget-s", type=float, default=300.0, help="seconds for probing and pretraining")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if args.cmd == "pack":
        print(json.dumps(pack(args.data, args.out, size=args.size, sims=args.sims, seed=args.seed)))
    else:
        run(
            args.pack,
            args.out,
            models=[m for m in args.models.split(",") if m],
            budget_s=args.budget_s,
            bench=[m for m in args.bench.split(",") if m],
            bench_batch=args.bench_batch,
            compile=args.compile,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
