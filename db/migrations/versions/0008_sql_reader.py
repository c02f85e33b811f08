"""SQL over embeddings: the documented ``galsift_api`` views and functions and the ``galsift_reader`` role

Everything a data user may read is a view or a function in the schema ``galsift_api`` (documented
in docs/sql.md); the role ``galsift_reader`` gets USAGE on that schema, SELECT on its views and
EXECUTE on its functions, and nothing else: no privilege on any table, no CREATE on any schema or
on the database, no temporary tables, and the session defaults of a read-only console (read-only
transactions, statement, transaction and idle timeouts, a temporary-file cap, a connection limit).

The defence is made of privileges, not of a list of forbidden words: a hostile statement fails
because the role may not do what it asks (or because its transaction is read-only, or because it
runs out of time), whatever its spelling.

Views run with their owner's rights over the tables (``security_invoker`` off, the PostgreSQL
default), so the reader needs no table privilege; the ``my_*`` views filter rows by
``session_user``, which a session cannot change without superuser rights, and are
``security_barrier`` views so that a caller's predicates (a cast that fails and prints the value)
are never evaluated on rows the view filters out.

Functions are ``SECURITY INVOKER`` with SQL-standard bodies (``BEGIN ATOMIC``): the body is parsed
when the function is created, so names and operators are bound then and a caller's
``search_path`` cannot redirect them; the two entry points also pin ``search_path``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 09:00:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the login role of ``galsift sql`` and of every other reader (dashboard SQL console, filters)
READER = "galsift_reader"
#: the schema of the documented views and functions
API = "galsift_api"
#: order of ``tiles.healpix`` (galsift.constants.HEALPIX_ORDER; the migration keeps its own copy,
#: as a migration must keep meaning what it meant when it was written)
HEALPIX_ORDER = 10

#: the detector names the services write (detectors.service.LENS_DETECTOR, detectors.morphology.DETECTOR)
LENS_DETECTOR = "lens_finder"
MORPHOLOGY_DETECTOR = "morphology"

#: system functions PUBLIC may execute by default that a reader has no business calling: large
#: objects are created outside any table privilege, NOTIFY reaches other sessions (on commit, and
#: galsift never commits a reader's transaction, but the privilege is the principled gate), and
#: readers share one role, so they could cancel or terminate each other's queries
REVOKED_FROM_PUBLIC = (
    "lo_create(oid)",
    "lo_creat(integer)",
    "lo_from_bytea(oid, bytea)",
    "lo_put(oid, bigint, bytea)",
    "lowrite(integer, bytea)",
    "lo_unlink(oid)",
    "pg_notify(text, text)",
    "pg_cancel_backend(integer)",
    "pg_terminate_backend(integer, bigint)",
)

#: per-role session defaults; ``galsift sql`` sets its own timeout on top (db.sql)
ROLE_SETTINGS = {
    "search_path": f"{API}, public",
    "default_transaction_read_only": "on",
    "statement_timeout": "30s",
    "lock_timeout": "5s",
    "idle_in_transaction_session_timeout": "30s",
    "idle_session_timeout": "10min",
    "work_mem": "32MB",
    "hnsw.ef_search": "40",
    "hnsw.iterative_scan": "strict_order",
}
#: settings only a superuser may set, so the reader cannot raise them (set when the migration
#: runs as a superuser; otherwise a warning says to set them by hand)
ROLE_SUPERUSER_SETTINGS = {"temp_file_limit": "256MB"}
#: at most this many concurrent reader sessions (the dashboard's pool included)
CONNECTION_LIMIT = 16


def _role() -> None:
    # roles are per cluster: a second galsift database on the same server reuses the role, and an
    # operator may have created it beforehand (with a password); its attributes are enforced anyway
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{READER}') THEN
                CREATE ROLE {READER} LOGIN NOINHERIT CONNECTION LIMIT {CONNECTION_LIMIT};
            ELSE
                ALTER ROLE {READER} LOGIN NOINHERIT CONNECTION LIMIT {CONNECTION_LIMIT};
            END IF;
            IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
                ALTER ROLE {READER} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
            END IF;
        END
        $$
        """
    )
    for name, value in ROLE_SETTINGS.items():
        op.execute(f"ALTER ROLE {READER} SET {name} = '{value}'")
    op.execute(
        f"""
        DO $$
        BEGIN
            IF current_setting('server_version_num')::int >= 170000 THEN
                EXECUTE 'ALTER ROLE {READER} SET transaction_timeout = ''60s''';
            END IF;
        END
        $$
        """
    )
    for name, value in ROLE_SUPERUSER_SETTINGS.items():
        op.execute(
            f"""
            DO $$
            BEGIN
                ALTER ROLE {READER} SET {name} = '{value}';
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'not a superuser: run "ALTER ROLE {READER} SET {name} = ''{value}''" as one';
            END
            $$
            """
        )
    # a reader that is a superuser, bypasses row security or belongs to another role (say
    # pg_read_all_data or pg_write_all_data) would make every check below meaningless: refuse
    op.execute(
        f"""
        DO $$
        DECLARE a record;
        BEGIN
            SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication INTO a
            FROM pg_catalog.pg_roles WHERE rolname = '{READER}';
            IF a.rolsuper OR a.rolbypassrls OR a.rolcreaterole OR a.rolcreatedb OR a.rolreplication THEN
                RAISE EXCEPTION '{READER} has superuser-like attributes; remove them or drop the role';
            END IF;
            IF EXISTS (SELECT FROM pg_catalog.pg_auth_members m
                       JOIN pg_catalog.pg_roles g ON g.oid = m.member WHERE g.rolname = '{READER}') THEN
                RAISE EXCEPTION '{READER} is a member of another role; revoke that membership';
            END IF;
        END
        $$
        """
    )


