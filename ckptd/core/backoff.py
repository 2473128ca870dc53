"""When a failed job (an evaluation, an export) is tried again: exponential backoff."""

from __future__ import annotations

from datetime import datetime, timedelta

# Far beyond any useful wait; keeps ``base * 2**n`` from overflowing timedelta.
MAX_DELAY = timedelta(days=365)


def retry_at(
    attempt: int, max_attempts: int, base: timedelta, now: datetime, *, hopeless: bool = False
) -> datetime | None:
    """When to try again after failed attempt number ``attempt`` (1-based): ``base``, then
    twice as long after each further failure; None (give up) after ``max_attempts`` or when
    another attempt cannot succeed (``hopeless``, e.g. the checkpoint is gone)."""
    if hopeless or attempt >= max_attempts:
        return None
    factor = 2 ** (attempt - 1)
    too_long = base.total_seconds() * factor >= MAX_DELAY.total_seconds()
    return now + (MAX_DELAY if too_long else base * factor)
