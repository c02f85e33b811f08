"""Pure helpers of the dashboard: cone filters as HEALPix ranges, result tables and their exports."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import astropy.units as u
import numpy as np
from astropy.io.votable import parse_single_table
from astropy_healpix import HEALPix

from dashboard import data, widgets
from galsift.constants import HEALPIX_ORDER


def test_cone_ranges_cover_every_pixel_of_the_cone() -> None:
    hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested", frame="icrs")
    rng = np.random.default_rng(3)
    for ra, dec, radius in ((150.1, 2.2, 0.05), (10.0, -80.0, 2.0), (200.0, 30.0, 15.0)):
        ranges = data.cone_ranges(ra, dec, radius)
        assert 0 < len(ranges) <= data.MAX_CONE_RANGES
        assert all(lo < hi for lo, hi in ranges)
        # points inside the cone fall in a range
        sep = rng.uniform(0, radius, 200)
        pa = rng.uniform(0, 360, 200)
        from astropy.coordinates import SkyCoord

        pts = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa * u.deg, sep * u.deg)
        pix = hp.lonlat_to_healpix(pts.ra, pts.dec)
        lo = np.array([r[0] for r in ranges])
        hi = np.array([r[1] for r in ranges])
        inside = ((pix[:, None] >= lo) & (pix[:, None] < hi)).any(axis=1)
        assert inside.all()


def test_result_table_exports_csv_and_votable_with_units_and_gaps() -> None:
    rows: list[dict[str, Any]] = [
        {
            "id": uuid.uuid4(),
            "ra": 150.1,
            "dec": 2.2,
            "similarity": 0.9,
            "pixels_uri": "file:///x",
            "known": True,
        },
        {
            "id": uuid.uuid4(),
            "ra": None,
            "dec": None,
            "similarity": 0.5,
            "pixels_uri": "file:///y",
            "known": None,
        },
    ]
    table = widgets.to_table(rows)
    assert table.colnames == ["id", "ra", "dec", "similarity", "known"]
    assert table["ra"].unit == u.deg and bool(table["ra"].mask[1])
    back = parse_single_table(io.BytesIO(widgets.votable_bytes(table))).to_table()
    assert back["ra"].unit == u.deg and back["similarity"][0] == 0.9
    assert str(back["id"][0]) == str(rows[0]["id"])
    csv = io.StringIO()
    table.write(csv, format="ascii.csv")
    assert csv.getvalue().splitlines()[0] == "id,ra,dec,similarity,known"


def test_votable_export_writes_nothing_past_its_buffers() -> None:
    """Rows of every XML length across 256, 512 and 1024 bytes through the dashboard's VOTable export,
    under Python's debug allocator, which aborts on a byte written past a block's end.

    astropy's C TABLEDATA writer writes a NUL one past its buffer when a row is exactly 256, 512
    or 1024 bytes long; it corrupted the heap and crashed the AppTest tests far from the cause
    (see :func:`dashboard.widgets.votable_bytes`). In a child process: the debug allocator must
    be chosen at start-up, and an abort there is a failure here, not the end of pytest.
    """
    script = textwrap.dedent(
        """
        from astropy.table import MaskedColumn, Table
        from dashboard import widgets

        for n in range(100, 1100):
            table = Table()
            table.add_column(MaskedColumn(["x" * n, "y"], name="s", mask=[False, False]))
            table.add_column(MaskedColumn([1.5, 0.0], name="ra", mask=[False, True]))
            widgets.votable_bytes(table)
        print("clean")
        """
    )
    env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr[-4000:]


def test_filters_active() -> None:
    assert not data.Filters().active
    assert data.Filters(lens_min=0.5).active and data.Filters(surveys=("a",)).active
