"""ckptd.io.objstore.Store against the real servers (SeaweedFS for S3, fake-gcs-server for GCS):
delimiter listings, stat, ranged reads, versions, request counts, and failures sorted into kinds
that say what to do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ckptd.io.objstore import Retry, Store, StoreError, open_store
from tests.conftest import Corpus
from tests.objfaults import FaultProxy, fault_proxy
from tests.objfixtures import Bucket
from tests.objupload import upload_checkpoint, upload_run


@pytest.fixture(autouse=True)
def _credentials(objstore_env: dict[str, str]) -> None:
    """Every test here reaches the server as ckptd would: through the environment."""


def store_of(bucket: Bucket, prefix: str = "", **kw: object) -> Store:
    return open_store(bucket.url_of(prefix), endpoint_url=bucket.server.endpoint, **kw)  # type: ignore[arg-type]


def test_list_dir_is_one_delimiter_listing(
    bucket: Bucket, golden: Corpus, objstore_env: dict[str, str]
) -> None:
    upload_run(bucket.fs, golden.run_dir("tf1"), bucket.key("runs/tf1"), scheme=bucket.scheme)
    upload_run(bucket.fs, golden.run_dir("tf2"), bucket.key("runs/tf2"), scheme=bucket.scheme)
    bucket.put("runs/README", b"not a run")
    store = store_of(bucket, "runs")

    objects, prefixes = store.list_dir()
    assert [o.name for o in objects] == ["README"]
    assert sorted(prefixes) == [bucket.key("runs/tf1"), bucket.key("runs/tf2")]
    objects, prefixes = store.list_dir(bucket.key("runs/tf1"))
    names = sorted(o.name for o in objects)
    assert "model.ckpt-30.index" in names and "checkpoint" in names and prefixes == []
    local = golden.run_dir("tf1") / "model.ckpt-30.data-00000-of-00001"
    data = next(o for o in objects if o.name == local.name)
    assert data.size == local.stat().st_size and data.version and data.mtime_ns > 0
    assert store.counts()["LIST"] == 2 and store.requests == 2


def test_empty_or_absent_prefix_lists_empty(bucket: Bucket) -> None:
    store = store_of(bucket, "nothing/here")
    assert store.list_dir() == ([], [])
    store.check_access()  # the bucket is there: an empty prefix is fine


def test_stat_and_ranged_read(bucket: Bucket, golden: Corpus) -> None:
    index = golden.run_dir("tf2") / "ckpt-30.index"
    body = index.read_bytes()
    bucket.put("r/ckpt-30.index", body)
    store = store_of(bucket, "r")

    info = store.stat(bucket.key("r/ckpt-30.index"))
    assert info is not None and info.size == len(body) and info.name == "ckpt-30.index"
    assert store.stat(bucket.key("r/absent")) is None
    # The footer of a TF table (the last 48 bytes), as the index reader asks for it.
    tail = store.read_range(info.key, len(body) - 48, len(body), size=info.size)
    assert tail == body[-48:]
    assert store.read_range(info.key, 10, 10_000) == body[10:]  # clipped at the object's end
    assert store.read_range(info.key, 5, 5) == b""
    assert store.read(info.key) == body
    counts = store.counts()
    # The libraries look for a "directory" when a key is absent: a LIST after that HEAD.
    assert counts["GET"] == 3 and counts["HEAD"] == 3 and counts["LIST"] <= 1
    assert counts["PUT"] == counts["DELETE"] == 0


def test_version_changes_when_an_object_is_rewritten(bucket: Bucket) -> None:
    store = store_of(bucket, "r")
    key = bucket.key("r/events.out.tfevents.1")
    store.put(key, b"first flush")
    first = store.stat(key)
    store.put(key, b"first flush")  # the same bytes again: still a new upload
    same_bytes = store.stat(key)
    store.put(key, b"first flush, second flush")
    second = store.stat(key)
    assert first is not None and same_bytes is not None and second is not None
    assert second.version != first.version and second.size == len(b"first flush, second flush")
    if bucket.scheme == "gs":  # a generation is per upload; an S3 ETag is the bytes' MD5
        assert same_bytes.version != first.version
    listed = {o.key: o for o in store.list_dir()[0]}
    assert listed[key].version == second.version


def test_put_and_delete_only_named_objects(bucket: Bucket) -> None:
    store = store_of(bucket, "r")
    for name in ("a", "b", "c"):
        store.put(bucket.key(f"r/{name}"), name.encode())
    store.delete([bucket.key("r/a"), bucket.key("r/b")])
    store.delete([])
    assert bucket.names("r") == ["r/c"]
    # S3 deletes up to 1000 keys in one request; gcsfs sends one request per key.
    assert store.counts()["DELETE"] == (1 if bucket.scheme == "s3" else 2)
    assert store.counts()["PUT"] == 3


def test_missing_bucket_is_its_own_kind(bucket: Bucket) -> None:
    store = open_store(
        f"{bucket.scheme}://{bucket.name}-nope/runs", endpoint_url=bucket.server.endpoint
    )
    with pytest.raises(StoreError) as exc:
        store.check_access()
    assert exc.value.kind == "missing bucket" and "does not exist" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)
def test_wrong_credentials_are_denied_not_retried(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ckptd-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = store_of(bucket, "runs")
    with pytest.raises(StoreError) as exc:
        store.list_dir()
    assert exc.value.kind == "denied" and "credentials" in str(exc.value)
    assert "wrong" not in str(exc.value)
    assert store.requests == 1 and store.retries == 0  # a refusal is not tried again


@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)
def test_no_credentials_are_denied(bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError) as exc:
        store_of(bucket, "runs").check_access()
    assert exc.value.kind == "denied", (str(exc.value), repr(exc.value.__cause__))


def test_unreachable_server_is_retried_then_reported(bucket: Bucket) -> None:
    from tests.objservers import free_ports

    (port,) = free_ports(1)
    waits: list[float] = []
    store = open_store(
        bucket.url_of("runs"),
        endpoint_url=f"http://127.0.0.1:{port}",
        retry=Retry(attempts=3, base=0.01, cap=0.02),
        sleep=waits.append,
    )
    with pytest.raises(StoreError) as exc:
        store.list_dir()
    assert exc.value.kind == "unreachable" and exc.value.attempts == 3
    assert f"127.0.0.1:{port}" in str(exc.value)
    assert store.counts()["LIST"] == 3 and store.retries == 2 and len(waits) == 2


# ------------------------------------------------------------------ faults, through a proxy


@pytest.fixture
def proxy(bucket: Bucket) -> Iterator[FaultProxy]:
    with fault_proxy(bucket.server.endpoint, bucket.scheme) as p:
        yield p


def proxied(bucket: Bucket, proxy: FaultProxy, waits: list[float], attempts: int = 4) -> Store:
    return open_store(
        bucket.url_of("r"),
        endpoint_url=proxy.endpoint,
        retry=Retry(attempts=attempts, base=0.01, cap=0.05),
        sleep=waits.append,
    )


def test_requests_counted_are_the_requests_sent(bucket: Bucket, proxy: FaultProxy) -> None:
    store = proxied(bucket, proxy, [])
    store.put(bucket.key("r/a.index"), b"x" * 100)
    store.list_dir()
    store.stat(bucket.key("r/a.index"))
    store.stat(bucket.key("r/absent"))
    store.read_range(bucket.key("r/a.index"), 10, 20, size=100)
    store.delete([bucket.key("r/a.index")])
    assert store.requests == len(proxy.requests), (store.counts(), proxy.requests)


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_throttled_or_dropped_requests_are_retried(
    bucket: Bucket, proxy: FaultProxy, fault: str
) -> None:
    bucket.put("r/model.ckpt-1.index", b"index bytes")
    waits: list[float] = []
    store = proxied(bucket, proxy, waits)
    proxy.fail(fault, times=2)
    objects, _ = store.list_dir()
    assert [o.name for o in objects] == ["model.ckpt-1.index"]
    assert store.last_error is not None
    assert store.last_error.kind == ("throttled" if fault == "503" else "unreachable")
    assert proxy.pending() == 0 and len(proxy.requests) == 3
    if fault == "503":
        assert store.retries == 2 and len(waits) == 2 and store.requests == 3
    else:
        # aiohttp itself sends an idempotent request again, once, when a kept-alive
        # connection closes unanswered (it cannot tell a drop from a stale connection).
        assert 1 <= store.retries <= 2 and 2 <= store.requests <= 3


def test_throttling_that_persists_is_reported_after_bounded_attempts(
    bucket: Bucket, proxy: FaultProxy
) -> None:
    store = proxied(bucket, proxy, [], attempts=3)
    proxy.fail("503", times=10)
    with pytest.raises(StoreError) as exc:
        store.list_dir()
    assert exc.value.kind == "throttled" and exc.value.attempts == 3
    assert "poll_interval" in str(exc.value)
    assert store.errors() == {"throttled": 3} and store.last_error is exc.value
    assert len(proxy.requests) == 3 and proxy.pending() == 7


@pytest.mark.parametrize("fault", ["truncate", "cut"])
def test_truncated_ranges_are_retried(bucket: Bucket, proxy: FaultProxy, fault: str) -> None:
    body = bytes(range(256)) * 4
    bucket.put("r/ckpt.data-00000-of-00001", body)
    store = proxied(bucket, proxy, [])
    key = bucket.key("r/ckpt.data-00000-of-00001")
    is_get = lambda method, path: method == "GET" and "ckpt.data" in path  # noqa: E731
    proxy.fail(fault, times=1, match=is_get)
    assert store.read_range(key, 100, 900, size=len(body)) == body[100:900]
    assert store.retries == 1 and store.last_error is not None
    assert store.last_error.kind in ("truncated", "unreachable")
    # Without the size: the short body is checked against the object's size (a HEAD).
    proxy.fail(fault, times=1, match=is_get)
    assert store.read_range(key, 0, 512) == body[:512]
    assert store.requests == len(proxy.requests)


def test_truncated_every_time_is_reported(bucket: Bucket, proxy: FaultProxy) -> None:
    body = b"x" * 1000
    bucket.put("r/ckpt.index", body)
    store = proxied(bucket, proxy, [], attempts=2)
    proxy.fail("truncate", times=5, match=lambda m, p: m == "GET" and "ckpt.index" in p)
    with pytest.raises(StoreError) as exc:
        store.read_range(bucket.key("r/ckpt.index"), 0, 1000, size=1000)
    assert exc.value.kind == "truncated" and "after 2 attempts" in str(exc.value)


# ------------------------------------------------------------------ the test helpers themselves


def test_uploads_follow_tensorflows_order(bucket: Bucket, golden: Corpus) -> None:
    run = golden.run_dir("sharded")
    order: list[str] = []
    keys = upload_checkpoint(bucket.fs, run, bucket.key("r"), "ckpt-10", before_each=order.append)
    names = [k.rsplit("/", 1)[-1] for k in keys]
    assert order == keys and names[-1] == "ckpt-10.index"
    assert names[:-1] == [f"ckpt-10.data-0000{i}-of-00004" for i in range(4)]
    for name in names:
        assert bucket.get(f"r/{name}") == (run / name).read_bytes()


def test_uploads_stopped_half_way(bucket: Bucket, golden: Corpus) -> None:
    run = golden.run_dir("sharded")
    upload_run(bucket.fs, run, bucket.key("data-only"), scheme=bucket.scheme, stop="data")
    upload_run(bucket.fs, run, bucket.key("no-shard"), scheme=bucket.scheme, stop="shard")
    data_only = bucket.names("data-only")
    assert "data-only/ckpt-10.index" in data_only and "data-only/ckpt-20.index" not in data_only
    assert "data-only/ckpt-20.data-00003-of-00004" in data_only
    # The state file names the last complete checkpoint only.
    state = bucket.get("data-only/checkpoint").decode()
    assert 'model_checkpoint_path: "ckpt-10"' in state and "ckpt-20" not in state
    no_shard = bucket.names("no-shard")
    assert "no-shard/ckpt-20.index" in no_shard
    assert "no-shard/ckpt-20.data-00003-of-00004" not in no_shard
    assert "no-shard/ckpt-20.data-00002-of-00004" in no_shard


@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)
def test_server_restart_is_unreachable_then_recovers(bucket: Bucket) -> None:
    bucket.put("r/a", b"kept on disk")
    store = store_of(bucket, "r", retry=Retry(attempts=2, base=0.01, cap=0.01))
    assert [o.name for o in store.list_dir()[0]] == ["a"]
    bucket.server.stop()
    try:
        with pytest.raises(StoreError) as exc:
            store.list_dir()
        assert exc.value.kind == "unreachable"
    finally:
        bucket.server.start()
    assert [o.name for o in store.list_dir()[0]] == ["a"]  # SeaweedFS keeps its data


@pytest.mark.parametrize("objstore_server", ["s3"], indirect=True)
def test_credentials_never_reach_a_debug_log(
    bucket: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from ckptd import logs
    from tests.objservers import ACCESS_KEY, SECRET_KEY

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup("debug")
        logging.getLogger("ckptd.test").debug("debug logging is on")
        store = store_of(bucket, "r")
        store.put(bucket.key("r/a"), b"x")
        store.list_dir()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "debug logging is on" in err
    assert ACCESS_KEY not in err and SECRET_KEY not in err and "Signature=" not in err


def test_a_refusal_is_denied_and_not_retried(bucket: Bucket, proxy: FaultProxy) -> None:
    store = proxied(bucket, proxy, [])
    proxy.fail("403", times=5)
    with pytest.raises(StoreError) as exc:
        store.list_dir()
    assert exc.value.kind == "denied" and exc.value.attempts == 1
    where = "AWS_ACCESS_KEY_ID" if bucket.scheme == "s3" else "GOOGLE_APPLICATION_CREDENTIALS"
    assert where in str(exc.value) and "\n" not in str(exc.value)
    assert len(proxy.requests) == 1 and store.retries == 0


def test_a_read_of_one_version_never_mixes_in_another(bucket: Bucket) -> None:
    store = store_of(bucket, "r")
    key = bucket.key("r/events.out.tfevents.1")
    store.put(key, b"first flush")
    old = store.stat(key)
    assert old is not None
    assert store.read_range(key, 0, 5, size=old.size, version=old.version) == b"first"
    store.put(key, b"FIRST FLUSH, second flush")  # re-uploaded whole, as GCS event files are
    new = store.stat(key)
    assert new is not None
    with pytest.raises(StoreError) as exc:
        store.read_range(key, 0, 5, size=old.size, version=old.version)
    assert exc.value.kind == "changed" and "list it again" in str(exc.value)
    assert str(exc.value).startswith(f"{bucket.scheme}://{key}: ")
    assert store.retries == 0  # not a transient failure
    # From the remembered offset of the new version on.
    tail = store.read_range(key, 11, new.size, size=new.size, version=new.version)
    assert tail == b", second flush"


def test_a_stalled_server_times_out_as_unreachable(bucket: Bucket, proxy: FaultProxy) -> None:
    store = open_store(
        bucket.url_of("r"),
        endpoint_url=proxy.endpoint,
        retry=Retry(attempts=2, base=0.01, cap=0.01),
        timeouts=(1.0, 0.5),
    )
    proxy.fail("hang", times=5)
    with pytest.raises(StoreError) as exc:
        store.list_dir()
    assert exc.value.kind == "unreachable" and exc.value.attempts == 2
