#!/usr/bin/env python3
"""Mutation checks of the fault-injection suite: each fault row must fail without its protection.

Every ``tests/mutants/<row>-<what>.patch`` removes one protection from the code (its header,
before the diff, says which, and names the suite row that must catch it on a ``Row:`` line). For
each patch (or only those named on the command line) this script checks HEAD out into a
temporary ``git worktree``, applies the patch there, makes sure the mutated modules are the ones
Python imports in that copy (``PYTHONPATH`` points at the copy, ahead of the venv's editable
install of the main checkout; the services the suite starts inherit it), and runs only the
patch's row of ``tests/integration/test_faults.py``::

    FAULTS_ONLY=<row> <repo>/.venv/bin/python -m pytest -m faults -p no:cacheprovider \\
        tests/integration/test_faults.py -x

A mutant is KILLED when the suite fails (as it must) and SURVIVED when it passes (see
:func:`outcome` for NOT RUN and ERROR). The results are
printed as a table, with the first line of the failing assertion; ``--json PATH`` writes them.
One suite runs at a time (it starts its own Kafka broker and PostgreSQL).

Usage: ``python tests/mutants/run.py [--json PATH] [--deadline S] [--logs DIR] [PATCH ...]``
(``--deadline 100`` keeps a killed mutant to a few minutes: a broken protection often shows as
a wait that never ends).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SUITE = "tests/integration/test_faults.py"
#: processes of the stack the suite starts: none of them may outlive a run
_STACK = "kafka|postgres"
#: the data directory of the suite's own stack (``tmp_path_factory.mktemp("faults")``)
_SUITE_DATA = re.compile(r"pytest-of-[^/]+/pytest-[^/]+/faults\d*/")


@dataclass
class Result:
    """The outcome of one mutant."""

    mutant: str
    row: str
    protection: str
    result: str
    seconds: float
    failure: str
    #: the suite's summary-table lines of the faults it ran (lost, duplicated, recovery)
    summary: list[str]
    not_run: list[str]
    stray_processes: list[str]
    #: the suite's FAULTS_DEADLINE_S in this run (None: its default)
    deadline_s: float | None = None


def parse_header(patch: Path) -> tuple[str, str]:
    """The row a patch targets and the protection it removes, from its header.

    Parameters
    ----------
    patch : Path
        A patch whose lines before ``diff --git`` include ``Row: <key>`` and
        ``Protection removed: <text>`` (possibly continued on the following lines).

    Returns
    -------
    tuple of str
        The ``FAULTS_ONLY`` row key and the protection's description.
    """
    head = patch.read_text().split("\ndiff --git", 1)[0]
    row = re.search(r"^Row:\s*(\S+)", head, re.M)
    if row is None:
        raise ValueError(f"{patch.name}: no 'Row:' line in its header")
    prot = re.search(r"^Protection removed:\s*(.*?)(?:\n\S+:|\Z)", head, re.M | re.S)
    text = " ".join(prot.group(1).split()) if prot else ""
    return row.group(1), text


def stack_processes() -> set[str]:
    """``pid command`` of every Kafka or PostgreSQL process of a fault suite now running.

    Only processes whose command line names a fault suite's data directory (pytest's
    ``faults<N>`` temporary directory) count: other stacks on the machine are not the suite's.
    """
    out = subprocess.run(["pgrep", "-af", _STACK], capture_output=True, text=True, check=False).stdout
    return {line.strip() for line in out.splitlines() if _SUITE_DATA.search(line) and "pgrep" not in line}


def mutated_modules(patch: Path) -> list[str]:
    """Dotted names of the Python modules a patch changes."""
    files = re.findall(r"^\+\+\+ b/(\S+\.py)$", patch.read_text(), re.M)
    return [f[: -len(".py")].replace("/", ".") for f in files]


def check_imports(copy: Path, modules: list[str], env: dict[str, str], python: str) -> None:
    """Fail unless each of ``modules`` is imported from ``copy`` under ``env`` (as the services are).

    Parameters
    ----------
    copy : Path
        The mutated working tree.
    modules : list of str
        Dotted module names the patch changes.
    env : dict
        The environment the suite (and the services it starts) will run with.
    python : str
        The interpreter the suite runs with.
    """
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    print(importlib.import_module(m).__file__)"
    out = subprocess.run(
        [python, "-c", code, *modules], cwd=copy, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    for module, where in zip(modules, out, strict=True):
        if not Path(where).resolve().is_relative_to(copy.resolve()):
            raise RuntimeError(f"{module} would be imported from {where}, not from the mutated copy {copy}")


def summary_lines(output: str) -> list[str]:
    """The fault rows of the suite's summary table (not the warm-up, not the tail)."""
    lines = output.split("fault-injection summary", 1)[-1].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("----")), None)
    if start is None:
        return []
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if not line.startswith(("no fault", "tail", "(incomplete")):
            rows.append(" ".join(line.split()))
    return rows


