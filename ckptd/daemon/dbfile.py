"""The SQLite file under a running daemon: noticing it deleted or replaced at its path, and
checkpointing its WAL from a thread while the start-up backfill writes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ckptd.store.urls import sqlite_path

log = logging.getLogger(__name__)


class DatabaseFile:
    """The identity (device, inode) of the SQLite file a daemon opened; None for a server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._identity: tuple[int, int] | None = None

    def remember(self) -> None:
        """Note the file at the path now (after the daemon opened and migrated it)."""
        path = sqlite_path(self.url)
        if path is None:
            self._identity = None
            return
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def replaced(self) -> str | None:
        """Why the SQLite file this daemon opened is no longer the one at its path, if it is not:
        writes would go into a deleted inode (lost at exit) or miss the new file."""
        if self._identity is None:
            return None
        path = sqlite_path(self.url)
        try:
            st = os.stat(path)  # type: ignore[arg-type]
        except FileNotFoundError:
            how = "was deleted"
        except OSError:
            return None  # cannot tell now (EACCES, EIO): checked again at the next tick
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return None
            how = "was replaced"
        return (
            f"the database file {path} {how} while ckptd was running; exiting so that the "
            "restart records everything on disk into the database now at that path"
        )


@contextmanager
def checkpointing_wal(checkpoint: Callable[[], None], every: float) -> Iterator[None]:
    """Call ``checkpoint`` from a thread every ``every`` seconds while the body writes (a
    backfill writes many pages before the scheduler's job runs): copying pages into the
    database then overlaps the writing instead of following it at the end."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every):
            try:
                checkpoint()
            except Exception:  # a failed checkpoint is retried next time; never fatal
                log.debug("WAL checkpoint failed", exc_info=True)

    thread = threading.Thread(target=loop, name="ckptd-wal-checkpoint", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
