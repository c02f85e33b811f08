"""``galsift sql`` and the ``galsift_reader`` role against the real PostgreSQL: attacks and answers.

The attack test sends hostile statements through :func:`db.sql.run_readonly`, through the
command's handler in this process (all of them) and through ``galsift sql`` subprocesses (a
sample, each costs an interpreter start): none may succeed, each must be refused with one clear
line within the time limit, and a checksum of every table, role and privilege must be the same
afterwards. The positive tests check the views and functions against answers computed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from db import repo
from db.models import EmbeddingCreate, ModelVersionCreate, TileCreate
from db.sql import READER_ROLE, QueryRefused, Result, run_readonly
from galsift.constants import EMBEDDING_DIM, HEALPIX_ORDER
from galsift.messages import tile_id
from galsift.settings import Settings

pytestmark = pytest.mark.integration

#: the statement timeout of the attack runs, and what a refusal may take beyond it
TIMEOUT_S = 2.0
SLACK_S = 4.0
GALSIFT = Path(sys.executable).with_name("galsift")


@dataclass(frozen=True)
class World:
    """What the fixture stored: one survey of tiles with embeddings, scores and labels."""

    tag: str
    survey: str
    ids: list[str]
    ra: np.ndarray
    dec: np.ndarray
    vectors: dict[str, np.ndarray]  # model version -> (N, D); NaN rows: no embedding
    version_a: str
    version_b: str
    lens_new: str
    morph_new: str
    alice: str
    bob: str
    secret_concept: str
    owner: str


def _healpix(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    return np.asarray(
        lonlat_to_healpix(ra * u.deg, dec * u.deg, 2**HEALPIX_ORDER, order="nested"), dtype=np.int64
    )


def _sky(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions everywhere, in a small field, across ra = 0 and around the north pole."""
    parts = [
        (rng.uniform(0, 360, 150), np.degrees(np.arcsin(rng.uniform(-1, 1, 150)))),
        (150 + rng.normal(0, 0.6, 80), 2 + rng.normal(0, 0.6, 80)),
        (rng.normal(0, 0.5, 40) % 360, rng.normal(-3, 0.5, 40)),
        (rng.uniform(0, 360, 30), 89.0 + rng.uniform(0, 0.99, 30)),
    ]
    ra = np.concatenate([p[0] for p in parts]) % 360
    dec = np.clip(np.concatenate([p[1] for p in parts]), -89.999, 89.999)
    return ra, dec


