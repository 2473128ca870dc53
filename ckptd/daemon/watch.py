"""Filesystem watching with watchdog (the only module that imports it).

Events are hints: each one only marks its run dirty. The handler never blocks and never raises.
``auto`` uses inotify and falls back to polling, with a warning, when the kernel refuses more
watches (ENOSPC) or instances (EMFILE); dead observer threads are restarted by ``check``. A watch
path that is missing (not created yet, or deleted) is waited for through its nearest existing
ancestor, and observed again as soon as it is back.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
RECHECK = 1.0  # seconds between looks at a missing watch path (besides its ancestor's events)
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
    a symlinked watch path, and below it nothing is followed); paths are mapped back. The watched
    directory itself deleted (its observer stops watching then): ``on_root_gone``.
    """

    def __init__(
        self,
        watch: WatchConfig,
        on_path: Callable[[WatchConfig, str], None],
        real: str = "",
        shown: str = "",
        on_root_gone: Callable[[], None] = lambda: None,
    ) -> None:
        self.watch, self.on_path = watch, on_path
        self.real, self.shown = real, shown
        self.on_root_gone = on_root_gone

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
            if event.event_type in ("deleted", "moved") and event.src_path == self.real:
                self.on_root_gone()
        except Exception:  # an exception here would kill the observer thread
            log.exception("error handling %r", event)


class _AncestorHandler(FileSystemEventHandler):
    """Events in the nearest existing ancestor of a missing watch path: ``wake`` when one
    concerns the next directory on the way to it, or the ancestor is deleted."""

    def __init__(self, ancestor: str, way: str, wake: Callable[[], None]) -> None:
        self.ancestor, self.way, self.wake = ancestor, way, wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self.way in (event.src_path, getattr(event, "dest_path", "")) or (
            event.event_type == "deleted" and event.src_path == self.ancestor
        ):
            self.wake()


@dataclass
class _Slot:
    index: int
    watch: WatchConfig
    observer: BaseObserver | None = None
    kind: str = ""  # inotify | polling | "" (not started: path missing)
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the directory watched
    gone: bool = False  # its observer reported the watched directory deleted or moved
    ancestor: Path | None = None  # while the path is missing: the directory watched instead
    waiting: BaseObserver | None = None  # ... and its observer


