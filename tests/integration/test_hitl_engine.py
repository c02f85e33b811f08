"""The HITL engine against the real PostgreSQL with pgvector: sessions, rounds, labels, saved searches.

The table holds two clusters of unit vectors ("rings" around one direction, "others" around
another, plus spread) for one model version, and a decoy copy of the rings under a second
model version: a round must never show a tile of another version.
"""

from __future__ import annotations

import uuid

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from sqlalchemy import Engine, text

from db import hitl as store
from db import repo
from db.models import EmbeddingCreate, ModelVersionCreate, TileCreate
from galsift.messages import tile_id
from galsift.settings import Settings
from hitl.cli import parse_label, parse_position
from hitl.engine import HitlError, SearchEngine

pytestmark = pytest.mark.integration

N_RINGS, N_OTHERS = 60, 140


def _tile(survey: str, i: int, ra: float, dec: float) -> TileCreate:
    from astropy_healpix import HEALPix

    from galsift.constants import HEALPIX_ORDER

    hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested", frame="icrs")
    return TileCreate(
        id=uuid.UUID(tile_id(survey, f"t{i}")),
        survey=survey,
        external_id=f"t{i}",
        ra=ra,
        dec=dec,
        healpix=int(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)),
        bands=["g", "r", "z"],
        pixel_scale=0.262,
        shape=[3, 8, 8],
        dtype="float32",
        pixels_uri=f"file:///objects/t{i}.npy",
        checksum="0" * 64,
    )


class World:
    """The test table: tile ids, which are rings, and the model versions."""

    def __init__(self, engine: Engine) -> None:
        rng = np.random.default_rng(7)
        self.survey = f"hitl-{uuid.uuid4().hex[:6]}"
        self.version = f"hitl-test-{uuid.uuid4().hex[:6]}"
        self.decoy = f"{self.version}-decoy"
        n = N_RINGS + N_OTHERS
        centre_a, centre_b = rng.normal(size=(2, 256))
        vecs = np.concatenate(
            [
                centre_a + 2.0 * rng.normal(size=(N_RINGS, 256)),
                centre_b + 2.0 * rng.normal(size=(N_OTHERS, 256)),
            ]
        ).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        self.vectors = vecs
        self.is_ring = np.r_[np.ones(N_RINGS, bool), np.zeros(N_OTHERS, bool)]
        self.ra = rng.uniform(150, 151, n)
        self.dec = rng.uniform(2, 3, n)
        tiles = [_tile(self.survey, i, float(self.ra[i]), float(self.dec[i])) for i in range(n)]
        self.ids = [t.id for t in tiles]
        repo.upsert_tiles(engine, tiles)
        for name in (self.version, self.decoy):
            repo.register_model_version(
                engine,
                ModelVersionCreate(
                    name=name, variant="lvm_tiny", checkpoint_uri="file:///c", checksum="a" * 64
                ),
            )
        rows = [
            EmbeddingCreate(tile_id=t, model_version=self.version, embedding=v.tolist())
            for t, v in zip(self.ids, vecs, strict=True)
        ]
        # the decoy version: ring tiles only, so a leak across versions would show up as rings
        rows += [
            EmbeddingCreate(tile_id=t, model_version=self.decoy, embedding=v.tolist())
            for t, v in zip(self.ids[:N_RINGS], vecs[:N_RINGS], strict=True)
        ]
        repo.upsert_embeddings(engine, rows)
        self.ring_of = dict(zip(self.ids, self.is_ring.tolist(), strict=True))


@pytest.fixture(scope="module")
def world(engine: Engine) -> World:
    return World(engine)


