"""alert outbox: one delivery row per (alert, webhook target) with its state, attempts and back-off

Alerts are written with their delivery rows in one transaction by the detector; the notifier
claims due rows (``FOR UPDATE SKIP LOCKED``), posts them and records the outcome. A replayed
batch inserts no alert and hence no delivery, so no webhook is called twice.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-28 12:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('alert_deliveries',
    sa.Column('alert_id', sa.Integer(), nullable=False),
    sa.Column('target', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('pending', 'sent', 'failed')", name='ck_alert_deliveries_state'),
    sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('alert_id', 'target', name='uq_alert_deliveries_alert_target')
    )
    op.create_index('ix_alert_deliveries_due', 'alert_deliveries', ['target', 'next_attempt_at'], unique=False,
                    postgresql_where=sa.text("state = 'pending'"))
    op.create_index('ix_alert_deliveries_sent', 'alert_deliveries', ['target', 'sent_at'], unique=False,
                    postgresql_where=sa.text("state = 'sent'"))


def downgrade() -> None:
    op.drop_index('ix_alert_deliveries_sent', table_name='alert_deliveries',
                  postgresql_where=sa.text("state = 'sent'"))
    op.drop_index('ix_alert_deliveries_due', table_name='alert_deliveries',
                  postgresql_where=sa.text("state = 'pending'"))
    op.drop_table('alert_deliveries')