def _database_privileges() -> None:
    # PostgreSQL >= 15 no longer lets PUBLIC create in schema public; servers upgraded from older
    # versions keep the old grant, so revoke it explicitly. TEMP and CREATE on the database are
    # granted to PUBLIC by default (temporary tables would be the one place a reader could
    # write, and CREATE lets it create schemas and trusted extensions such as dblink's kin)
    op.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    op.execute(
        f"""
        DO $$
        BEGIN
            EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
            EXECUTE format('GRANT CONNECT ON DATABASE %I TO {READER}', current_database());
            -- the owner keeps its rights as owner; a non-owner migrating role keeps TEMP explicitly
            EXECUTE format('GRANT CREATE, TEMPORARY ON DATABASE %I TO %I', current_database(), current_user);
        END
        $$
        """
    )
    for signature in REVOKED_FROM_PUBLIC:
        op.execute(
            f"""
            DO $$
            BEGIN
                REVOKE EXECUTE ON FUNCTION pg_catalog.{signature} FROM PUBLIC;
                EXECUTE format('GRANT EXECUTE ON FUNCTION pg_catalog.{signature} TO %I', current_user);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'not a superuser: run "REVOKE EXECUTE ON FUNCTION pg_catalog.{signature} FROM PUBLIC" as one';
            END
            $$
            """
        )


