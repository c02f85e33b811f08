"""Fixtures shared by every test: where the real galaxy data is.

The tests read only data inside the repository: the demo tiles bundled in ``ingest/demo_tiles/`` (real,
permissively licensed survey images; see ``ingest/demo_tiles/ATTRIBUTION.md``) and ``tests/data/``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

#: the repository root (tests/ is one level below it)
REPO = Path(__file__).resolve().parent.parent
#: the bundled demo data sets
DEMO_DATA = REPO / "ingest" / "demo_tiles"
#: the data sets every test may rely on
DEMO_SETS = ("cfhtls_lens_candidates", "gz_decals_examples", "legacy_dr9_fits")


@pytest.fixture(scope="session")
def repo_data() -> Path:
    """The bundled real data folder ``ingest/demo_tiles/`` (``legacy_dr9_fits/``, ``cfhtls_lens_candidates/``,
    ``gz_decals_examples/``).

    Fails, never skips, when a set is missing: a test that needs real data must not pass quietly.
    """
    missing = [name for name in DEMO_SETS if not (DEMO_DATA / name).is_dir()]
    if missing:
        pytest.fail(f"bundled data missing under {DEMO_DATA}: {', '.join(missing)}", pytrace=False)
    return DEMO_DATA


@pytest.fixture(scope="session")
def small_lenses(repo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 lenses and 12 non-lenses of the real CFHTLS Space Warps candidates, interleaved."""
    src = repo_data / "cfhtls_lens_candidates"
    with (src / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pos = [r for r in rows if r["lens"] == "1"][:12]
    neg = [r for r in rows if r["lens"] == "0"][:12]
    assert len(pos) == len(neg) == 12
    folder = tmp_path_factory.mktemp("lenses") / "small"
    (folder / "images").mkdir(parents=True)
    picked = [r for pair in zip(pos, neg, strict=True) for r in pair]
    for r in picked:
        shutil.copy(src / r["file"], folder / r["file"])
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "lens"])
        writer.writeheader()
        writer.writerows({"file": r["file"], "lens": r["lens"]} for r in picked)
    return folder
