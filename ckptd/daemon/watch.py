"""Filesystem watching with watchdog (the only module that imports it).

Events are hints: each one only marks its run dirty. The handler never blocks and never raises.
``auto`` uses inotify and falls back to polling, with a warning, when the kernel refuses more
watches (ENOSPC) or instances (EMFILE); dead observer threads are restarted by ``check``.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ckptd.config import WatchConfig

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
# watchdog holds each inotify IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and when
# its reader reaches one before the pair is made it sleeps out the whole delay, holding every
# event behind it (watchdog#649). TensorFlow saves through renames (state file, .meta, data
# shards), so under frequent saves some checkpoints were recorded a whole delay late. The kernel
# queues both halves of a rename together, so a short delay still pairs them; and to ckptd an
# event is only a hint to rescan its run, so even an unpaired move costs nothing.
MOVE_PAIRING_DELAY = 0.02


def _shorten_move_pairing_delay() -> None:
    for module, name in (
        ("watchdog.observers.inotify_move_event_grouper", "InotifyMoveEventGrouper"),  # >= 7
        ("watchdog.observers.inotify_buffer", "InotifyBuffer"),  # 4.x - 6.x
    ):
        try:
            cls = getattr(importlib.import_module(module), name)
        except Exception:  # absent in this watchdog version, or not Linux
            continue
        if hasattr(cls, "delay"):
            cls.delay = MOVE_PAIRING_DELAY


_shorten_move_pairing_delay()

# Every change; not "opened" / "closed without writing": reads change nothing, and without this
# filter each directory ckptd itself lists (thousands per rescan) costs the observer thread two
# inotify events to decode and drop.
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,
    DirModifiedEvent,
    FileClosedEvent,
]


class _Handler(FileSystemEventHandler):
    """Passes each changed path on, as a path under the configured watch ``path``.

    A watch path that is a symlink is watched at its target (``real``: watchdog does not follow
    a symlinked watch path, and below it nothing is followed); paths are mapped back.
    """

    def __init__(
        self,
        watch: WatchConfig,
        on_path: Callable[[WatchConfig, str], None],
        real: str = "",
        shown: str = "",
    ) -> None:
        self.watch, self.on_path = watch, on_path
        self.real, self.shown = real, shown

    def _shown(self, path: str) -> str:
        if self.real != self.shown and (path == self.real or path.startswith(self.real + "/")):
            return self.shown + path[len(self.real) :]
        return path

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (ours included) change nothing
        try:
            for path in (event.src_path, getattr(event, "dest_path", "")):
                if path:
                    if not isinstance(path, str):
                        path = path.decode("utf-8", "surrogateescape")
                    self.on_path(self.watch, self._shown(path))
        except Exception:  # an exception here would kill the observer thread
            log.exception("error handling %r", event)


@dataclass
class _Slot:
    index: int
    watch: WatchConfig
    observer: BaseObserver | None = None
    kind: str = ""  # inotify | polling | "" (not started: path missing)


class Watcher:
    """One observer per watch, so one watch falling back to polling does not affect the others."""

    def __init__(
        self,
        watches: tuple[WatchConfig, ...],
        on_path: Callable[[WatchConfig, str], None],
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.on_path = on_path
        self.poll_interval = poll_interval
        self.slots = [_Slot(i, w) for i, w in enumerate(watches)]
        self._lock = threading.Lock()

    def start(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        if not slot.watch.path.is_dir():
            return
        shown = str(slot.watch.path)
        real = os.path.realpath(shown)
        handler = _Handler(slot.watch, self.on_path, real, shown)
        wanted = slot.watch.observer
        if wanted in ("auto", "inotify"):
            observer: BaseObserver = Observer()
            try:
                observer.schedule(handler, real, recursive=True, event_filter=EVENTS)
                observer.start()
                slot.observer, slot.kind = observer, "inotify"
                return
            except OSError as exc:
                _stop(observer)
                if wanted == "inotify" or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                    log.error(
                        "cannot watch %s with inotify: %s; relying on the periodic rescan",
                        slot.watch.path,
                        exc,
                    )
                    if wanted == "inotify":
                        return
                log.warning(
                    "inotify limit reached watching %s (%s); falling back to polling "
                    "every %.0f s. Raise fs.inotify.max_user_watches to avoid this.",
                    slot.watch.path,
                    exc,
                    self.poll_interval,
                )
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, real, recursive=True, event_filter=EVENTS)
        observer.start()
        slot.observer, slot.kind = observer, "polling"

    def check(self) -> list[str]:
        """Restart dead observers and start ones whose path has appeared; returns what it did."""
        done = []
        with self._lock:
            for slot in self.slots:
                if slot.observer is not None and slot.observer.is_alive():
                    if slot.watch.path.is_dir():
                        continue
                    # Watched directory deleted: inotify watches are gone with it.
                    _stop(slot.observer)
                    slot.observer, slot.kind = None, ""
                    done.append(f"stopped watching {slot.watch.path} (directory is gone)")
                    continue
                if slot.observer is not None:
                    log.error("observer for %s died; restarting it", slot.watch.path)
                    _stop(slot.observer)
                    slot.observer = None
                if slot.watch.path.is_dir():
                    self._start(slot)
                    if slot.observer is not None:
                        done.append(f"watching {slot.watch.path} ({slot.kind})")
        return done

    def healthy(self) -> bool:
        return all(s.observer is None or s.observer.is_alive() for s in self.slots)

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "path": str(s.watch.path),
                "observer": s.kind or "waiting for path",
                "alive": bool(s.observer and s.observer.is_alive()),
            }
            for s in self.slots
        ]

    def stop(self) -> None:
        for slot in self.slots:
            if slot.observer is not None:
                _stop(slot.observer)
                slot.observer = None


def _stop(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:
        log.debug("error stopping observer", exc_info=True)
