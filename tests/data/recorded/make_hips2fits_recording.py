"""Re-create the recorded hips2fits exchange used by the offline adapter tests.

The machine that wrote these tests has no network access, so the recording is synthesised in the
format hips2fits answers a ``format=fits`` query with: one single-extension FITS per band, a
2-d float32 image of the requested width x height, and a 2-axis TAN WCS (CRPIX at the image centre,
CDELT = -/+ fov/width, RADESYS ICRS). The pixels and position are real: the centre 64x64 pixels
of one DESI Legacy Surveys DR9-south cutout, ``SOURCE`` below, looked up in the folder given on the
command line (the bundled demo tiles, ``ingest/demo_tiles``, hold it). The request parameters are exactly
what the adapter sends (checked by the tests, so a change in the request shows up).

Run from the repository root:
    .venv/bin/python tests/data/recorded/make_hips2fits_recording.py ingest/demo_tiles
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from ingest.adapters.legacysurvey import LegacySurveysClass

HERE = Path(__file__).resolve().parent
SOURCE = "legacy_dr9_fits/cutout_0.1286636143922805_-1.2130041122436523.fits"
SIZE = 64
SERVER = "https://alasky.cds.unistra.fr/hips-image-services/hips2fits"


def main(source_dir: Path) -> None:
    """Write the recording from ``source_dir / SOURCE``."""
    cube = fits.getdata(source_dir / SOURCE).astype(np.float32)
    header = fits.getheader(source_dir / SOURCE)
    ra, dec = float(header["CRVAL1"]), float(header["CRVAL2"])
    coord = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    adapter = LegacySurveysClass()
    payloads = adapter.query_payloads(coord, size=SIZE, pixel_scale=0.262 * u.arcsec, bands="grz")
    lo = (cube.shape[1] - SIZE) // 2
    exchanges = []
    for band_index, (band, params) in enumerate(zip("grz", payloads, strict=True)):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [params["ra"], params["dec"]]
        wcs.wcs.crpix = [SIZE / 2 + 0.5, SIZE / 2 + 0.5]
        wcs.wcs.cdelt = [-params["fov"] / SIZE, params["fov"] / SIZE]
        wcs.wcs.cunit = ["deg", "deg"]
        wcs.wcs.radesys = "ICRS"
        data = np.ascontiguousarray(cube[band_index, lo : lo + SIZE, lo : lo + SIZE])
        hdu = fits.PrimaryHDU(data=data, header=wcs.to_header())
        name = f"hips2fits_dr9_cutout_{band}.fits"
        hdu.writeto(HERE / name, overwrite=True)
        exchanges.append(
            {
                "method": "GET",
                "url": SERVER,
                "params": params,
                "status": 200,
                "content_type": "application/fits",
                "body_file": name,
            }
        )
    doc = {
        "description": "hips2fits answers for a g,r,z 64x64 cutout at 0.262 arcsec/px (synthesised, see make_hips2fits_recording.py)",
        "source": SOURCE,
        "coord_deg": [ra, dec],
        "size": SIZE,
        "pixel_scale_arcsec": 0.262,
        "bands": ["g", "r", "z"],
        "exchanges": exchanges,
    }
    (HERE / "hips2fits_dr9_cutout.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SOURCE_FOLDER  (the folder holding {SOURCE})")
    main(Path(sys.argv[1]))