VIEWS = {
    "tiles": """
        SELECT t.id, t.survey, t.external_id, t.ra, t.dec, t.healpix, t.bands, t.pixel_scale,
               t.shape, t.dtype, t.pixels_uri, t.checksum, t.obs_time, t.ingested_at, t.meta
        FROM public.tiles t
    """,
    "model_versions": """
        SELECT m.name, m.variant, m.checksum, m.card, m.created_at
        FROM public.model_versions m
    """,
    "promotions": """
        SELECT p.id, p.role, p.model_version, p.previous, p.reason, p.metrics, p.created_at
        FROM public.promotions p
    """,
    "embeddings": """
        SELECT e.tile_id, e.model_version, e.embedding, e.created_at
        FROM public.embeddings e
    """,
    "detections": """
        SELECT d.tile_id, d.model_version, d.detector, d.label, d.score, d.extra, d.created_at
        FROM public.detections d
    """,
    # one row per tile: the lens score of the newest lens-finder version that scored it, and the
    # morphology probabilities of the newest morphology version that scored it (label -> p)
    "tile_scores": f"""
        SELECT t.id AS tile_id, t.survey, t.external_id, t.ra, t.dec, t.healpix, t.ingested_at,
               lens.score AS lens_score, lens.model_version AS lens_model_version,
               morph.scores AS morphology, morph.model_version AS morphology_model_version
        FROM public.tiles t
        LEFT JOIN LATERAL (
            SELECT d.score, d.model_version FROM public.detections d
            WHERE d.tile_id = t.id AND d.detector = '{LENS_DETECTOR}' AND d.label = 'lens'
            ORDER BY d.created_at DESC, d.model_version DESC LIMIT 1
        ) lens ON true
        LEFT JOIN LATERAL (
            SELECT v.model_version, jsonb_object_agg(d.label, d.score ORDER BY d.label) AS scores
            FROM (SELECT d0.model_version FROM public.detections d0
                  WHERE d0.tile_id = t.id AND d0.detector = '{MORPHOLOGY_DETECTOR}'
                  ORDER BY d0.created_at DESC, d0.model_version DESC LIMIT 1) v
            JOIN public.detections d ON d.tile_id = t.id AND d.detector = '{MORPHOLOGY_DETECTOR}'
                 AND d.model_version = v.model_version
            GROUP BY v.model_version
        ) morph ON true
    """,
    "label_sets": """
        SELECT s.name, s.kind, s.classes, s.description, s.created_at FROM public.label_sets s
    """,
    # catalogue labels (imported with `galsift labels import`): shared data, every row visible
    "labels": """
        SELECT l.tile_id, l.label_set, l.value,
               CASE WHEN s.kind = 'classes' THEN s.classes[l.value + 1] END AS class_name,
               l.author, l.created_at
        FROM public.labels l LEFT JOIN public.label_sets s ON s.name = l.label_set
    """,
    # HITL labels are per user: everyone sees how many users currently call a tile good or bad
    # for a concept, never who did
    "hitl_label_counts": """
        SELECT x.concept, x.tile_id,
               count(*) FILTER (WHERE x.good) AS n_good,
               count(*) FILTER (WHERE NOT x.good) AS n_bad
        FROM (SELECT DISTINCT ON (h.author, h.concept, h.tile_id) h.concept, h.tile_id, h.good,
                     h.retracted_at
              FROM public.hitl_labels h
              ORDER BY h.author, h.concept, h.tile_id, h.id DESC) x
        WHERE x.retracted_at IS NULL
        GROUP BY x.concept, x.tile_id
    """,
    # a user's own HITL rows, when they log in as their own role (a member of galsift_reader
    # named like their HITL author name); the shared galsift_reader login owns no labels
    "my_hitl_sessions": f"""
        SELECT s.id, s.name, s.concept, s.model_version, s.rounds, s.created_at
        FROM public.hitl_sessions s
        WHERE s.owner = session_user::text AND session_user::text <> '{READER}'
    """,
    "my_hitl_labels": f"""
        SELECT h.id, h.tile_id, h.concept, h.good, h.interest, h.session_id, h.round_no,
               h.retracted_at, h.created_at
        FROM public.hitl_labels h
        WHERE h.author = session_user::text AND session_user::text <> '{READER}'
    """,
    "alerts": """
        SELECT a.id, a.tile_id, t.ra, t.dec, a.model_version, a.kind, a.score, a.crossmatch,
               a.created_at, a.sent_at
        FROM public.alerts a JOIN public.tiles t ON t.id = a.tile_id
    """,
}
#: views whose WHERE clause hides rows from some readers (see the module docstring)
SECURITY_BARRIER = frozenset({"hitl_label_counts", "my_hitl_sessions", "my_hitl_labels"})

