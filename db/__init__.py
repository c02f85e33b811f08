"""The database stage: SQLModel schema, Alembic migrations, engine and idempotent upserts."""
