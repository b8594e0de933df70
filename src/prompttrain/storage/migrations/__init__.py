"""Alembic environment and revisions; run them with `prompttrain migrate`."""
