"""Observing runs on an object store: the listing of real TF checkpoints uploaded object by
object gives the observation the same run gives on a local disk; half-way uploads are never
complete; a rewritten object is a new version; event files are read on from their offset.

These run on fsspec's in-process ``memory://`` store (the parsing is the same whatever the
server); ``test_objwatch_daemon.py`` runs the daemon against real S3 and GCS servers.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.recording import RunDir, RunState, diff
from ckptd.io import formats
from ckptd.io.objstore import open_store
from ckptd.io.objstore.listing import discover_runs, list_run
from ckptd.io.objstore.observe import observe_listing, settled
from ckptd.io.objstore.store import Store
from ckptd.io.observe import Request, observe
from tests.conftest import Corpus


@pytest.fixture
def store() -> Store:
    return open_store(f"memory://b{uuid.uuid4().hex[:12]}/runs")


def upload(store: Store, run: Path, name: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """``run``'s files as objects of the run ``name``, in the order TensorFlow wrote them
    (their mtimes), leaving out names ending in ``skip``; returns the uploaded names."""
    files = sorted(
        (p for p in run.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_mtime_ns, p.name)
    )
    done = []
    for p in files:
        rel = p.relative_to(run).as_posix()
        if rel.endswith(skip):
            continue
        store.put(f"{store.root}/{name}/{rel}", p.read_bytes())
        done.append(rel)
    return done


def look(store: Store, name: str, state: RunState | None = None) -> tuple[Request, object]:
    req = (
        Request.first_look(Path("/unused"), None, 120.0)
        if state is None
        else Request.for_state(RunDir(name, Path("/unused"), Path("/unused")), state, 120.0)
    )
    return req, observe_listing(store, list_run(store, name), req)


def _summary(found: tuple[formats.Found, ...] | list[formats.Found], base: str) -> list[tuple]:
    return sorted((f.prefix[len(base) + 1 :], f.format, f.step, f.state, f.files) for f in found)


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded", "keras"])
def test_same_observation_as_the_local_run(golden: Corpus, store: Store, kind: str) -> None:
    local = observe(Request.first_look(golden.run_dir(kind), None, 1e9))
    upload(store, golden.run_dir(kind), kind)
    listing = list_run(store, kind)
    obs = observe_listing(store, listing, Request.first_look(Path("/unused"), None, 1e9))
    assert obs.present
    assert _summary(obs.found, listing.url) == _summary(local.found, str(golden.run_dir(kind)))
    assert all(f.state == formats.COMPLETE for f in obs.found)

    # The event files' scalars too, under the same names (eval/… from the subdirectory).
    def scalars(o: object, base: str) -> set[tuple]:
        return {
            (k[len(base) + 1 :], s)
            for k, t in o.events.items()  # type: ignore[attr-defined]
            for s in (t.read.scalars if t.read else ())
        }

    assert scalars(obs, listing.url) == scalars(local, str(golden.run_dir(kind)))
    assert settled(obs)


def test_discovers_runs_with_delimiter_listings(golden: Corpus, store: Store) -> None:
    for kind in ("tf1", "tf2"):
        upload(store, golden.run_dir(kind), f"team/{kind}")
    assert discover_runs(store, "*/*") == ["team/tf1", "team/tf2"]
    assert discover_runs(store, "*/tf2") == ["team/tf2"]
    assert discover_runs(store, None) == [""]


@pytest.mark.parametrize(
    ("missing", "why"),
    [
        ("ckpt-30.index", "index not uploaded yet"),  # the data is there, the index is not
        ("ckpt-30.data-00000-of-00001", "missing data shard"),  # an index without its shard
    ],
)
def test_half_way_upload_is_never_complete(
    golden: Corpus, store: Store, missing: str, why: str
) -> None:
    upload(store, golden.run_dir("tf2"), "r", skip=(missing,))
    _req, obs = look(store, "r")
    last = {f.prefix.rsplit("/", 1)[1]: f for f in obs.found}["ckpt-30"]  # type: ignore[attr-defined]
    assert last.state != formats.COMPLETE
    assert why in (last.reason or "")
    changes = diff(obs, RunState(1, 1))  # type: ignore[arg-type]
    assert "ckpt-30" not in {f.prefix.rsplit("/", 1)[1] for f in changes.recorded}


def test_sharded_checkpoint_missing_one_shard(golden: Corpus, store: Store) -> None:
    upload(store, golden.run_dir("sharded"), "r", skip=("ckpt-20.data-00002-of-00004",))
    _req, obs = look(store, "r")
    by = {f.prefix.rsplit("/", 1)[1]: f for f in obs.found}  # type: ignore[attr-defined]
    assert by["ckpt-10"].state == formats.COMPLETE
    assert by["ckpt-20"].state == formats.CORRUPT
    assert "missing data shard(s) 00002" in (by["ckpt-20"].reason or "")


def test_rewritten_object_is_a_new_version(golden: Corpus, store: Store) -> None:
    run = golden.run_dir("tf2")
    upload(store, run, "r")
    _req, first = look(store, "r")
    before = {f.prefix: f.signature for f in first.found}  # type: ignore[attr-defined]
    # Written again under the same name (a restarted trainer): another save, other bytes.
    store.put(f"{store.root}/r/ckpt-10.index", (run / "ckpt-20.index").read_bytes())
    store.put(
        f"{store.root}/r/ckpt-10.data-00000-of-00001",
        (run / "ckpt-20.data-00000-of-00001").read_bytes(),
    )
    _req, second = look(store, "r")
    after = {f.prefix: f.signature for f in second.found}  # type: ignore[attr-defined]
    ten = next(p for p in before if p.endswith("/ckpt-10"))
    assert after[ten][:2] != before[ten][:2]  # the identity the diff compares
    assert {p: s for p, s in after.items() if p != ten} == {
        p: s for p, s in before.items() if p != ten
    }


def test_unchanged_checkpoints_are_not_read_again(golden: Corpus, store: Store) -> None:
    upload(store, golden.run_dir("tf2"), "r")
    _req, obs = look(store, "r")
    state = RunState(
        1,
        1,
        scanned=True,
        checkpoints={
            f.prefix: _known(i, f)
            for i, f in enumerate(obs.found)  # type: ignore[attr-defined]
        },
        event_files={k: _file(t) for k, t in obs.events.items()},  # type: ignore[attr-defined]
    )
    before = store.requests
    _req, again = look(store, "r", state)
    assert store.requests - before == 1  # the listing alone: no index, no event file read
    assert diff(again, state).empty  # type: ignore[arg-type]


def _known(i: int, f: formats.Found) -> object:
    from ckptd.core.recording import Known

    return Known(i + 1, f.state, f.step, f.signature, f.format)


def _file(t: object) -> object:
    from ckptd.core.recording import EventFile

    return EventFile(t.read.offset if t.read else t.size)  # type: ignore[attr-defined]


def _events_file(golden: Corpus) -> Path:
    return next(golden.run_dir("tf2").glob("events.out.tfevents.*"))


def test_event_file_read_on_from_its_offset(golden: Corpus, store: Store) -> None:
    data = _events_file(golden).read_bytes()
    key = f"{store.root}/r/events.out.tfevents.1.host"
    half = len(data) // 2
    store.put(key, data[:half])  # a flush that ended mid-record
    _req, first = look(store, "r")
    ((url, tail),) = first.events.items()  # type: ignore[attr-defined]
    assert tail.read is not None and 0 < tail.read.offset <= half
    offset = tail.read.offset
    # GCS: each flush uploads the whole file again, as a new generation.
    store.put(key, data)
    state = RunState(1, 1, event_files={url: _file(tail)})  # type: ignore[dict-item]
    _req, second = look(store, "r", state)
    again = second.events[url]  # type: ignore[attr-defined]
    assert again.start == offset and again.read is not None
    assert again.read.offset == len(data)
    whole = observe_listing(
        store, list_run(store, "r"), Request.first_look(Path("/unused"), None, 120.0)
    ).events[url]
    assert whole.read is not None
    assert set(tail.read.scalars) | set(again.read.scalars) == set(whole.read.scalars)
    assert not set(tail.read.scalars) & set(again.read.scalars)


def test_run_gone_and_temp_objects(golden: Corpus, store: Store) -> None:
    _req, obs = look(store, "nothing")
    assert not obs.present  # type: ignore[attr-defined]
    store.put(f"{store.root}/r/ckpt-1.index.tempstate123", b"x")
    store.put(f"{store.root}/r/model.h5", b"x")
    _req, obs = look(store, "r")
    assert obs.found == ()  # type: ignore[attr-defined]
    assert [u for u, _ in obs.unread] == ["model.h5"]  # type: ignore[attr-defined]


def test_whole_watch_listing_splits_runs_as_run_listings_do(golden: Corpus, store: Store) -> None:
    from ckptd.io.objstore.listing import list_watch

    for kind in ("tf1", "tf2"):
        upload(store, golden.run_dir(kind), f"team/{kind}")
    store.put(f"{store.root}/team/notes.txt", b"beside the runs")
    whole = {r.key: r for r in list_watch(store, "*/*")}
    assert sorted(whole) == [f"{store.root}/team/tf1", f"{store.root}/team/tf2"]
    for name in ("team/tf1", "team/tf2"):
        one = list_run(store, name)
        assert whole[one.key].objects == one.objects
        assert whole[one.key].marker == one.marker
    (single,) = list_watch(store, None)  # the watch is one run
    assert single.key == store.root and single.objects == list_run(store, "").objects
    assert f"{store.root}/team/notes.txt" in {o.key for o in single.objects}


# ------------------------------------------------------------------ on real servers (S3, GCS)


def _server_store(bucket: Any) -> Store:
    return open_store(bucket.url_of("runs"), endpoint_url=bucket.server.endpoint)


def test_half_way_uploads_on_real_servers(
    golden: Corpus, bucket: Any, objstore_env: dict[str, str]
) -> None:
    from tests.objupload import upload_checkpoint, upload_run

    tf2, sharded = golden.run_dir("tf2"), golden.run_dir("sharded")
    upload_run(bucket.fs, tf2, bucket.key("runs", "a"), prefixes=["ckpt-10", "ckpt-20"])
    upload_checkpoint(bucket.fs, tf2, bucket.key("runs", "a"), "ckpt-30", stop="data")
    upload_checkpoint(bucket.fs, sharded, bucket.key("runs", "b"), "ckpt-10")
    upload_checkpoint(bucket.fs, sharded, bucket.key("runs", "b"), "ckpt-20", stop="shard")
    store = _server_store(bucket)
    states = {}
    for name in ("a", "b"):
        _req, obs = look(store, name)
        states |= {
            f"{name}/{f.prefix.rsplit('/', 1)[1]}": (f.state, f.step)
            for f in obs.found  # type: ignore[attr-defined]
        }
    assert states == {
        "a/ckpt-10": ("complete", 10),
        "a/ckpt-20": ("complete", 20),
        "a/ckpt-30": ("incomplete", 30),
        "b/ckpt-10": ("complete", 10),
        "b/ckpt-20": ("corrupt", 20),  # an index naming a shard that is not there
    }


def test_rewritten_object_is_a_new_version_on_real_servers(
    golden: Corpus, bucket: Any, objstore_env: dict[str, str]
) -> None:
    run = golden.run_dir("tf2")
    store = _server_store(bucket)
    upload(store, run, "r")
    _req, first = look(store, "r")
    before = {f.prefix.rsplit("/", 1)[1]: f.signature for f in first.found}  # type: ignore[attr-defined]
    other = (run / "ckpt-20.index").read_bytes()  # same size, other bytes
    assert len(other) == (run / "ckpt-10.index").stat().st_size
    store.put(f"{store.root}/r/ckpt-10.index", other)
    _req, second = look(store, "r")
    after = {f.prefix.rsplit("/", 1)[1]: f.signature for f in second.found}  # type: ignore[attr-defined]
    assert after["ckpt-10"][0] == before["ckpt-10"][0]  # the same size …
    assert after["ckpt-10"][1] != before["ckpt-10"][1]  # … but another version
    assert after["ckpt-20"] == before["ckpt-20"]
    if bucket.scheme == "gs":  # a generation changes even when the bytes do not
        store.put(f"{store.root}/r/ckpt-20.index", other)
        _req, third = look(store, "r")
        again = {f.prefix.rsplit("/", 1)[1]: f.signature for f in third.found}  # type: ignore[attr-defined]
        assert again["ckpt-20"][1] != after["ckpt-20"][1]


def test_event_file_uploaded_whole_at_each_flush(
    golden: Corpus, bucket: Any, objstore_env: dict[str, str]
) -> None:
    """GCS (and S3) have no append: TensorFlow uploads the event file whole at each flush, a
    new generation holding the old bytes first. It is read on from the offset: one ranged GET."""
    data = _events_file(golden).read_bytes()
    store = _server_store(bucket)
    key = f"{store.root}/r/events.out.tfevents.1.host"
    store.put(key, data[: len(data) // 2])
    _req, first = look(store, "r")
    ((url, tail),) = first.events.items()  # type: ignore[attr-defined]
    store.put(key, data)
    state = RunState(1, 1, scanned=True, event_files={url: _file(tail)})  # type: ignore[dict-item]
    before = store.requests
    _req, second = look(store, "r", state)
    again = second.events[url]  # type: ignore[attr-defined]
    assert store.requests - before == 2  # the listing, one ranged GET from the offset
    assert again.start == tail.read.offset and again.read.offset == len(data)
    whole = set(tail.read.scalars) | set(again.read.scalars)
    _req, fresh = look(store, "r")
    assert whole == set(fresh.events[url].read.scalars)  # type: ignore[attr-defined]


def test_object_rewritten_between_listing_and_read(
    golden: Corpus, bucket: Any, objstore_env: dict[str, str]
) -> None:
    """The listing's version is the one read: an index rewritten after the listing is not
    parsed against the listed sizes (never a mix); the checkpoint is looked at again."""
    run = golden.run_dir("tf2")
    store = _server_store(bucket)
    upload(store, run, "r")
    listing = list_run(store, "r")
    store.put(f"{store.root}/r/ckpt-10.index", (run / "ckpt-20.index").read_bytes())
    obs = observe_listing(store, listing, Request.first_look(Path("/unused"), None, 120.0))
    by = {f.prefix.rsplit("/", 1)[1]: f for f in obs.found}
    assert by["ckpt-10"].state == formats.INCOMPLETE
    assert "replaced while being read" in (by["ckpt-10"].reason or "")
    assert by["ckpt-20"].state == formats.COMPLETE
