"""Errors a user can hit, importable without SQLAlchemy (the CLI maps them to exit codes)."""

from __future__ import annotations


class StoreError(Exception):
    """A database problem, phrased for the user."""


class NotFound(LookupError):
    """A run or checkpoint the user named does not exist; the message says what does."""
