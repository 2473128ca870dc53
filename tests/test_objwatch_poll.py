"""The polling observer of an object store watch, in-process on ``memory://``: what it records,
what an idle poll costs, how a failing store is reported and recovered from.
(``test_objwatch_daemon.py`` runs the real daemon against real servers.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.config import WatchConfig
from ckptd.daemon.objwatch import ObjectWatch, ObjectWatches
from ckptd.daemon.reconcile import Reconciler
from ckptd.io.objstore import StoreError
from ckptd.store import migrate
from ckptd.store.handle import Store
from tests.conftest import Corpus, query
from tests.test_objwatch_observe import upload


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    path = tmp_path / "ckptd.db"
    store = Store.open(f"sqlite:///{path}")
    migrate.ensure_store_schema(store)
    yield store, path
    store.close()


def _watch(runs: str | None = "*") -> WatchConfig:
    url = f"memory://b{uuid.uuid4().hex[:12]}/runs"
    return WatchConfig(path=url, runs=runs)  # type: ignore[arg-type]


def _poller(store: Store, watch: WatchConfig) -> ObjectWatch:
    reconciler = Reconciler(store)
    watches = ObjectWatches((watch,), lambda spec, obs: reconciler.reconcile(spec, None, obs))
    (w,) = watches.watches
    return w


def _recorded(path: Path) -> list[tuple[Any, ...]]:
    return query(path, "SELECT prefix, step, state FROM checkpoints ORDER BY prefix")


def test_records_what_a_bucket_holds_and_idles_cheaply(
    golden: Corpus, db: tuple[Store, Path]
) -> None:
    store, path = db
    watch = _watch()
    w = _poller(store, watch)
    objects = w._open()
    for kind in ("tf1", "tf2"):
        upload(objects, golden.run_dir(kind), kind)
    assert w.poll() == 6
    rows = _recorded(path)
    assert [(p.rsplit("/", 2)[-2:], s, st) for p, s, st in rows][:1] == [
        (["tf1", "model.ckpt-10"], 10, "complete")
    ]
    assert all(p.startswith(str(watch.path) + "/") for p, _, _ in rows)
    runs = query(path, "SELECT name, path, watch_path FROM runs ORDER BY name")
    assert runs == [
        ("tf1", f"{watch.path}/tf1", str(watch.path)),
        ("tf2", f"{watch.path}/tf2", str(watch.path)),
    ]
    # Idle: this small watch is listed whole, in one request; nothing is read.
    before = objects.requests
    assert w.poll() == 0
    assert objects.requests - before == 1
    # Listed run by run (a watch holding more than a page of objects per run): one delimiter
    # listing of the watch, one listing per run.
    w.whole = False
    before = objects.requests
    assert w.poll() == 0
    assert objects.requests - before == 1 + 2
    assert w.whole  # back to one listing: it costs fewer requests here
    # A new checkpoint of one run: recorded at the next poll.
    run = golden.run_dir("tf2")
    data = (run / "ckpt-30.data-00000-of-00001").read_bytes()
    objects.put(f"{objects.root}/tf2/ckpt-40.data-00000-of-00001", data)
    assert w.poll() == 0  # data without its index: a save in progress, not recorded
    objects.put(f"{objects.root}/tf2/ckpt-40.index", (run / "ckpt-30.index").read_bytes())
    assert w.poll() == 1
    assert len(_recorded(path)) == 7


@pytest.mark.parametrize("fault", ["throttled", "truncated"])
def test_a_failing_store_is_reported_and_recovered_from(
    golden: Corpus, db: tuple[Store, Path], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    store, path = db
    w = _poller(store, _watch())
    objects = w._open()
    upload(objects, golden.run_dir("tf2"), "r")
    real = objects.read_range

    def broken(key: str, start: int, end: int, **kwargs: Any) -> bytes:
        if fault == "throttled":
            raise StoreError("throttled", "GET failed: 503 SlowDown (throttled)")
        return real(key, start, end, **kwargs)[:-1]  # a range cut short

    monkeypatch.setattr(objects, "read_range", broken)
    with pytest.raises(Exception) as failure:
        w.poll()
    assert w.failed(failure.value) > 0
    assert _recorded(path) == []  # nothing concluded from a failed or short read
    error = w.describe(True)["last_error"]
    assert ("SlowDown" if fault == "throttled" else "retrying") in error
    monkeypatch.setattr(objects, "read_range", real)
    assert w.poll() == 3
    assert w.describe(True)["last_error"] is None


def test_a_run_deleted_from_the_bucket_goes_gone(golden: Corpus, db: tuple[Store, Path]) -> None:
    store, path = db
    w = _poller(store, _watch())
    objects = w._open()
    upload(objects, golden.run_dir("tf2"), "r")
    assert w.poll() == 3
    objects.put(f"{objects.bucket}/README", b"another tool's object")
    objects.delete(o.key for o in objects.list_tree(f"{objects.root}/r/"))
    w.poll()
    assert {st for _, _, st in _recorded(path)} == {"gone"}


def test_a_missing_bucket_concludes_nothing(
    golden: Corpus, db: tuple[Store, Path], bucket: Any, objstore_env: dict[str, str]
) -> None:
    """Every run listing empty because the bucket is gone (on a real S3 or GCS server) is a
    failure to report, not every checkpoint deleted."""
    store, path = db
    watch = WatchConfig(path=bucket.url_of("runs"), runs="*", endpoint_url=bucket.server.endpoint)
    w = _poller(store, watch)
    upload(w._open(), golden.run_dir("tf2"), "r")
    assert w.poll() == 3
    bucket.fs.rm(bucket.name, recursive=True)  # the bucket and all in it
    with pytest.raises(StoreError) as failure:
        w.poll()
    assert failure.value.kind == "missing bucket"
    assert {st for _, _, st in _recorded(path)} == {"complete"}


def test_run_once_polls_object_store_watches(golden: Corpus, tmp_path: Path) -> None:
    """``ckptd run --once`` (the Daemon's run_once) records an object store watch's runs,
    beside a local watch."""
    from ckptd.config import Config, DaemonConfig
    from ckptd.daemon.main import Daemon

    local = golden.copy("tf1", tmp_path / "local" / "tf1").parent
    bucket = _watch()
    db = tmp_path / "ckptd.db"
    config = Config(
        "<test>",
        DaemonConfig(f"sqlite:///{db}"),
        (WatchConfig(path=local, runs="*"), bucket),
    )
    daemon = Daemon(config)
    (w,) = daemon.objwatch.watches
    upload(w._open(), golden.run_dir("tf2"), "r")
    try:
        assert daemon.run_once() == 3 + 3
    finally:
        daemon.store.close()
    runs = query(db, "SELECT name, watch_path FROM runs ORDER BY name")
    assert runs == [("r", str(bucket.path)), ("tf1", str(local))]


def test_a_run_deleted_while_no_daemon_watched_goes_gone(
    golden: Corpus, db: tuple[Store, Path]
) -> None:
    from ckptd.store import runs as store_runs

    store, path = db
    watch = _watch()
    w = _poller(store, watch)
    objects = w._open()
    upload(objects, golden.run_dir("tf2"), "r")
    upload(objects, golden.run_dir("tf1"), "s")
    assert w.poll() == 6
    objects.delete(o.key for o in objects.list_tree(f"{objects.root}/r/"))
    # A daemon started afresh: it knows the watch's runs from the database only.
    reconciler = Reconciler(store)
    again = ObjectWatches(
        (watch,),
        lambda spec, obs: reconciler.reconcile(spec, None, obs),
        lambda url: [r.name for r in store_runs.present_runs(store, url)],
    ).watches[0]
    again.poll()
    states = {(p.rsplit("/", 2)[-2], st) for p, _, st in _recorded(path)}
    assert states == {("r", "gone"), ("s", "complete")}