def test_rounds_learn_exclude_and_record_strategies(engine: Engine, world: World) -> None:
    hitl = SearchEngine(engine)
    owner = f"ana-{uuid.uuid4().hex[:4]}"
    session = hitl.new_session(
        owner=owner, concept="ring", model_version=world.version, tile_ids=world.ids[:3]
    )
    seen: set[uuid.UUID] = set(world.ids[:3])
    found: list[int] = []
    for r in range(1, 5):
        rnd = hitl.next_round(session.id, k=12)
        assert rnd.round_no == r and len(rnd.shown) == 12
        ids = [s.tile_id for s in rnd.shown]
        assert len(set(ids)) == 12 and not (set(ids) & seen), "a tile was shown twice or a seed was shown"
        seen |= set(ids)
        assert set(ids) <= set(world.ids)
        # similarity-only until a bad label exists, then logistic with an uncertainty pick
        has_negatives = len(found) > 0 and sum(found) < 12 * len(found)
        assert rnd.learner == ("logistic" if has_negatives else "similarity")
        strategies = {s.strategy for s in rnd.shown}
        assert "exploit" in strategies
        assert ("uncertain" in strategies) == has_negatives
        hitl.label(session.id, [(t, world.ring_of[t]) for t in ids])
        found.append(sum(world.ring_of[t] for t in ids))
    # the learner finds the minority cluster far above its 30% share of the table
    assert sum(found) / 48 > 0.6, found
    stored = store.shown_tiles(engine, session.id)
    assert len(stored) == 48 and all(r["good"] is not None for r in stored)
    assert {r["strategy"] for r in stored} >= {"exploit", "uncertain", "diverse"}
    assert store.get_session(engine, session.id).rounds == 4  # type: ignore[union-attr]


def test_labels_carry_over_undo_keeps_history(engine: Engine, world: World) -> None:
    hitl = SearchEngine(engine)
    owner = f"ben-{uuid.uuid4().hex[:4]}"
    first = hitl.new_session(owner=owner, concept="ring", model_version=world.version, tile_ids=world.ids[:3])
    shown = [s.tile_id for s in hitl.next_round(first.id, k=6).shown]
    hitl.label(first.id, [(t, True) for t in shown], interest=[5, 4, 3, 2, 1, 0])
    undone = hitl.undo(first.id)
    assert undone is not None and undone["tile_id"] == shown[-1]
    history = store.label_history(engine, author=owner, concept="ring")
    assert len(history) == 6 and history[-1]["retracted_at"] is not None and history[0]["interest"] == 5
    # a second session of the same user and concept starts from their labels
    second = hitl.new_session(
        owner=owner, concept="ring", model_version=world.version, tile_ids=world.ids[3:4]
    )
    pos, neg, _ = hitl.training_set(hitl.session(second.id))
    assert len(pos) == 1 + 5 and len(neg) == 0  # one seed + five good labels (the sixth was undone)
    excluded = set(store.excluded_tiles(engine, second.id, author=owner, concept="ring"))
    assert set(shown[:5]) <= excluded and shown[-1] not in excluded
    # another user's labels are theirs alone
    other = hitl.new_session(
        owner=f"cy-{uuid.uuid4().hex[:4]}",
        concept="ring",
        model_version=world.version,
        tile_ids=world.ids[:1],
    )
    pos, _, _ = hitl.training_set(hitl.session(other.id))
    assert len(pos) == 1
    with pytest.raises(HitlError, match="0-5"):
        hitl.label(first.id, [(world.ids[10], True)], interest=[9])


def test_never_shows_another_model_versions_tiles(engine: Engine, world: World) -> None:
    hitl = SearchEngine(engine)
    session = hitl.new_session(owner="dee", concept="ring", model_version=world.decoy, tile_ids=world.ids[:3])
    shown = [s.tile_id for s in hitl.next_round(session.id, k=12).shown]
    assert set(shown) <= set(world.ids[3:N_RINGS])  # the decoy version holds ring tiles only
    with pytest.raises(HitlError, match=r"no .* embedding"):
        hitl.new_session(owner="dee", concept="ring", model_version=world.decoy, tile_ids=[world.ids[-1]])


def test_iterative_scan_returns_k_rows_when_most_are_excluded(engine: Engine, world: World) -> None:
    # exclude all but 20 tiles of the version: the filtered HNSW scan must still find those 20
    keep = set(world.ids[100:120])
    exclude = [t for t in world.ids if t not in keep]
    with engine.begin() as conn:
        got = store.nearest_unseen(
            conn, world.vectors[0], model_version=world.version, k=20, exclude=exclude, dim=256
        )
    assert set(got.tile_ids) == keep


