"""merge the alert outbox (0004) and label sets (0005) branches into one head

Revision ID: 0006
Revises: 0004, 0005
Create Date: 2026-11-27 06:30:00
"""
from collections.abc import Sequence

revision: str = '0006'
down_revision: str | Sequence[str] | None = ('0004', '0005')
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