FUNCTIONS = [
    # great-circle distance in degrees (haversine: accurate for small angles)
    f"""
    CREATE FUNCTION {API}.angular_separation(ra1 double precision, dec1 double precision,
                                             ra2 double precision, dec2 double precision)
    RETURNS double precision LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    BEGIN ATOMIC
        SELECT degrees(2 * asin(least(1.0, sqrt(
            sin(radians(dec2 - dec1) / 2) ^ 2
            + cos(radians(dec1)) * cos(radians(dec2)) * sin(radians(ra2 - ra1) / 2) ^ 2))));
    END
    """,
    # centre of a nested HEALPix pixel (the HEALPix C++ library's pix2loc for the NEST scheme); in
    # PL/pgSQL, whose cached plans make it ~100x faster than the same steps as an SQL body, so its
    # search_path is pinned (names in a PL/pgSQL body are resolved when it runs)
    f"""
    CREATE FUNCTION {API}.healpix_center(healpix_order integer, ipix bigint,
                                         OUT ra double precision, OUT "dec" double precision)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        nside bigint := 1::bigint << healpix_order;
        face integer := (ipix >> (2 * healpix_order))::integer;
        p bigint := ipix & ((1::bigint << (2 * healpix_order)) - 1);
        ix bigint := 0;
        iy bigint := 0;
        jr bigint;
        nr bigint;
        k bigint;
    BEGIN
        FOR i IN 0 .. healpix_order - 1 LOOP
            ix := ix | (((p >> (2 * i)) & 1) << i);
            iy := iy | (((p >> (2 * i + 1)) & 1) << i);
        END LOOP;
        jr := ((ARRAY[2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])[face + 1]::bigint << healpix_order) - ix - iy - 1;
        IF jr < nside THEN
            nr := jr;
            "dec" := 90 - degrees(2 * asin(sqrt(nr::double precision ^ 2 / (6 * nside::double precision ^ 2))));
        ELSIF jr > 3 * nside THEN
            nr := 4 * nside - jr;
            "dec" := degrees(2 * asin(sqrt(nr::double precision ^ 2 / (6 * nside::double precision ^ 2)))) - 90;
        ELSE
            nr := nside;
            "dec" := degrees(asin((2 * nside - jr)::double precision * 2 / (3 * nside)));
        END IF;
        k := (ARRAY[1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])[face + 1]::bigint * nr + ix - iy;
        IF k < 0 THEN
            k := k + 8 * nr;
        END IF;
        ra := degrees(pi() * k / (4 * nr));
    END
    $$
    """,
    # largest distance (degrees) from a pixel's centre to any point of it at an order (the HEALPix
    # library's max_pixrad: the corners are the farthest points, edges do not bulge beyond them)
    f"""
    CREATE FUNCTION {API}.healpix_max_pixrad(healpix_order integer)
    RETURNS double precision LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    BEGIN ATOMIC
        WITH v AS (
            SELECT 2.0::double precision / 3 AS za,
                   pi() / (4 * (1::bigint << healpix_order)) AS pa,
                   1 - (1 - 1.0::double precision / (1::bigint << healpix_order)) ^ 2 / 3 AS zb
        )
        SELECT degrees(acos(least(1.0, greatest(-1.0,
            sqrt(1 - v.za ^ 2) * sqrt(1 - v.zb ^ 2) * cos(v.pa) + v.za * v.zb))))
        FROM v;
    END
    """,
    # order-{HEALPIX_ORDER} nested index ranges [lo, hi) that cover a disc: walk down from the 12
    # base pixels, keep a pixel's children while it straddles the edge, emit a pixel whole once it
    # lies inside or at the last order; the bound is widened by 1 % for rounding. The walk stops
    # at the order whose pixels are 1/16 of the radius (order {HEALPIX_ORDER} at most): finer edge
    # pixels would cost more than the few extra tiles the exact separation then drops
    f"""
    CREATE FUNCTION {API}.healpix_cone_ranges(center_ra double precision, center_dec double precision,
                                              radius_deg double precision)
    RETURNS TABLE (lo bigint, hi bigint) LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    BEGIN ATOMIC
        WITH RECURSIVE pixrad AS (
            SELECT o, {API}.healpix_max_pixrad(o) * 1.01 + 1e-9 AS rad
            FROM generate_series(0, {HEALPIX_ORDER}) o
        ), last AS (
            SELECT coalesce(min(pixrad.o), {HEALPIX_ORDER}) AS o FROM pixrad WHERE pixrad.rad <= radius_deg / 16
        ), cand(o, pix, dist) AS (
            SELECT 0, b.p::bigint,
                   {API}.angular_separation(c.ra, c.dec, center_ra, center_dec)
            FROM generate_series(0, 11) b(p)
            CROSS JOIN LATERAL {API}.healpix_center(0, b.p::bigint) c
          UNION ALL
            SELECT cand.o + 1, ch.pix,
                   {API}.angular_separation(c.ra, c.dec, center_ra, center_dec)
            FROM cand
            JOIN pixrad ON pixrad.o = cand.o
            CROSS JOIN LATERAL (SELECT cand.pix * 4 + q AS pix FROM generate_series(0, 3) q) ch
            CROSS JOIN LATERAL {API}.healpix_center(cand.o + 1, ch.pix) c
            WHERE cand.o < (SELECT last.o FROM last)
              AND cand.dist <= radius_deg + pixrad.rad
              AND cand.dist > radius_deg - pixrad.rad
        )
        SELECT cand.pix << (2 * ({HEALPIX_ORDER} - cand.o)), (cand.pix + 1) << (2 * ({HEALPIX_ORDER} - cand.o))
        FROM cand JOIN pixrad ON pixrad.o = cand.o
        WHERE cand.dist <= radius_deg + pixrad.rad
          AND (cand.o = (SELECT last.o FROM last) OR cand.dist <= radius_deg - pixrad.rad);
    END
    """,
    # tiles within radius_deg of a position: the HEALPix ranges select candidates through the
    # tiles.healpix index, the exact separation decides
    f"""
    CREATE FUNCTION {API}.galsift_cone(center_ra double precision, center_dec double precision,
                                       radius_deg double precision)
    RETURNS TABLE (tile_id uuid, survey text, external_id text, ra double precision,
                   "dec" double precision, healpix bigint, separation_deg double precision)
    LANGUAGE sql STABLE STRICT PARALLEL SAFE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
    BEGIN ATOMIC
        SELECT t.id, t.survey, t.external_id, t.ra, t.dec, t.healpix,
               {API}.angular_separation(t.ra, t.dec, center_ra, center_dec) AS sep
        FROM {API}.healpix_cone_ranges(center_ra, center_dec, least(radius_deg, 180.0)) r
        JOIN {API}.tiles t ON t.healpix >= r.lo AND t.healpix < r.hi
        WHERE {API}.angular_separation(t.ra, t.dec, center_ra, center_dec) <= radius_deg
        ORDER BY sep, t.id;
    END
    """,
    # k nearest neighbours (cosine distance, the HNSW index) of one tile among the embeddings of
    # the same model version: the given one, else the tile's newest embedding
    f"""
    CREATE FUNCTION {API}.galsift_similar(query_tile uuid, k integer DEFAULT 10,
                                          version text DEFAULT NULL)
    RETURNS TABLE (rank bigint, tile_id uuid, model_version text, distance double precision)
    LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
    SET hnsw.ef_search = '40'
    SET hnsw.iterative_scan = 'strict_order'
    BEGIN ATOMIC
        WITH q AS (
            SELECT e.model_version, e.embedding FROM {API}.embeddings e
            WHERE e.tile_id = query_tile AND (version IS NULL OR e.model_version = version)
            ORDER BY e.created_at DESC, e.model_version DESC LIMIT 1
        ), n AS (
            SELECT e.tile_id, e.model_version,
                   e.embedding OPERATOR(public.<=>) (SELECT q.embedding FROM q) AS distance
            FROM {API}.embeddings e
            WHERE e.model_version = (SELECT q.model_version FROM q) AND e.tile_id <> query_tile
            ORDER BY e.embedding OPERATOR(public.<=>) (SELECT q.embedding FROM q)
            LIMIT least(greatest(k, 0), 1000)
        )
        SELECT row_number() OVER (ORDER BY n.distance, n.tile_id), n.tile_id, n.model_version, n.distance
        FROM n ORDER BY n.distance, n.tile_id;
    END
    """,
]


