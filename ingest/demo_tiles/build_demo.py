"""Rebuild the bundled demo tiles from the shared data folder (run once; the result is committed).

Picks, deterministically, only permissively licensed images (see ATTRIBUTION.md):
60 Galaxy Zoo DECaLS example images (all with a ``morphology`` label, then others spread over
the decision tree), 60 CFHTLS Space Warps lens candidates (lenses, non-lenses and undecided),
and 3 DESI Legacy Surveys DR9 FITS cutouts. Never the GPL-3.0 ``gz_decals_rings`` set.

Usage (from the repository root)::

    .venv/bin/python ingest/demo_tiles/build_demo.py ../shared/data
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the Space Warps CFHTLS stamps are 30 arcsec fields rendered at 256 px
CFHTLS_PIXEL_SCALE = 30.0 / 256


def _rows(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (folder / "labels.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _spread(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def _write(name: str, source: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    out = HERE / name
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for row in rows:
        shutil.copyfile(source / row["file"], out / row["file"])
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(shared: Path) -> None:
    """Copy the picked files from ``shared`` (the shared data folder) next to this script."""
    columns, rows = _rows(shared / "gz_decals_examples")
    labelled = [r for r in rows if r["morphology"]]
    others = [r for r in rows if not r["morphology"]]
    picked = labelled + _spread(others, 60 - len(labelled))
    picked.sort(key=rows.index)
    _write("gz_decals_examples", shared / "gz_decals_examples", columns, picked)

    columns, rows = _rows(shared / "cfhtls_lens_candidates")
    lenses = [r for r in rows if r["lens"] == "1"]
    non = [r for r in rows if r["lens"] == "0"]
    undecided = [r for r in rows if r["lens"] == ""]
    picked = _spread(lenses, 20) + _spread(non, 25) + _spread(undecided, 15)
    picked.sort(key=rows.index)
    for r in picked:
        r["pixel_scale"] = f"{CFHTLS_PIXEL_SCALE:.7f}"
    _write("cfhtls_lens_candidates", shared / "cfhtls_lens_candidates", [*columns, "pixel_scale"], picked)

    out = HERE / "legacy_dr9_fits"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for fits in sorted((shared / "legacy_dr9_fits").glob("*.fits"))[:3]:
        shutil.copyfile(fits, out / fits.name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
