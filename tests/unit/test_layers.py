"""The one-way layers of the README's layout, checked by import-linter's contracts in pyproject.toml.

``galsift/`` knows no table and no stage, ``db/`` knows no stage, ``deploy/`` starts stages as
commands, and the stages meet only through Kafka and the database.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _keep_loggers() -> Iterator[None]:
    """import-linter configures logging with dictConfig, which disables every existing logger."""
    before = {
        name: lg.disabled
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    yield
    for name, disabled in before.items():
        logging.getLogger(name).disabled = disabled


def test_layer_contracts_hold(capsys: pytest.CaptureFixture[str]) -> None:
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        status = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert status == EXIT_STATUS_SUCCESS, out
    assert "BROKEN" not in out and "KEPT" in out


def test_a_stage_importing_another_breaks_a_contract(tmp_path: Path) -> None:
    """The check can fail: a configuration whose contract the code breaks is reported."""
    config = tmp_path / "layers.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["galsift", "ingest"]\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "ingest must not use galsift (false on purpose)"\n'
        'type = "forbidden"\n'
        'source_modules = ["ingest"]\n'
        'forbidden_modules = ["galsift"]\n'
    )
    cwd = Path.cwd()
    os.chdir(REPO)
    try:
        status = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    assert status != EXIT_STATUS_SUCCESS