@pytest.fixture(scope="module")
def world(engine: Engine) -> Iterator[World]:
    """One survey's tiles with two embedding versions, lens and morphology scores, labels, alerts."""
    tag = uuid.uuid4().hex[:8]
    rng = np.random.default_rng(8)
    survey = f"sqltest-{tag}"
    ra, dec = _sky(rng)
    hp = _healpix(ra, dec)
    ids = [tile_id(survey, f"obj{i}") for i in range(len(ra))]
    repo.upsert_tiles(
        engine,
        [
            TileCreate(
                id=uuid.UUID(ids[i]),
                survey=survey,
                external_id=f"obj{i}",
                ra=float(ra[i]),
                dec=float(dec[i]),
                healpix=int(hp[i]),
                bands=["g", "r", "z"],
                pixel_scale=0.262,
                shape=[3, 8, 8],
                dtype="float32",
                pixels_uri=f"file:///objects/{survey}/{i}.npy",
                checksum="0" * 64,
            )
            for i in range(len(ra))
        ],
    )
    versions = {v: f"sqltest-{v}-{tag}" for v in ("a", "b", "lens1", "lens2", "morph1", "morph2")}
    for key, name in versions.items():
        repo.register_model_version(
            engine,
            ModelVersionCreate(
                name=name, variant=f"test_{key}", checkpoint_uri="file:///x", checksum=key * 4
            ),
        )
    vectors: dict[str, np.ndarray] = {}
    for key, keep in (("a", np.ones(len(ra), bool)), ("b", rng.random(len(ra)) < 0.6)):
        # real embeddings lie near a low-dimensional manifold; isotropic 256-d noise would not
        # (every pair is nearly equidistant there, and HNSW recall on it is a coin toss)
        latent = rng.normal(size=(len(ra), 8)) @ rng.normal(size=(8, EMBEDDING_DIM))
        v = (latent + 0.05 * rng.normal(size=latent.shape)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v[~keep] = np.nan
        vectors[versions[key]] = v
        repo.upsert_embeddings(
            engine,
            [
                EmbeddingCreate(
                    tile_id=uuid.UUID(ids[i]), model_version=versions[key], embedding=v[i].tolist()
                )
                for i in range(len(ra))
                if keep[i]
            ],
        )
    alice, bob = f"alice_{tag}", f"bob_{tag}"
    secret = f"secretconcept{tag}"
    with engine.begin() as conn:
        # the older lens version first, the newer an hour later: tile_scores must show the newer
        rows = []
        for i, t in enumerate(ids):
            rows.append(
                {"t": t, "v": versions["lens1"], "d": "lens_finder", "l": "lens", "s": 0.1, "age": 3600}
            )
            rows.append(
                {"t": t, "v": versions["lens2"], "d": "lens_finder", "l": "lens", "s": i / len(ids), "age": 0}
            )
            for label, p in (("ring", 0.25), ("spiral", 0.75)):
                rows.append(
                    {"t": t, "v": versions["morph1"], "d": "morphology", "l": label, "s": 0.5, "age": 3600}
                )
                rows.append(
                    {"t": t, "v": versions["morph2"], "d": "morphology", "l": label, "s": p, "age": 0}
                )
        conn.execute(
            text(
                "INSERT INTO detections (tile_id, model_version, detector, label, score, extra, created_at) "
                "VALUES (:t, :v, :d, :l, :s, '{}', now() - make_interval(secs => :age))"
            ),
            rows,
        )
        conn.execute(
            text(
                "INSERT INTO label_sets (name, kind, classes, rule, description) "
                "VALUES (:n, 'classes', ARRAY['elliptical', 'spiral'], '{}', '')"
            ),
            {"n": f"gz-{tag}"},
        )
        conn.execute(
            text("INSERT INTO labels (tile_id, label_set, value, author) VALUES (:t, :n, :v, 'catalogue')"),
            [{"t": ids[i], "n": f"gz-{tag}", "v": i % 2} for i in range(10)],
        )
        sessions = {}
        for user, concept in ((alice, "ring"), (bob, secret)):
            sessions[user] = conn.execute(
                text(
                    "INSERT INTO hitl_sessions (owner, name, concept, model_version, rounds) "
                    "VALUES (:o, :n, :c, :v, 1) RETURNING id"
                ),
                {"o": user, "n": f"{user}'s search", "c": concept, "v": versions["a"]},
            ).scalar_one()
        # alice: good, then bad (the later counts), then good on another tile; bob: his secret concept
        for user, concept, tile, good in (
            (alice, "ring", ids[0], True),
            (alice, "ring", ids[0], False),
            (alice, "ring", ids[1], True),
            (bob, "ring", ids[1], True),
            (bob, secret, ids[2], True),
        ):
            conn.execute(
                text(
                    "INSERT INTO hitl_labels (tile_id, concept, author, good, session_id, round_no) "
                    "VALUES (:t, :c, :a, :g, :s, 1)"
                ),
                {"t": tile, "c": concept, "a": user, "g": good, "s": sessions[user]},
            )
        conn.execute(
            text(
                "INSERT INTO saved_searches (session_id, owner, name, concept, model_version, threshold, "
                "webhook_url, learner, learner_version, last_label_id, active) "
                "VALUES (:s, :o, 'bob saved', :c, :v, 0.5, 'https://hooks.example/T0/SECRET', '{}', 1, 0, true)"
            ),
            {"s": sessions[bob], "o": bob, "c": secret, "v": versions["a"]},
        )
        conn.execute(
            text(
                "INSERT INTO alerts (tile_id, model_version, kind, score, crossmatch) "
                "VALUES (:t, :v, 'lens', 0.97, '{\"known\": false}')"
            ),
            {"t": ids[5], "v": versions["lens2"]},
        )
        # per-user logins: members of the reader role, named like their HITL author name
        for user in (alice, bob):
            conn.execute(text(f"CREATE ROLE {user} LOGIN IN ROLE {READER_ROLE}"))
        owner = str(conn.execute(text("SELECT current_user")).scalar_one())
    yield World(
        tag=tag,
        survey=survey,
        ids=ids,
        ra=ra,
        dec=dec,
        vectors=vectors,
        version_a=versions["a"],
        version_b=versions["b"],
        lens_new=versions["lens2"],
        morph_new=versions["morph2"],
        alice=alice,
        bob=bob,
        secret_concept=secret,
        owner=owner,
    )


def _q(settings: Settings, query: str, **kw: object) -> Result:
    kw.setdefault("max_rows", 10_000)
    kw.setdefault("timeout_s", 20.0)
    return run_readonly(settings, query, **kw)  # type: ignore[arg-type]


# -- what the reader sees ---------------------------------------------------------------------------
def test_views_return_the_stored_rows(stack_settings: Settings, world: World) -> None:
    r = _q(stack_settings, f"SELECT id, ra, dec FROM tiles WHERE survey = '{world.survey}'")
    assert len(r.rows) == len(world.ids) and not r.truncated
    assert r.columns == ["id", "ra", "dec"] and r.type_names[0] == "uuid"

    r = _q(
        stack_settings,
        f"SELECT tile_id, lens_score, lens_model_version, morphology, morphology_model_version "
        f"FROM tile_scores WHERE survey = '{world.survey}' ORDER BY external_id",
    )
    by_id = {str(row[0]): row for row in r.rows}
    for i, t in enumerate(world.ids):
        _, lens, lens_v, morph, morph_v = by_id[t]
        assert lens == pytest.approx(i / len(world.ids)) and lens_v == world.lens_new
        assert morph == {"ring": 0.25, "spiral": 0.75} and morph_v == world.morph_new

    r = _q(
        stack_settings,
        f"SELECT count(*), count(*) FILTER (WHERE model_version = '{world.version_b}') "
        f"FROM embeddings e JOIN tiles t ON t.id = e.tile_id WHERE t.survey = '{world.survey}'",
    )
    n_b = int(np.isfinite(world.vectors[world.version_b][:, 0]).sum())
    assert r.rows[0] == (len(world.ids) + n_b, n_b)

    r = _q(
        stack_settings,
        f"SELECT value, class_name FROM labels WHERE label_set = 'gz-{world.tag}' "
        "ORDER BY value LIMIT 1 OFFSET 9",
    )
    assert r.rows == [(1, "spiral")]

    r = _q(stack_settings, f"SELECT kind, score, crossmatch FROM alerts WHERE tile_id = '{world.ids[5]}'")
    assert r.rows == [("lens", 0.97, {"known": False})]


def test_hitl_labels_stay_private(stack_settings: Settings, world: World) -> None:
    # everyone: counts of current labels per (concept, tile), never who gave them
    r = _q(
        stack_settings,
        f"SELECT tile_id::text, n_good, n_bad FROM hitl_label_counts WHERE concept = 'ring' "
        f"AND tile_id IN ('{world.ids[0]}', '{world.ids[1]}') ORDER BY 1",
    )
    assert sorted(r.rows) == sorted([(world.ids[0], 0, 1), (world.ids[1], 2, 0)])
    assert "author" not in _q(stack_settings, "SELECT * FROM hitl_label_counts LIMIT 0").columns

    # the shared login owns no labels; a user's own login sees exactly their rows
    assert _q(stack_settings, "SELECT * FROM my_hitl_labels").rows == []
    mine = _q(stack_settings, "SELECT concept, good FROM my_hitl_labels ORDER BY id", login=world.alice)
    assert mine.rows == [("ring", True), ("ring", False), ("ring", True)]
    sessions = _q(stack_settings, "SELECT name FROM my_hitl_sessions", login=world.alice)
    assert sessions.rows == [(f"{world.alice}'s search",)]

    # a failing cast in the caller's WHERE would print bob's concept if it ran on his rows first:
    # the security-barrier views filter before any caller predicate
    for login, query in (
        (READER_ROLE, "SELECT * FROM my_hitl_labels WHERE concept::int = 1"),
        (world.alice, "SELECT * FROM my_hitl_labels WHERE concept::int = 1"),
        (world.alice, "SELECT * FROM my_hitl_sessions WHERE (name || concept)::int = 1"),
        (READER_ROLE, "SELECT * FROM hitl_label_counts WHERE concept::int = 1"),
    ):
        try:
            _q(stack_settings, query, login=login)
        except QueryRefused as exc:
            # concepts are public in the counts; who labelled, and bob's own rows, are not
            assert world.bob not in str(exc), query
            if "my_" in query:
                assert world.secret_concept not in str(exc), query

    # a login that is not a member of the reader role is refused before any query runs
    with pytest.raises(QueryRefused, match="not a reader role"):
        _q(stack_settings, "SELECT 1", login=world.owner)


def _brute_neighbours(world: World, version: str, i: int, k: int) -> list[str]:
    v = world.vectors[version]
    ok = np.isfinite(v[:, 0])
    d = 1 - v @ v[i]
    d[~ok] = np.inf
    d[i] = np.inf
    return [world.ids[j] for j in np.argsort(d, kind="stable")[:k]]


def test_similar_returns_k_neighbours_of_the_same_version(stack_settings: Settings, world: World) -> None:
    # other tests' embeddings share the table; the function keeps to the query tile's version
    for version, i in (
        (world.version_a, 3),
        (world.version_b, int(np.flatnonzero(np.isfinite(world.vectors[world.version_b][:, 0]))[0])),
    ):
        r = _q(
            stack_settings,
            f"SELECT rank, tile_id::text, model_version, distance FROM galsift_similar('{world.ids[i]}', 10, '{version}')",
        )
        assert len(r.rows) == 10
        assert [row[0] for row in r.rows] == list(range(1, 11))
        assert {row[2] for row in r.rows} == {version}
        assert world.ids[i] not in {row[1] for row in r.rows}
        distances = [row[3] for row in r.rows]
        assert distances == sorted(distances)
        expected = _brute_neighbours(world, version, i, 10)
        # HNSW is approximate, and here it is filtered to one version of a table other tests share:
        # the true nearest neighbour comes first and most of the exact ten are found
        assert r.rows[0][1] == expected[0]
        assert len(set(expected) & {row[1] for row in r.rows}) >= 8

    # without a version: the tile's newest embedding (version b for tiles that have one)
    i = int(np.flatnonzero(np.isfinite(world.vectors[world.version_b][:, 0]))[1])
    r = _q(stack_settings, f"SELECT DISTINCT model_version FROM galsift_similar('{world.ids[i]}', 5)")
    assert r.rows == [(world.version_b,)]
    # a caller's search_path cannot redirect the function (its body was bound when created)
    r = _q(
        stack_settings,
        f"SELECT set_config('search_path', 'pg_temp, public', false) AS sp, "
        f"(SELECT count(*) FROM galsift_api.galsift_similar('{world.ids[3]}', 7, '{world.version_a}')) AS n",
    )
    assert r.rows[0][1] == 7


def _separation(ra1: np.ndarray, dec1: np.ndarray, ra2: float, dec2: float) -> np.ndarray:
    r1, d1, r2, d2 = np.radians(ra1), np.radians(dec1), np.radians(ra2), np.radians(dec2)
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


@pytest.mark.parametrize(
    ("ra", "dec", "radius"),
    [
        (150.0, 2.0, 0.8),
        (150.3, 1.7, 0.05),
        (0.2, -3.0, 1.0),
        (359.9, -3.2, 0.6),
        (77.0, 89.6, 0.8),
        (10.0, 20.0, 40.0),
        (0.0, 0.0, 180.0),
    ],
)
def test_cone_returns_the_tiles_within_the_radius(
    stack_settings: Settings, world: World, ra: float, dec: float, radius: float
) -> None:
    sep = _separation(world.ra, world.dec, ra, dec)
    expected = {world.ids[i] for i in np.flatnonzero(sep <= radius)}
    r = _q(
        stack_settings,
        f"SELECT tile_id::text, separation_deg FROM galsift_cone({ra}, {dec}, {radius}) WHERE survey = '{world.survey}'",
    )
    got = {row[0] for row in r.rows}
    # positions within 1e-9 deg of the edge may fall either way
    edge = {world.ids[i] for i in np.flatnonzero(np.abs(sep - radius) < 1e-9)}
    assert got - edge == expected - edge
    assert all(row[1] <= radius + 1e-9 for row in r.rows)


def test_reader_has_no_privilege_beyond_the_api(engine: Engine, world: World) -> None:
    """Structural check: a table added by a later migration is not readable unless granted."""
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname <> 'galsift_api' "
                "AND (has_table_privilege(:r, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'))"
            ),
            {"r": READER_ROLE},
        ).all()
        assert tables == []
        row = conn.execute(
            text(
                "SELECT has_schema_privilege(:r, 'public', 'CREATE'), has_schema_privilege(:r, 'galsift_api', 'CREATE'), "
                "has_database_privilege(:r, current_database(), 'CREATE'), has_database_privilege(:r, current_database(), 'TEMP'), "
                "r.rolsuper, r.rolbypassrls, r.rolconnlimit, "
                "(SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting WHERE setrole = r.oid AND setdatabase = 0) "
                "FROM pg_roles r WHERE r.rolname = :r"
            ),
            {"r": READER_ROLE},
        ).one()
    assert row[:6] == (False, False, False, False, False, False)
    assert 0 < row[6] <= 64
    for setting in (
        "default_transaction_read_only=on",
        "statement_timeout=",
        "temp_file_limit=",
        "idle_in_transaction_session_timeout=",
    ):
        assert setting in row[7]


