"""A small sky for the dashboard tests (not a test module): tiles with real stored pixels,
embeddings in two clusters, lens and morphology scores, alerts and dead letters."""

from __future__ import annotations

import json
import uuid
from typing import Any

import astropy.units as u
import fsspec
import numpy as np
from astropy_healpix import HEALPix
from sqlalchemy import Engine, text

from db import repo
from db.models import EmbeddingCreate, ModelVersionCreate, TileCreate
from galsift import objectstore
from galsift.constants import HEALPIX_ORDER
from galsift.messages import tile_id
from galsift.settings import Settings

N_LENSES, N_OTHERS = 40, 80


class Sky:
    """The test table: a survey of its own, one model version, which tiles are lenses."""

    def __init__(self, engine: Engine, settings: Settings, *, name: str) -> None:
        rng = np.random.default_rng(11)
        uid = uuid.uuid4().hex[:6]
        self.survey = f"{name}-{uid}"
        self.version = f"{name}-lvm-{uid}"
        n = N_LENSES + N_OTHERS
        self.is_lens = np.r_[np.ones(N_LENSES, bool), np.zeros(N_OTHERS, bool)]
        self.ra = rng.uniform(150.0, 150.5, n)
        self.dec = rng.uniform(2.0, 2.5, n)
        hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested", frame="icrs")
        base = settings.pixel_store_url.rstrip("/")
        tiles = []
        for i in range(n):
            flux = rng.normal(0.0, 0.01, (3, 32, 32)).astype(np.float32)
            flux[:, 12:20, 12:20] += 0.5 if self.is_lens[i] else 0.2
            blob, checksum = objectstore.encode_array(flux)
            uri = f"{base}/{self.survey}/t{i}.npy"
            with fsspec.open(uri, "wb", auto_mkdir=True) as fh:
                fh.write(blob)
            tiles.append(
                TileCreate(
                    id=uuid.UUID(tile_id(self.survey, f"t{i}")),
                    survey=self.survey,
                    external_id=f"t{i}",
                    ra=float(self.ra[i]),
                    dec=float(self.dec[i]),
                    healpix=int(hp.lonlat_to_healpix(self.ra[i] * u.deg, self.dec[i] * u.deg)),
                    bands=["g", "r", "z"],
                    pixel_scale=0.262,
                    shape=[3, 32, 32],
                    dtype="float32",
                    pixels_uri=uri,
                    checksum=checksum,
                )
            )
        self.ids = [t.id for t in tiles]
        with engine.begin() as c:
            c.execute(
                text("INSERT INTO surveys (name, description) VALUES (:s, '') ON CONFLICT DO NOTHING"),
                {"s": self.survey},
            )
        repo.upsert_tiles(engine, tiles)
        repo.register_model_version(
            engine,
            ModelVersionCreate(
                name=self.version, variant="lvm_tiny", checkpoint_uri="file:///c", checksum="a" * 64
            ),
        )
        centre_a, centre_b = rng.normal(size=(2, 256))
        vecs = np.concatenate(
            [
                centre_a + 2.0 * rng.normal(size=(N_LENSES, 256)),
                centre_b + 2.0 * rng.normal(size=(N_OTHERS, 256)),
            ]
        ).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        repo.upsert_embeddings(
            engine,
            [
                EmbeddingCreate(tile_id=t, model_version=self.version, embedding=v.tolist())
                for t, v in zip(self.ids, vecs, strict=True)
            ],
        )
        self.lens_score = np.where(self.is_lens, rng.uniform(0.8, 1.0, n), rng.uniform(0.0, 0.3, n))
        with engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO detections (tile_id, model_version, detector, label, score, extra) "
                    "SELECT unnest(CAST(:ids AS uuid[])), :v, 'lens_finder', 'lens', unnest(CAST(:s AS float8[])), '{}'"
                ),
                {"ids": self.ids, "v": self.version, "s": self.lens_score.tolist()},
            )
            for i in range(4):  # the newest alert is a known lens
                xm = json.dumps({"known": i == 3, "match": {"name": f"KNOWN J{i}"}})
                c.execute(
                    text(
                        "INSERT INTO alerts (tile_id, model_version, kind, score, crossmatch, created_at) "
                        "VALUES (:t, :v, 'lens', :s, CAST(:x AS jsonb), now() + make_interval(secs => :i))"
                    ),
                    {"t": self.ids[i], "v": self.version, "s": float(self.lens_score[i]), "x": xm, "i": i},
                )
            c.execute(
                text(
                    'INSERT INTO ingest_errors (stage, reason, detail, topic, partition, "offset", payload) '
                    "VALUES ('ingest', :r, :d, 'tiles.raw', 0, 1, '\\x00')"
                ),
                {"r": f"bad_{uid}", "d": self.survey},
            )
        self.good_of = dict(zip(self.ids, self.is_lens.tolist(), strict=True))


def env_of(settings: Settings) -> dict[str, Any]:
    """``GALSIFT_*`` variables that give an app process exactly ``settings``."""
    from deploy.cli import service_env

    return {k: v for k, v in service_env(settings, base={}).items() if k.startswith("GALSIFT_")}
