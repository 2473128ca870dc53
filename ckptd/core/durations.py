"""Durations as people write them in reasons and the config."""

from __future__ import annotations

from datetime import timedelta


def format_duration(td: timedelta) -> str:
    seconds = td.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
