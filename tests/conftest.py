"""Fixtures shared by every test: where the real galaxy data is."""

from __future__ import annotations

from pathlib import Path

import pytest

#: the repository root (tests/ is one level below it)
REPO = Path(__file__).resolve().parent.parent
#: where the shared data folder is looked for, in order, unless --shared-data names one
DATA_CANDIDATES = (REPO.parent / "shared" / "data", REPO / "shared" / "data")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared-data",
        type=Path,
        default=None,
        help="folder of the real galaxy data sets (default: <repo>/../shared/data)",
    )


@pytest.fixture(scope="session")
def shared_data(pytestconfig: pytest.Config) -> Path:
    """The read-only real data folder (``legacy_dr9_fits/``, ``gz_decals_rings/``, …).

    Fails, never skips, when it is missing: a test that needs real data must not pass quietly.
    """
    option = pytestconfig.getoption("--shared-data")
    candidates = (Path(option),) if option is not None else DATA_CANDIDATES
    for path in candidates:
        path = path.expanduser().resolve()
        if (path / "README.md").is_file():
            return path
    pytest.fail(
        "real data not found (looked for README.md in "
        + ", ".join(str(p) for p in candidates)
        + "); point --shared-data at the shared data folder",
        pytrace=False,
    )