def test_coordinate_seeds_and_seedless_start(engine: Engine, world: World) -> None:
    hitl = SearchEngine(engine)
    target = SkyCoord(world.ra[5] * u.deg, world.dec[5] * u.deg).to_string("hmsdms")
    pos = parse_position(target)
    session = hitl.new_session(
        owner="eve", concept="ring", model_version=world.version, coords=[pos], radius=2 * u.arcsec
    )
    seed_vecs, details = store.seeds(engine, session.id, 256)
    assert seed_vecs.tile_ids == [world.ids[5]] and details[0]["source"] == "coords"
    with pytest.raises(HitlError, match="within"):
        hitl.new_session(
            owner="eve",
            concept="ring",
            model_version=world.version,
            coords=[SkyCoord(10 * u.deg, -40 * u.deg)],
        )
    blank = hitl.new_session(owner="eve", concept="oddballs", model_version=world.version)
    rnd = hitl.next_round(blank.id, k=8)
    assert len(rnd.shown) == 8 and {s.strategy for s in rnd.shown} == {"anomaly"}
    assert rnd.shown[0].score >= rnd.shown[-1].score


def test_save_refit_and_cli_parsers(engine: Engine, world: World) -> None:
    hitl = SearchEngine(engine)
    owner = f"fay-{uuid.uuid4().hex[:4]}"
    session = hitl.new_session(
        owner=owner, concept="ring", model_version=world.version, tile_ids=world.ids[:3]
    )
    saved = hitl.save(session.id, threshold=0.7)
    assert saved.learner["kind"] == "similarity" and saved.learner_version == 1
    assert hitl.refit_saved(saved) is None  # no labels since
    shown = [s.tile_id for s in hitl.next_round(session.id, k=12).shown]
    hitl.label(session.id, [(t, world.ring_of[t]) for t in shown])
    hitl.label(session.id, [(world.ids[-1], False)])
    refit = hitl.refit_saved(saved)
    assert refit is not None and refit[0] == 2 and refit[1].kind == "logistic"
    (row,) = store.saved_searches(engine, owner=owner)
    assert row.learner_version == 2 and row.learner["kind"] == "logistic"
    with engine.connect() as c:
        assert (
            c.execute(
                text("SELECT count(*) FROM saved_searches WHERE session_id = :s"), {"s": session.id}
            ).scalar()
            == 1
        )
    assert parse_label(f"{world.ids[0]}=good:4") == (str(world.ids[0]), True, 4)
    for bad in ("x=good", f"{world.ids[0]}=maybe", f"{world.ids[0]}=bad:7"):
        with pytest.raises(ValueError):
            parse_label(bad)


def test_cli_drives_a_session(
    engine: Engine,
    world: World,
    stack_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``galsift hitl new|round|label|undo|save|list|show`` against the same database."""
    import json

    from deploy.cli import service_env
    from galsift import cli
    from galsift.settings import get_settings

    for key, value in service_env(stack_settings, base={}).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    monkeypatch.setattr("galsift.logs.configure", lambda settings: None)
    owner = f"gus-{uuid.uuid4().hex[:4]}"

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert cli.main(list(argv)) == 0
        return capsys.readouterr().out

    try:
        out = run(
            "hitl",
            "new",
            "--owner",
            owner,
            "--concept",
            "ring",
            "--model-version",
            world.version,
            "--tile",
            str(world.ids[0]),
            "--external-id",
            f"{world.survey}:t1",
            "--json",
        )
        session = json.loads(out)["id"]
        page = json.loads(run("hitl", "round", str(session), "-k", "5", "--json"))
        assert page["round"] == 1 and len(page["shown"]) == 5
        labels = [
            f"{r['tile_id']}={'good' if world.ring_of[uuid.UUID(r['tile_id'])] else 'bad'}:3"
            for r in page["shown"]
        ]
        assert "saved 5 label(s)" in run("hitl", "label", str(session), *labels)
        assert "retracted label" in run("hitl", "undo", str(session))
        assert "saved search" in run("hitl", "save", str(session), "--threshold", "0.75")
        listed = json.loads(run("hitl", "list", "--owner", owner, "--json"))
        assert listed[0]["id"] == session and listed[0]["saved"]["threshold"] == 0.75
        shown = json.loads(run("hitl", "show", str(session), "--json"))["shown"]
        assert sum(r["good"] is not None for r in shown) == 4  # five labelled, one undone
        capsys.readouterr()
        assert cli.main(["hitl", "label", str(session), "nonsense"]) == 2
        assert "expected TILE=good|bad" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
