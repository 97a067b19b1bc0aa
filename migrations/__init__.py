"""Alembic environment and revisions: the only way the coordinator's schema changes."""
