"""require pgvector >= 0.8 (iterative index scans for filtered HNSW queries)

Filtered vector queries (one model version of several, a sky region, "not yet labelled" in a
HITL round) rely on ``hnsw.iterative_scan``, which pgvector added in 0.8.0; without it such a
query silently returns fewer than k rows. This revision updates the extension to the newest
version the server has and refuses to go on below 0.8.0, with a message that says what to do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 05:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the oldest pgvector galsift runs on
MIN_PGVECTOR = (0, 8, 0)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


def upgrade() -> None:
    bind = op.get_bind()
    available = bind.execute(
        sa.text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    ).scalar()
    if available is None or _version(available) < MIN_PGVECTOR:
        raise RuntimeError(
            f"galsift needs pgvector >= {'.'.join(map(str, MIN_PGVECTOR))} for iterative index scans; "
            f"this server offers {available or 'no pgvector'}. Install a newer pgvector on the server "
            "(or unset GALSIFT_DATABASE_URL to use the embedded PostgreSQL 18 + pgvector 0.8)."
        )
    op.execute("ALTER EXTENSION vector UPDATE")


def downgrade() -> None:
    # an extension is not downgraded: older versions' scripts may not exist on the server
    pass
