"""Alembic migrations for the ckptd schema (shipped in the wheel as ``ckptd.migrations``)."""