# -- attacks ------------------------------------------------------------------------------------------
#: statements that are refused only because they run out of time (or temporary-file space)
SLOW = (
    "SELECT pg_sleep(60)",
    "SELECT set_config('statement_timeout', '0', false), pg_sleep(60)",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "SELECT count(*) FROM generate_series(1, 100000) a CROSS JOIN generate_series(1, 100000) b",
    "SELECT count(*) FROM galsift_api.tiles a, galsift_api.tiles b, galsift_api.tiles c, galsift_api.tiles d",
)


def _hostile(world: World) -> list[str]:
    t = world.ids[0]
    return [
        # writes and DDL, through tables and through the (auto-updatable) views
        "INSERT INTO public.surveys (name, description) VALUES ('evil', '')",
        f"INSERT INTO galsift_api.tiles (id, survey) VALUES (gen_random_uuid(), '{world.survey}')",
        "UPDATE public.model_versions SET checksum = 'x'",
        f"UPDATE galsift_api.tiles SET ra = 0 WHERE id = '{t}'",
        "DELETE FROM galsift_api.labels",
        "TRUNCATE public.hitl_labels",
        "DROP TABLE public.tiles CASCADE",
        "DROP SCHEMA galsift_api CASCADE",
        "CREATE TABLE public.evil (x int)",
        "CREATE TEMP TABLE evil AS SELECT 1 AS x",
        "CREATE SCHEMA evil",
        "CREATE INDEX ON public.tiles (ra)",
        "ALTER TABLE public.tiles ADD COLUMN evil int",
        "GRANT SELECT ON public.hitl_labels TO galsift_reader",
        "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE FUNCTION pg_temp.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE OR REPLACE VIEW galsift_api.tiles AS SELECT * FROM public.tiles",
        # data-modifying CTEs and EXPLAIN ANALYZE of writes
        "WITH d AS (DELETE FROM public.labels RETURNING *) SELECT count(*) FROM d",
        "WITH u AS (UPDATE galsift_api.tiles SET survey = 'x' RETURNING 1) SELECT count(*) FROM u",
        "EXPLAIN ANALYZE DELETE FROM public.tiles",
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM galsift_api.embeddings RETURNING 1) SELECT count(*) FROM d",
        "SELECT * FROM galsift_api.tiles FOR UPDATE",
        # COPY, server files, large objects
        "COPY (SELECT 1) TO PROGRAM 'touch /tmp/galsift_sql_pwned'",
        "COPY public.tiles TO '/tmp/galsift_sql_tiles.csv'",
        "COPY public.surveys FROM '/etc/hostname'",
        "COPY (SELECT * FROM galsift_api.tiles) TO STDOUT",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_read_binary_file('postgresql.conf')",
        "SELECT pg_ls_dir('.')",
        "SELECT lo_import('/etc/passwd')",
        "SELECT lo_create(0)",
        "SELECT lo_from_bytea(0, '\\x41'::bytea)",
        # role and search_path changes
        f"SET ROLE {world.owner}",
        f"SELECT set_config('role', '{world.owner}', false)",
        f"SET SESSION AUTHORIZATION {world.owner}",
        "RESET ROLE",
        "SELECT set_config('search_path', 'public, pg_catalog', false) AS sp, (SELECT count(*) FROM public.embeddings)",
        "SELECT set_config('transaction_read_only', 'off', false), set_config('default_transaction_read_only', 'off', false)",
        "ALTER ROLE galsift_reader SET statement_timeout = 0",
        "ALTER SYSTEM SET statement_timeout = 0",
        # secrets in the catalogue and in galsift's own tables, other users' labels
        "SELECT rolname, rolpassword FROM pg_authid",
        "SELECT usename, passwd FROM pg_shadow",
        "SELECT * FROM pg_user_mapping",
        "SELECT * FROM pg_hba_file_rules",
        "SELECT current_setting('data_directory')",
        "SELECT webhook_url FROM public.saved_searches",
        "SELECT payload FROM public.alert_deliveries",
        "SELECT author, concept, good FROM public.hitl_labels",
        "SELECT owner, concept FROM public.hitl_sessions",
        # several statements, prepared writes, procedural code
        "SELECT 1; DROP TABLE public.tiles",
        "SELECT 1; SELECT 2",
        "PREPARE evil AS DELETE FROM public.tiles",
        "PREPARE p AS SELECT 1; EXECUTE p",
        "EXECUTE evil",
        "DO $$ BEGIN EXECUTE 'DROP TABLE public.tiles'; END $$",
        # time and size
        *SLOW,
        # locks, signals, notifications, maintenance, extensions
        "LOCK TABLE public.tiles IN ACCESS EXCLUSIVE MODE",
        "LOCK TABLE galsift_api.tiles IN ACCESS EXCLUSIVE MODE",
        "NOTIFY galsift_sql_test, 'pwned'",
        "SELECT pg_notify('galsift_sql_test', 'pwned')",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        "SELECT pg_reload_conf()",
        "VACUUM FULL public.tiles",
        "CHECKPOINT",
        "CREATE EXTENSION dblink",
        "SELECT * FROM dblink('dbname=postgres', 'DELETE FROM tiles') AS t(x text)",
        "SELECT nextval('public.labels_id_seq')",
    ]


