"""``galsift bench encoder``: encoder throughput and its share of the device's matrix rate.

In one process: (1) a large matrix multiplication measures what the device can do (float32 on
CPU, bfloat16 on CUDA); (2) each model's FLOPs per forward are counted by
:class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, the work that
matters); (3) forwards are timed after a warm-up. The fraction ``achieved FLOP/s / matmul FLOP/s``
says how well a model uses the hardware. The reference is timm's ``swin_base_patch4_window7_224``
(random weights, ``pretrained=False``) at its native 224 px, timed the same way.

Rows: the LVM's ``embed`` (encoder + pooled embedding, what the embedding service runs), its
``reconstruct`` (the whole U-Net), and the baseline's forward.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def matmul_rate(device: torch.device, *, seconds: float = 1.5) -> tuple[float, str, int]:
    """Measured FLOP/s of a square matrix product: float32 n=1024 on CPU, bfloat16 n=8192 on CUDA.

    Returns
    -------
    tuple
        ``(flop_per_s, dtype name, n)``.
    """
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            _sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    elapsed = time.perf_counter() - t0
    return 2.0 * n**3 * reps / elapsed, str(dtype).removeprefix("torch."), n


def count_flops(fn: Callable[[Tensor], Any], x: Tensor) -> int:
    """FLOPs of one call ``fn(x)`` as counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(x)
    return int(counter.get_total_flops())


def time_forward(
    fn: Callable[[Tensor], Any], x: Tensor, device: torch.device, *, seconds: float, min_iters: int = 3
) -> list[float]:
    """Seconds per call of ``fn(x)``, after one warm-up call, for about ``seconds`` in total."""
    with torch.inference_mode(), _autocast(device):
        fn(x)
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_iters or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


def _row(
    name: str,
    task: str,
    fn: Callable[[Tensor], Any],
    x: Tensor,
    device: torch.device,
    *,
    seconds: float,
    peak: float,
    flops: int | None = None,
) -> dict[str, Any]:
    flops = count_flops(fn, x) if flops is None else flops
    times = time_forward(fn, x, device, seconds=seconds)
    per_batch = statistics.median(times)
    achieved = flops / per_batch
    q = statistics.quantiles(times, n=20) if len(times) >= 2 else [per_batch] * 19
    return {
        "model": name,
        "task": task,
        "img_size": int(x.shape[-1]),
        "batch": int(x.shape[0]),
        "iters": len(times),
        "per_s": x.shape[0] / per_batch,
        "p50_ms": per_batch * 1e3,
        "p95_ms": q[18] * 1e3,
        "gflop_per_image": flops / x.shape[0] / 1e9,
        "tflop_s": achieved / 1e12,
        "fraction_of_matmul": achieved / peak,
    }


def bench_encoder(
    *,
    model: str | None = None,
    batch: int | None = None,
    device: str = "auto",
    seconds: float | None = None,
    baseline: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Benchmark an LVM variant against timm's swin_base in one process.

    Parameters
    ----------
    model
        Registered LVM variant; default ``lvm_tiny`` on CPU, ``lvm_paper`` on CUDA.
    batch
        Images per forward; default 4 on CPU, 64 on CUDA.
    device
        Torch device or ``auto``.
    seconds
        Timed seconds per row (default 8 on CPU, 5 on CUDA).
    baseline
        Also time ``swin_base_patch4_window7_224``.
    compile
        Also time the embedding through ``torch.compile`` (TorchInductor); its compilation
        happens in the untimed warm-up call.

    Returns
    -------
    dict
        The ``--json`` document: command, device, matmul rate and one row per measured model.
    """
    import timm

    from encoder.models import create_model

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    on_gpu = dev.type == "cuda"
    name = model or ("lvm_paper" if on_gpu else "lvm_tiny")
    batch = batch or (64 if on_gpu else 4)
    seconds = seconds or (5.0 if on_gpu else 8.0)
    peak, peak_dtype, n = matmul_rate(dev)

    def prepare(m: nn.Module, size: int) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        m = m.eval().to(dev)
        x = torch.rand(batch, 3, size, size, device=dev)
        if on_gpu:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return m, x

    built: Any = create_model(name, drop_path_rate=0.0)
    lvm: Any
    lvm, x = prepare(built, int(built.img_size))
    rows = [
        _row(name, "embed", lvm.embed, x, dev, seconds=seconds, peak=peak),
        _row(name, "reconstruct", lvm.forward, x, dev, seconds=seconds, peak=peak),
    ]
    if compile:
        # the same work as the eager embedding: count its FLOPs there
        flops = round(rows[0]["gflop_per_image"] * 1e9 * batch)
        compiled = torch.compile(lvm.embed)
        rows.append(_row(name, "embed, compiled", compiled, x, dev, seconds=seconds, peak=peak, flops=flops))
    del lvm
    if baseline:
        ref_name = "swin_base_patch4_window7_224"
        ref, xr = prepare(timm.create_model(ref_name, pretrained=False), 224)
        rows.append(_row(ref_name, "forward", ref.forward, xr, dev, seconds=seconds, peak=peak))
    device_name = torch.cuda.get_device_name(dev) if on_gpu else (platform.processor() or platform.machine())
    return {
        "command": "bench encoder",
        "data": None,
        "model_version": name,
        "device": f"{dev.type}: {device_name}, {torch.get_num_threads()} threads",
        "precision": "bf16 autocast" if on_gpu else "float32",
        "matmul": {"dtype": peak_dtype, "n": n, "tflop_s": peak / 1e12},
        "results": rows,
    }


def format_bench(report: dict[str, Any]) -> str:
    """The benchmark as a table."""
    mm = report["matmul"]
    lines = [
        f"device: {report['device']}; precision: {report['precision']}; "
        f"matmul {mm['dtype']} n={mm['n']}: {mm['tflop_s'] * 1e3:.1f} GFLOP/s",
        f"{'model':<30} {'task':<16} {'px':>4} {'batch':>5} {'img/s':>9} {'p50 ms':>9} "
        f"{'GFLOP/img':>10} {'GFLOP/s':>9} {'of matmul':>9}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['model']:<30} {r['task']:<16} {r['img_size']:>4} {r['batch']:>5} {r['per_s']:>9.1f} "
            f"{r['p50_ms']:>9.1f} {r['gflop_per_image']:>10.3f} {r['tflop_s'] * 1e3:>9.1f} "
            f"{r['fraction_of_matmul']:>9.1%}"
        )
    return "\n".join(lines)
