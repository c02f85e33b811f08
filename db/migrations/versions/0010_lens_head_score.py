"""The lens score of a tile is the lens head's where it has one, the lens finder's elsewhere

The detector service writes ``detections`` rows of detector ``lens_head`` (the real-label head on
the finder's score and the embedding) for the tiles of the renderings the head was trained on.
``galsift_api.tile_scores`` (and with it the alert filters, which run over it) now takes the
newest ``lens_head`` row of a tile before the newest ``lens_finder`` row. Same columns, so the
view is replaced in place and keeps its grants.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 19:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# a migration keeps its own copies: it must keep meaning what it meant when it was written
API = "galsift_api"
LENS_DETECTORS = ("lens_head", "lens_finder")  # in order of preference
MORPHOLOGY_DETECTOR = "morphology"


def _tile_scores(lens: str) -> str:
    return f"""
        CREATE OR REPLACE VIEW {API}.tile_scores AS
        SELECT t.id AS tile_id, t.survey, t.external_id, t.ra, t.dec, t.healpix, t.ingested_at,
               lens.score AS lens_score, lens.model_version AS lens_model_version,
               morph.scores AS morphology, morph.model_version AS morphology_model_version
        FROM public.tiles t
        LEFT JOIN LATERAL (
            SELECT d.score, d.model_version FROM public.detections d
            WHERE d.tile_id = t.id AND d.label = 'lens' AND {lens}
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
    """


def upgrade() -> None:
    head, finder = LENS_DETECTORS
    op.execute(
        _tile_scores(
            f"d.detector IN ('{head}', '{finder}') "
            f"ORDER BY d.detector = '{head}' DESC, d.created_at DESC, d.model_version DESC LIMIT 1"
        )
    )


def downgrade() -> None:
    finder = LENS_DETECTORS[1]
    op.execute(
        _tile_scores(f"d.detector = '{finder}' ORDER BY d.created_at DESC, d.model_version DESC LIMIT 1")
    )