def _fingerprint(engine: Engine) -> dict[str, object]:
    """Row counts and content hashes of every table, and the roles, schemas, functions and grants."""
    with engine.connect() as conn:
        tables = (
            conn.execute(
                text(
                    "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
                )
            )
            .scalars()
            .all()
        )
        out: dict[str, object] = {}
        for name in tables:
            out[name] = tuple(
                conn.execute(
                    text(f"SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM {name} t")
                ).one()
            )
        for key, query in {
            "roles": "SELECT string_agg(rolname || rolsuper::text || coalesce(array_to_string(rolconfig, ','), ''), ';' ORDER BY rolname) FROM pg_roles",
            "role_settings": "SELECT string_agg(setrole::text || array_to_string(setconfig, ','), ';' ORDER BY setrole) FROM pg_db_role_setting",
            "schemas": "SELECT string_agg(nspname || coalesce(nspacl::text, ''), ';' ORDER BY nspname) FROM pg_namespace WHERE nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%'",
            "relations": "SELECT count(*) FROM pg_class WHERE relpersistence <> 't'",
            "functions": "SELECT count(*), sum(hashtext(coalesce(proacl::text, ''))) FROM pg_proc",
            "database": "SELECT datacl::text FROM pg_database WHERE datname = current_database()",
            "large_objects": "SELECT count(*) FROM pg_largeobject_metadata",
            "extensions": "SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension",
        }.items():
            out[key] = tuple(conn.execute(text(query)).one())
    return out


