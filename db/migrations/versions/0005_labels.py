"""label sets: what the integer value of a label set's labels means (binary, class index, code)

Catalogue imports (``galsift labels import``) declare here how a column became integers: the
class list of a class column (``labels.value`` indexes it) or the threshold of a vote fraction.
A label set without a row (a saved HITL search) is binary: 1 good, 0 bad.

Revision ID: 0005
Revises: 0002
Create Date: 2026-11-28 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('label_sets',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('classes', postgresql.ARRAY(sa.String()), server_default='{}', nullable=False),
    sa.Column('rule', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    # the trainers read one label set's rows at a time
    op.create_index('ix_labels_label_set', 'labels', ['label_set'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_labels_label_set', table_name='labels')
    op.drop_table('label_sets')
