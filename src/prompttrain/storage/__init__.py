"""Persistence: engine and session factories, tables, the background writer and Alembic migrations."""
