"""Logging to stderr, one event per line, with syslog level prefixes under journald."""

from __future__ import annotations

import logging
import os
import sys

_SYSLOG = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        fmt = (
            "%(name)s: %(message)s"
            if journald
            else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
        super().__init__(fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " ⏎ ")  # one event per line
        if self.journald:
            return f"<{_SYSLOG.get(record.levelno, 6)}>{text}"
        return text


# Libraries kept at warning or above. The object store ones log each request with its signed
# headers at debug level: credentials never reach the log, whatever log_level says.
NOISY = (
    "apscheduler",
    "watchdog",
    "alembic",
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "fsspec",
    "google.auth",
    "urllib3",
    "aiohttp",
)


def setup(level: str = "info") -> None:
    """journald keeps levels from ``<N>`` prefixes; it sets JOURNAL_STREAM for our stderr."""
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