def first_failure(output: str) -> str:
    """The failing statement and the first line of its error, from pytest's report.

    The statement is pytest's ``>`` line before the first ``E`` line (the assertion that failed,
    or the wait that timed out); the error is that ``E`` line (for an assertion with a message,
    the message's first line).
    """
    statement = ""
    for line in output.splitlines():
        if line.startswith(">"):
            statement = " ".join(line[1:].split())
        elif line.startswith("E   "):
            error = line[4:].strip()
            # a ``raise`` statement says no more than its error (a wait that timed out)
            shown = statement and not statement.startswith("raise ")
            return (f"{statement} -> {error}" if shown else error)[:300]
    summary = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return summary[0][:300] if summary else ""


def outcome(returncode: int, output: str, not_run: list[str]) -> str:
    """KILLED, SURVIVED, NOT RUN or ERROR, from pytest's exit status and last line.

    Only a failed test kills a mutant: an error in the fixture (the stack did not start) or an
    interrupted run is ERROR, and a passing run whose row printed "NOT RUN" is NOT RUN.
    """
    last = next((line for line in reversed(output.splitlines()) if line.startswith("=")), "")
    if returncode == 0:
        return "NOT RUN" if not_run else "SURVIVED"
    if returncode == 1 and " failed" in last and " error" not in last:
        return "KILLED"
    return "ERROR"


def run_mutant(patch: Path, *, python: str, deadline_s: float | None, log_dir: Path | None) -> Result:
    """Apply one patch to a fresh copy of HEAD and run its row of the fault suite there.

    Parameters
    ----------
    patch : Path
        The mutant.
    python : str
        The interpreter (the repository's venv) that runs the suite.
    deadline_s : float, optional
        ``FAULTS_DEADLINE_S`` for the suite (its longest single wait); None keeps its default.
    log_dir : Path, optional
        Where to keep the suite's whole output, as ``<mutant>.log``.

    Returns
    -------
    Result
        KILLED (the suite failed), SURVIVED (it passed), NOT RUN (its row could not run here) or
        ERROR (the patch did not apply, or the suite errored rather than failed).
    """
    row, protection = parse_header(patch)
    name = patch.name.removesuffix(".patch")
    before = stack_processes()
    tmp = Path(tempfile.mkdtemp(prefix=f"mutant-{name}-"))
    copy = tmp / "tree"
    started = time.monotonic()
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(copy), "HEAD"], check=True
    )
    try:
        applied = subprocess.run(
            ["git", "apply", str(patch.resolve())], cwd=copy, capture_output=True, text=True, check=False
        )
        if applied.returncode != 0:
            return Result(name, row, protection, "ERROR", 0.0, applied.stderr.strip(), [], [], [], deadline_s)
        env = {
            **os.environ,
            "FAULTS_ONLY": row,
            "PYTHONPATH": os.pathsep.join(p for p in (str(copy), os.environ.get("PYTHONPATH")) if p),
        }
        if deadline_s is not None:
            env["FAULTS_DEADLINE_S"] = f"{deadline_s:g}"
        check_imports(copy, mutated_modules(patch), env, python)
        cmd = [python, "-m", "pytest", "-m", "faults", "-p", "no:cacheprovider", SUITE, "-x"]
        print(f"--- {name}: FAULTS_ONLY={row} {' '.join(cmd)}  (in {copy})", flush=True)
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, check=False)
        output = proc.stdout + proc.stderr
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{name}.log").write_text(output)
        not_run = sorted({line.strip() for line in output.splitlines() if "NOT RUN" in line})
        verdict = outcome(proc.returncode, output, not_run)
        failure = "" if proc.returncode == 0 else first_failure(output)
        summary = summary_lines(output)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(copy)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    stray = sorted(stack_processes() - before)
    took = time.monotonic() - started
    return Result(
        name, row, protection, verdict, round(took, 1), failure, summary, not_run, stray, deadline_s
    )


def table(results: list[Result]) -> str:
    """The results as a Markdown table."""
    lines = ["| mutant | row | result | s | failing assertion |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        why = r.failure[:160].replace("|", "\\|")
        lines.append(f"| {r.mutant} | {r.row} | {r.result} | {r.seconds:.0f} | {why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the mutants; exit 1 when one survived or failed to apply.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patches", nargs="*", help="patches (names or paths; default: every *.patch here)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--deadline", type=float, help="FAULTS_DEADLINE_S for the suite (default: its own)")
    parser.add_argument("--logs", type=Path, help="keep each run's whole output here")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="the suite's Python")
    args = parser.parse_args(argv)
    patches = [
        Path(p) if Path(p).exists() else HERE / (p if p.endswith(".patch") else f"{p}.patch")
        for p in args.patches
    ] or sorted(HERE.glob("*.patch"))
    results: list[Result] = []
    for patch in patches:
        result = run_mutant(patch, python=args.python, deadline_s=args.deadline, log_dir=args.logs)
        print(f"{result.mutant}: {result.result} ({result.seconds:.0f} s) {result.failure}", flush=True)
        for line in result.not_run:
            print(f"  {line}")
        if result.stray_processes:
            print(f"  stray processes after the run: {result.stray_processes}")
        results.append(result)
        if args.json is not None:  # after each mutant: a long run interrupted keeps what it has
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print()
    print(table(results))
    return 0 if all(r.result == "KILLED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
