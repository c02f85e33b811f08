"""Real tiles through real Kafka into PostgreSQL and the object store, read back bit-exactly."""

from __future__ import annotations

import uuid
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from astropy_healpix import HEALPix
from ingest_support import StageRunner, count_tiles, isolated_settings, read_topic, tile_rows
from PIL import Image
from sqlalchemy import Engine

from db.repo import count_rows
from galsift import messages
from galsift.constants import HEALPIX_ORDER
from galsift.objectstore import read_array
from galsift.settings import Settings
from ingest.publish import publish_paths
from ingest.service import IngestStage

pytestmark = pytest.mark.integration


def _wcs_centre(path: Path) -> SkyCoord:
    """The image centre through astropy alone, independent of ingest.readers."""
    header = fits.getheader(path)
    wcs = WCS(header, naxis=2)
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    return wcs.pixel_to_world((nx - 1) / 2, (ny - 1) / 2)


def test_real_tiles_are_stored_once_with_wcs_positions_and_exact_pixels(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    settings = isolated_settings(stack_settings, "pipeline", batch_size=16)
    uid = uuid.uuid4().hex[:6]
    dr9, lens, gz = f"dr9_{uid}", f"cfhtls_{uid}", f"gzx_{uid}"
    reports = [
        publish_paths(settings, [repo_data / "legacy_dr9_fits"], survey=dr9),
        publish_paths(settings, [repo_data / "cfhtls_lens_candidates"], survey=lens, limit=20),
        publish_paths(settings, [repo_data / "gz_decals_examples"], survey=gz, limit=20),
    ]
    assert [r.published for r in reports] == [3, 20, 20] and all(r.failed == 0 for r in reports)
    n = 43

    stage = IngestStage(settings, engine, group_id=f"ingest-{uid}")
    synced: list[str] = []  # the keys whose directories the stage synced before committing
    sync_dirs = stage.store.sync_dirs

    def record_sync(keys: list[str]) -> None:
        synced.extend(keys)
        sync_dirs(keys)

    stage.store.sync_dirs = record_sync  # type: ignore[method-assign]
    counters = StageRunner(stage, idle_exit_s=5.0).start().join(timeout_s=300)
    assert (counters.consumed, counters.accepted, counters.rejected) == (n, n, 0)
    assert stage.store.durable and len(set(synced)) == n  # every tile's name made durable

    surveys = [dr9, lens, gz]
    assert count_tiles(engine, surveys) == (n, n)
    rows = {(r["survey"], r["external_id"]): r for r in tile_rows(engine, surveys)}
    hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested")

    dr9_files = sorted((repo_data / "legacy_dr9_fits").glob("*.fits"))
    assert len(dr9_files) == 3
    for path in dr9_files:
        row = rows[(dr9, path.stem)]
        assert str(row["id"]) == messages.tile_id(dr9, path.stem)
        centre = _wcs_centre(path)
        assert SkyCoord(row["ra"] * u.deg, row["dec"] * u.deg).separation(centre) < 1 * u.mas
        assert row["healpix"] == int(hp.lonlat_to_healpix(centre.ra, centre.dec))
        assert row["bands"] == ["g", "r", "z"] and row["shape"] == [3, 256, 256]
        assert row["dtype"] == "float32" and row["pixel_scale"] == pytest.approx(0.262)
        assert "CRVAL1" in row["meta"]["fits_header"]
        # bit-exact pixels, and the stored checksum is the file's (read_array verifies it)
        stored = read_array(row["pixels_uri"], checksum=row["checksum"])
        expected = np.asarray(fits.getdata(path), dtype=np.float32)
        assert stored.dtype == np.float32 and stored.tobytes() == expected.tobytes()
        with open(row["pixels_uri"].removeprefix("file://"), "rb") as fh:
            assert messages.sha256(fh.read()) == row["checksum"]

    for survey, folder in ((lens, "cfhtls_lens_candidates"), (gz, "gz_decals_examples")):
        for (s, external_id), row in rows.items():
            if s != survey:
                continue
            stored = read_array(row["pixels_uri"], checksum=row["checksum"])
            with Image.open(repo_data / folder / row["meta"]["file"]) as im:
                rgb = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            assert stored.dtype == np.uint8 and np.array_equal(stored, rgb)
            assert row["bands"] == ["R", "G", "B"]
            if survey == lens:
                assert (row["ra"], row["dec"]) == (float(row["meta"]["ra"]), float(row["meta"]["dec"]))
                assert row["healpix"] is not None and "lens" in row["meta"]
            else:
                assert row["ra"] is None and row["healpix"] is None and "answer" in row["meta"]
            assert external_id == Path(row["meta"]["file"]).stem

    accepted = read_topic(settings, settings.topics.accepted)
    values = [messages.decode("accepted", r.value, header=messages.header_value(r.headers)) for r in accepted]
    assert len(values) == n
    by_id = {v["tile_id"]: v for v in values}
    assert set(by_id) == {str(r["id"]) for r in rows.values()}
    for row in rows.values():
        v = by_id[str(row["id"])]
        assert (v["checksum"], v["pixels_uri"], v["healpix"]) == (
            row["checksum"],
            row["pixels_uri"],
            row["healpix"],
        )
    assert {r.key for r in accepted} == {f"{s}/{e}".encode() for s, e in rows}
    assert read_topic(settings, settings.topics.dead) == []


def test_republishing_is_idempotent(stack_settings: Settings, engine: Engine, repo_data: Path) -> None:
    settings = isolated_settings(stack_settings, "republish")
    survey = f"again_{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        assert publish_paths(settings, [repo_data / "legacy_dr9_fits"], survey=survey, limit=3).published == 3
    stage = IngestStage(settings, engine, group_id=f"ingest-{survey}")
    counters = StageRunner(stage, idle_exit_s=4.0).start().join(timeout_s=120)
    assert counters.consumed == 6 and counters.rejected == 0
    assert count_tiles(engine, [survey]) == (3, 3)


def test_bench_ingest_measures_and_cleans_up(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    from deploy.stack import kafka_admin
    from ingest.bench import bench_ingest

    before = count_rows(engine, "tiles")
    doc = bench_ingest(stack_settings, data=repo_data / "legacy_dr9_fits", n=12, repeat=3)
    assert doc["command"] == "bench ingest" and doc["data"].endswith("legacy_dr9_fits")
    rows = {r["model"]: r for r in doc["results"]}
    assert set(rows) == {
        "upsert_batched",
        "upsert_row_by_row",
        "publish",
        "kafka_raw_consume",
        "ingest_stage",
    }
    assert all(r["per_s"] > 0 and r["n"] == 12 for r in rows.values())
    # throughput in bytes too, beside tiles, for the Kafka rows
    assert all(rows[m]["mb_per_s"] > 0 for m in ("publish", "kafka_raw_consume", "ingest_stage"))
    assert rows["upsert_row_by_row"]["calls"] == 12
    # three stream runs: each row is the median one, and every run's rate is kept
    for m in ("publish", "kafka_raw_consume", "ingest_stage"):
        runs = rows[m]["per_s_runs"]
        assert len(runs) == 3 and rows[m]["per_s"] == sorted(runs)[1]
    assert count_rows(engine, "tiles") == before
    with kafka_admin(stack_settings) as admin:
        assert not [t for t in admin.list_topics() if t.startswith("bench.")]
