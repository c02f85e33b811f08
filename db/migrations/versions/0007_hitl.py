"""HITL search sessions and labels, saved searches, scheduled job runs, model promotions

Labels are an append-only history (undo sets ``retracted_at``); one ``running`` row per job is
enforced by a partial unique index; APScheduler's job table is created here so that Alembic owns
the whole schema.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 07:17:30.246056
"""
from collections.abc import Sequence

import pgvector.sqlalchemy
import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('apscheduler_jobs',
    sa.Column('id', sa.Unicode(length=191), nullable=False),
    sa.Column('next_run_time', sa.Float(precision=25), nullable=True),
    sa.Column('job_state', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_apscheduler_jobs_next_run_time'), 'apscheduler_jobs', ['next_run_time'], unique=False)
    op.create_table('job_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("outcome IN ('running', 'ok', 'refused', 'skipped', 'failed', 'interrupted')", name='ck_job_runs_outcome'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_job_runs_job_started', 'job_runs', ['job', 'started_at'], unique=False)
    op.create_index('uq_job_runs_one_running', 'job_runs', ['job'], unique=True, postgresql_where=sa.text("outcome = 'running'"))
    op.create_table('hitl_sessions',
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('concept', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model_version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('rounds', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.name'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_hitl_sessions_owner', 'hitl_sessions', ['owner'], unique=False)
    op.create_table('promotions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('model_version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('previous', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.name'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_promotions_role_id', 'promotions', ['role', 'id'], unique=False)
    op.create_table('hitl_labels',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tile_id', sa.Uuid(), nullable=False),
    sa.Column('concept', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('author', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('good', sa.Boolean(), nullable=False),
    sa.Column('interest', sa.Integer(), nullable=True),
    sa.Column('session_id', sa.Integer(), nullable=True),
    sa.Column('round_no', sa.Integer(), nullable=True),
    sa.Column('retracted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('interest IS NULL OR interest BETWEEN 0 AND 5', name='ck_hitl_labels_interest'),
    sa.ForeignKeyConstraint(['session_id'], ['hitl_sessions.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['tile_id'], ['tiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_hitl_labels_author_concept', 'hitl_labels', ['author', 'concept', 'tile_id'], unique=False)
    op.create_index('ix_hitl_labels_concept_id', 'hitl_labels', ['concept', 'id'], unique=False)
    op.create_table('hitl_seeds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('session_id', sa.Integer(), nullable=False),
    sa.Column('tile_id', sa.Uuid(), nullable=True),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('embedding', pgvector.sqlalchemy.vector.VECTOR(dim=256), nullable=False),
    sa.Column('detail', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['hitl_sessions.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tile_id'], ['tiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_hitl_seeds_session_id'), 'hitl_seeds', ['session_id'], unique=False)
    op.create_table('hitl_shown',
    sa.Column('session_id', sa.Integer(), nullable=False),
    sa.Column('tile_id', sa.Uuid(), nullable=False),
    sa.Column('round_no', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('strategy', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['hitl_sessions.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tile_id'], ['tiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('session_id', 'tile_id', name='pk_hitl_shown')
    )
    op.create_table('saved_searches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('session_id', sa.Integer(), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('concept', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('model_version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('webhook_url', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('learner', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('learner_version', sa.Integer(), nullable=False),
    sa.Column('last_label_id', sa.Integer(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['model_version'], ['model_versions.name'], ),
    sa.ForeignKeyConstraint(['session_id'], ['hitl_sessions.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session_id', name='uq_saved_searches_session')
    )
    op.create_table('search_notifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('saved_search_id', sa.Integer(), nullable=False),
    sa.Column('tile_id', sa.Uuid(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('learner_version', sa.Integer(), nullable=False),
    sa.Column('webhook_state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('webhook_attempts', sa.Integer(), nullable=False),
    sa.Column('webhook_error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['saved_search_id'], ['saved_searches.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tile_id'], ['tiles.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('saved_search_id', 'tile_id', name='uq_search_notifications')
    )
    op.create_index(op.f('ix_search_notifications_saved_search_id'), 'search_notifications', ['saved_search_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_search_notifications_saved_search_id'), table_name='search_notifications')
    op.drop_table('search_notifications')
    op.drop_table('saved_searches')
    op.drop_table('hitl_shown')
    op.drop_index(op.f('ix_hitl_seeds_session_id'), table_name='hitl_seeds')
    op.drop_table('hitl_seeds')
    op.drop_index('ix_hitl_labels_concept_id', table_name='hitl_labels')
    op.drop_index('ix_hitl_labels_author_concept', table_name='hitl_labels')
    op.drop_table('hitl_labels')
    op.drop_index('ix_promotions_role_id', table_name='promotions')
    op.drop_table('promotions')
    op.drop_index('ix_hitl_sessions_owner', table_name='hitl_sessions')
    op.drop_table('hitl_sessions')
    op.drop_index('uq_job_runs_one_running', table_name='job_runs', postgresql_where=sa.text("outcome = 'running'"))
    op.drop_index('ix_job_runs_job_started', table_name='job_runs')
    op.drop_table('job_runs')
    op.drop_index(op.f('ix_apscheduler_jobs_next_run_time'), table_name='apscheduler_jobs')
    op.drop_table('apscheduler_jobs')