def _refused(settings: Settings, query: str) -> tuple[QueryRefused | None, float]:
    started = time.monotonic()
    try:
        run_readonly(settings, query, max_rows=100, timeout_s=TIMEOUT_S)
    except QueryRefused as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_hostile_statements_are_refused_and_change_nothing(
    stack_settings: Settings, engine: Engine, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    from db.sql import reader_conninfo
    from galsift.cli import build_parser

    hostile = _hostile(world)
    assert len(hostile) >= 30
    before = _fingerprint(engine)
    owner_url = reader_conninfo(stack_settings, login=world.owner)
    with psycopg.connect(owner_url, autocommit=True) as listener:
        listener.execute("LISTEN galsift_sql_test")

        problems = []
        for query in hostile:
            exc, took = _refused(stack_settings, query)
            if exc is None:
                problems.append(f"ran: {query}")
            elif took > TIMEOUT_S + SLACK_S:
                problems.append(f"took {took:.1f} s: {query}")
            elif "\n" in str(exc) or len(str(exc)) < 10:
                problems.append(f"unclear: {query} -> {exc!r}")
        assert problems == []

        # the command's handler, in this process: exit status 2 and one line on stderr (the
        # statements that only run out of time were timed above; they would add 2 s each here)
        for query in [q for q in hostile if q not in SLOW]:
            started = time.monotonic()
            args = build_parser().parse_args(["sql", "--timeout", str(TIMEOUT_S), query])
            status = args.func(args, stack_settings)
            took = time.monotonic() - started
            captured = capsys.readouterr()
            assert status == 2, (query, captured.out)
            assert captured.out == ""
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("galsift sql: "), (query, captured.err)
            assert took <= TIMEOUT_S + SLACK_S, (query, took)

        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
    assert not Path("/tmp/galsift_sql_pwned").exists()
    assert not Path("/tmp/galsift_sql_tiles.csv").exists()
    assert _fingerprint(engine) == before

    # and a normal query still works
    r = run_readonly(
        stack_settings, f"SELECT count(*) FROM tiles WHERE survey = '{world.survey}'", max_rows=5, timeout_s=5
    )
    assert r.rows == [(len(world.ids),)]


def _cli(settings: Settings, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {"GALSIFT_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    # run outside the repository, so that no .env there leaks into the settings
    return subprocess.run(
        [str(GALSIFT), "sql", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=settings.data_dir,
        check=False,
    )


def test_galsift_sql_subprocess(stack_settings: Settings, engine: Engine, world: World) -> None:
    """The installed command: a sample of attacks (an interpreter start each), then the formats."""
    sample = [
        "SELECT 1; DROP TABLE public.tiles",
        "WITH d AS (DELETE FROM public.labels RETURNING *) SELECT count(*) FROM d",
        "SELECT author, concept FROM public.hitl_labels",
        "SELECT set_config('statement_timeout', '0', false), pg_sleep(60)",
    ]
    calls = [["--timeout", str(TIMEOUT_S), q] for q in sample]
    calls.append(["--json", "--max-rows", "3", f"SELECT id, ra FROM tiles WHERE survey = '{world.survey}'"])
    calls.append(
        ["--csv", f"SELECT external_id FROM tiles WHERE survey = '{world.survey}' ORDER BY 1 LIMIT 2"]
    )
    before = _fingerprint(engine)
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(lambda args: _cli(stack_settings, *args), calls))
    for query, proc in zip(sample, runs, strict=False):
        assert proc.returncode == 2, (query, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("galsift sql: ")]
        assert len(errors) == 1 and proc.stdout == "", (query, proc.stderr)
    assert _fingerprint(engine) == before

    ok, csv_run = runs[-2:]
    assert ok.returncode == 0, ok.stderr
    payload = json.loads(ok.stdout)
    assert payload["columns"] == ["id", "ra"] and len(payload["rows"]) == 3 and payload["truncated"] is True
    assert "cut at 3 rows" in ok.stderr
    assert csv_run.returncode == 0, csv_run.stderr
    assert csv_run.stdout.splitlines() == ["external_id", "obj0", "obj1"]
