"""The suite's own safety nets (tests/conftest.py)."""

from __future__ import annotations

import threading

from tests.conftest import leaked_threads


def test_a_daemon_thread_left_running_is_a_leak() -> None:
    before = set(threading.enumerate())
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="ckptd-test", daemon=True)
    thread.start()
    try:
        assert leaked_threads(before, wait=0.2) == [thread]
    finally:
        stop.set()
        thread.join()
    assert leaked_threads(before, wait=0.2) == []


def test_a_thread_that_is_stopping_gets_a_moment_to_finish() -> None:
    before = set(threading.enumerate())
    threading.Timer(0.2, lambda: None).start()
    assert leaked_threads(before, wait=5) == []
