"""ckptd.io.objstore.Store against the real servers (SeaweedFS for S3, fake-gcs-server for GCS):
delimiter listings, stat, ranged reads, versions, request counts, and failures sorted into kinds
that say what to do."""

from __future__ import annotations

import pytest

from ckptd.io.objstore import Retry, Store, StoreError, open_store
from tests.conftest import Corpus
from tests.objfixtures import Bucket
from tests.objupload import upload_run


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
    assert store.counts() == {"LIST": 0, "GET": 3, "HEAD": 3, "PUT": 0, "DELETE": 0}


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
    assert store.counts()["DELETE"] == 1 and store.counts()["PUT"] == 3


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