class Watcher:
    """One observer per watch, so one watch falling back to polling does not affect the others.

    A watch path that does not exist (yet, or any more) is waited for: its nearest existing
    ancestor is watched (not recursively) and looked at every RECHECK seconds, and when the path
    is a directory again its observer is started and ``on_armed`` is told, so that the caller
    scans what was written before the observer could see it. A thread of its own does this
    (``ckptd-watch``), woken by the observers' events.
    """

    def __init__(
        self,
        watches: tuple[WatchConfig, ...],
        on_path: Callable[[WatchConfig, str], None],
        poll_interval: float = POLL_INTERVAL,
        on_armed: Callable[[WatchConfig], None] = lambda _w: None,
    ) -> None:
        self.on_path, self.on_armed = on_path, on_armed
        self.poll_interval = poll_interval
        self.slots = [_Slot(i, w) for i, w in enumerate(watches)]
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            for slot in self.slots:
                self._start(slot)
                if not slot.watch.local_path.is_dir():
                    self._wait_for(slot)
        self._thread = threading.Thread(target=self._loop, name="ckptd-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            waiting = any(s.ancestor is not None for s in self.slots)
            self._wake.wait(RECHECK if waiting else None)
            self._wake.clear()
            if self._stopping:
                return
            try:
                for msg in self.check(retry_failed=False):
                    log.info(msg)
            except Exception:  # never let this thread die; the rescan calls check() too
                log.exception("checking the watched paths failed")

    def _start(self, slot: _Slot) -> None:
        if not slot.watch.local_path.is_dir():
            return
        shown = str(slot.watch.path)
        real = os.path.realpath(shown)
        try:
            st = os.stat(real)
        except OSError:
            return
        slot.identity, slot.gone = (st.st_dev, st.st_ino), False

        def gone() -> None:
            slot.gone = True
            self._wake.set()

        handler = _Handler(slot.watch, self.on_path, real, shown, gone)
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

    def _wait_for(self, slot: _Slot) -> None:
        """Watch the nearest existing ancestor of the missing path (if not already)."""
        path = slot.watch.local_path
        ancestor = path.parent
        while not ancestor.is_dir() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if slot.ancestor == ancestor and slot.waiting is not None and slot.waiting.is_alive():
            return
        self._stop_waiting(slot)
        slot.ancestor = ancestor
        way = str(ancestor / path.relative_to(ancestor).parts[0])
        handler = _AncestorHandler(str(ancestor), way, self._wake.set)
        polling = slot.watch.observer == "polling"
        observer = PollingObserver(timeout=self.poll_interval) if polling else Observer()
        try:
            observer.schedule(handler, str(ancestor), recursive=False, event_filter=EVENTS)
            observer.start()
            slot.waiting = observer
        except OSError as exc:  # (no inotify watch left): RECHECK still looks every second
            _stop(observer)
            log.debug("cannot watch %s for %s: %s", ancestor, path, exc)

    def _stop_waiting(self, slot: _Slot) -> None:
        if slot.waiting is not None:
            _stop(slot.waiting)
        slot.waiting, slot.ancestor = None, None

    def _replaced(self, slot: _Slot) -> bool:
        """Whether the watched directory was deleted, moved or replaced since it was armed."""
        if slot.gone or not slot.watch.local_path.is_dir():
            return True
        try:
            st = os.stat(os.path.realpath(slot.watch.path))
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != slot.identity

    def check(self, *, retry_failed: bool = True) -> list[str]:
        """Follow each watch path: stop observing a deleted one and wait for it, start observing
        one that has appeared, restart dead observers; returns what it did. ``retry_failed``:
        also try again to observe a path that exists but could not be (the periodic rescan
        does; the watch thread, which may run every second, does not)."""
        done: list[str] = []
        armed: list[WatchConfig] = []
        with self._lock:
            if self._stopping:
                return []
            for slot in self.slots:
                failed = slot.observer is None and slot.ancestor is None
                if failed and not retry_failed:
                    continue
                if slot.observer is not None and slot.observer.is_alive():
                    if not self._replaced(slot):
                        continue
                    # Watched directory deleted or replaced: inotify watches are gone with it.
                    _stop(slot.observer)
                    slot.observer, slot.kind = None, ""
                    done.append(f"stopped watching {slot.watch.path} (directory is gone)")
                elif slot.observer is not None:
                    log.error("observer for %s died; restarting it", slot.watch.path)
                    _stop(slot.observer)
                    slot.observer = None
                if slot.watch.local_path.is_dir():
                    self._stop_waiting(slot)
                    self._start(slot)  # (when it cannot: the periodic rescan covers the path)
                    if slot.observer is not None:
                        done.append(f"watching {slot.watch.path} ({slot.kind})")
                        armed.append(slot.watch)
                    continue
                self._wait_for(slot)
                if slot.watch.local_path.is_dir():
                    self._wake.set()  # it appeared meanwhile: look again at once
        for watch in armed:
            self.on_armed(watch)
        return done

    def healthy(self) -> bool:
        return all(s.observer is None or s.observer.is_alive() for s in self.slots)

    def describe(self) -> list[dict[str, object]]:
        """Per watch: its path, how it is observed and the directory actually watched (the
        path's target, or while it is missing, its nearest existing ancestor)."""
        out: list[dict[str, object]] = []
        for s in self.slots:
            if s.observer is not None:
                watching = os.path.realpath(s.watch.path)
            else:
                watching = str(s.ancestor) if s.waiting is not None else ""
            out.append(
                {
                    "path": str(s.watch.path),
                    "observer": s.kind or "waiting for path",
                    "alive": bool(s.observer and s.observer.is_alive()),
                    "watching": watching,
                }
            )
        return out

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.set()
            for slot in self.slots:
                if slot.observer is not None:
                    _stop(slot.observer)
                    slot.observer = None
                self._stop_waiting(slot)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _stop(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:
        log.debug("error stopping observer", exc_info=True)