def upgrade() -> None:
    _role()
    _database_privileges()
    op.execute(f"CREATE SCHEMA {API}")
    op.execute(f"COMMENT ON SCHEMA {API} IS 'galsift read-only SQL interface (docs/sql.md)'")
    for name, body in VIEWS.items():
        barrier = " WITH (security_barrier)" if name in SECURITY_BARRIER else ""
        op.execute(f"CREATE VIEW {API}.{name}{barrier} AS {body}")
    for ddl in FUNCTIONS:
        op.execute(ddl)
    # functions are executable by PUBLIC when created; only the reader (and the owner) need them
    op.execute(f"REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {API} FROM PUBLIC")
    op.execute(f"GRANT USAGE ON SCHEMA {API} TO {READER}")
    op.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {API} TO {READER}")
    op.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {API} TO {READER}")


def downgrade() -> None:
    op.execute(f"DROP SCHEMA IF EXISTS {API} CASCADE")
    for signature in REVOKED_FROM_PUBLIC:
        op.execute(
            f"""
            DO $$
            BEGIN
                GRANT EXECUTE ON FUNCTION pg_catalog.{signature} TO PUBLIC;
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'not a superuser: EXECUTE on pg_catalog.{signature} not given back to PUBLIC';
            END
            $$
            """
        )
    op.execute(
        """
        DO $$
        BEGIN
            EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
        END
        $$
        """
    )
    # the role is per cluster: drop what it holds here, and the role itself unless another
    # database still grants it something
    op.execute(
        f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{READER}') THEN
                EXECUTE 'DROP OWNED BY {READER}';
                BEGIN
                    DROP ROLE {READER};
                EXCEPTION WHEN dependent_objects_still_exist THEN
                    RAISE NOTICE '{READER} kept: other databases still refer to it';
                END;
            END IF;
        END
        $$
        """
    )
