"""Parsers of trainer-writable files against hostile input (issue 10, items 3, 4, 5 and 12).

Every attack is built as real bytes (a real SSTable layout, real TFRecord framing, real
TensorBoard protos) and checked on the behaviour that matters: refused with a reason, memory
bounded (tracemalloc peak, generous bounds), the daemon keeps recording.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from ckptd.config import parse_config
from ckptd.daemon.reconcile import Reconciler
from ckptd.daemon.runs import discover
from ckptd.io.eventfiles import MAX_RECORD, masked_crc32c, read_scalars
from ckptd.io.formats import CORRUPT, event_files, scan_run
from ckptd.io.formats import sstable as sst
from ckptd.io.formats import tensorbundle as tb
from ckptd.store import migrate, reads
from ckptd.store.db import make_engine, session_scope
from ckptd.store.handle import Store
from ckptd.store.recording import _from_ts
from tests.conftest import Corpus, query, wait_for, write_config

MiB = 1 << 20

# ------------------------------------------------------------------ building real SSTables


varint = tb._varint_bytes  # the encoder the reader itself uses for its keys


def block(entries: list[tuple[bytes, bytes]], restart_every: int = 16) -> bytes:
    """One uncompressed SSTable block with its trailer, as TensorFlow's table writer lays it."""
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        prev = key
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts) or 1)
    return trailer(bytes(out))


def trailer(raw: bytes) -> bytes:
    return raw + b"\0" + struct.pack("<I", masked_crc32c(raw + b"\0"))


def sstable(
    blocks: list[list[tuple[bytes, bytes]]],
    handles: Callable[[list[tuple[int, int]]], list[tuple[int, int]]] = lambda h: h,
) -> bytes:
    """An index file: data blocks, an empty meta block, the index block (one handle per data
    block, rewritten by ``handles``), the footer."""
    out, found = bytearray(), []
    for entries in blocks:
        b = block(entries)
        found.append((len(out), len(b) - 5))
        out += b
    meta = (len(out), len(block([])) - 5)
    out += block([])
    rows = [(b"k%08d" % i, varint(o) + varint(s)) for i, (o, s) in enumerate(handles(found))]
    index_block = block(rows, restart_every=1)
    index = (len(out), len(index_block) - 5)
    out += index_block
    footer = varint(meta[0]) + varint(meta[1]) + varint(index[0]) + varint(index[1])
    return bytes(out + footer.ljust(40, b"\0") + struct.pack("<Q", sst.TABLE_MAGIC))


def header(num_shards: int = 1) -> tuple[bytes, bytes]:
    return b"", b"\x08" + varint(num_shards)


def tensor_entry(shard: int = 0, offset: int = 0, size: int = 4) -> bytes:
    """A BundleEntryProto: float32, shape [1], in ``shard`` at ``offset``."""
    shape = b"\x12\x02\x08\x01"  # TensorShapeProto.dim { size: 1 }
    return (
        b"\x08\x01"
        + b"\x12"
        + varint(len(shape))
        + shape
        + b"\x18"
        + varint(shard)
        + b"\x20"
        + varint(offset)
        + b"\x28"
        + varint(size)
    )


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python allocations inside the block, in bytes (out[0])."""
    out = [0]
    tracemalloc.start()
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_the_builder_makes_indexes_the_reader_accepts() -> None:
    data = sstable([[header(), (b"a", tensor_entry(0, 0, 8)), (b"b", tensor_entry(0, 8, 4))]])
    assert tb.read_header(data) == tb.BundleHeader(1, False, {0: 12})
    assert [t.name for t in tb.list_tensors(data)] == ["a", "b"]


def test_real_indexes_rebuilt_block_by_block_parse_the_same(corpus: Corpus) -> None:
    """Real TF indexes re-laid out by this builder: the builder is TF's layout."""
    for kind in ("tf1", "tf2", "sharded"):
        for rec in corpus.saves[kind]:
            real = Path(rec["prefix"] + ".index").read_bytes()
            rebuilt = sstable([list(sst.entries(real))])
            assert tb.read_header(rebuilt) == tb.read_header(real)
            assert tb.list_tensors(rebuilt) == tb.list_tensors(real)


# ------------------------------------------------------------------ item 3: the bundle index


def test_index_claiming_2_to_the_40_shards_is_corrupt(tmp_path: Path) -> None:
    data = sstable([[header(2**40), (b"v", tensor_entry())]])
    assert len(data) < 160  # the attack is a ~124-byte file
    with pytest.raises(tb.BundleError, match="data shards"):
        tb.read_header(data)
    # Through the scanner (which once built a list of every shard number to find missing ones)
    (tmp_path / "model.ckpt-1.index").write_bytes(data)
    (tmp_path / "model.ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 4)
    with peak_memory() as peak:
        (found,) = scan_run(tmp_path)
    assert found.state == CORRUPT and "1,099,511,627,776 data shards" in (found.reason or "")
    assert peak[0] < 4 * MiB


def test_tensor_in_a_shard_the_header_does_not_have_is_corrupt() -> None:
    data = sstable([[header(2), (b"v", tensor_entry(shard=5))]])
    with pytest.raises(tb.BundleError, match="shard 5"):
        tb.read_header(data)


def test_index_block_repeating_one_handle_is_refused_in_bounded_memory() -> None:
    """Once: each repetition re-read the block, a 0.5 MB file grew past 4 GiB."""
    entries = [header()] + [(b"t%06d" % i, tensor_entry(0, 4 * i)) for i in range(400)]
    data = sstable([entries], handles=lambda h: h * 3000)
    assert len(data) < 128 * 1024
    with peak_memory() as peak, pytest.raises(tb.BundleError, match="overlaps"):
        tb.read_header(data)
    assert peak[0] < 8 * MiB


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda h: [h[0], h[0]], id="repeated"),
        pytest.param(lambda h: [h[1], h[0]], id="backwards"),
        pytest.param(lambda h: [h[0], (h[0][0] + 3, h[1][1])], id="overlapping"),
        pytest.param(lambda h: [h[0], (h[1][0], h[1][1] + 10**6)], id="past-the-index"),
    ],
)
def test_data_block_handles_must_be_increasing_and_inside_the_data_area(
    rewrite: Callable[[list[tuple[int, int]]], list[tuple[int, int]]],
) -> None:
    blocks = [[header(), (b"a", tensor_entry())], [(b"b", tensor_entry(0, 4))]]
    assert tb.read_header(sstable(blocks)).shard_bytes == {0: 8}
    with pytest.raises(tb.BundleError):
        tb.read_header(sstable(blocks, handles=rewrite))


def _shared_prefix_index(n: int) -> bytes:
    """One block of keys each one byte longer than the last and sharing all of it: legal
    prefix compression, but the keys add up to n**2 / 2 bytes."""
    raw = bytearray(b"\0\0\0")  # the header entry, empty key and value
    restart = len(raw)
    for i in range(n):
        raw += varint(i) + b"\x01\x00" + b"k"
    raw += struct.pack("<II", restart, 1)
    data_block = trailer(bytes(raw))
    meta = block([])
    index_block = block([(b"z", varint(0) + varint(len(data_block) - 5))], restart_every=1)
    off_meta, off_index = len(data_block), len(data_block) + len(meta)
    footer = varint(off_meta) + varint(len(meta) - 5)
    footer += varint(off_index) + varint(len(index_block) - 5)
    out = data_block + meta + index_block + footer.ljust(40, b"\0")
    return out + struct.pack("<Q", sst.TABLE_MAGIC)


def test_shared_prefix_keys_cost_work_linear_in_the_file() -> None:
    """4.8 MB of such keys took 14 s (quadratic); now refused, and memory stays bounded."""
    data = _shared_prefix_index(20_000)  # ~80 KB; the keys would add up to 200 MB
    with pytest.raises(tb.BundleError, match="keys"):
        tb.read_header(data)
    with peak_memory() as peak, pytest.raises(tb.BundleError, match="keys"):
        tb.list_tensors(data)  # keeps every name: once 200 MB here
    assert peak[0] < 16 * MiB


def test_a_real_index_with_thousands_of_long_shared_names_is_accepted() -> None:
    """TF's own layout (a whole key every 16 entries) stays far inside the key budget."""
    names = [
        b"model/encoder/layer_%04d/attention/a_rather_long_sublayer_name_%s/kernel" % (i, b"x" * 90)
        for i in range(3000)
    ]
    entries = [header()] + [(n, tensor_entry(0, 4 * i)) for i, n in enumerate(names)]
    data = sstable([entries])
    assert tb.read_header(data).shard_bytes == {0: 4 * 3000}
    assert [t.name.encode() for t in tb.list_tensors(data)] == names


# ------------------------------------------------------------------ event files: framing


def record(payload: bytes) -> bytes:
    head = struct.pack("<Q", len(payload))
    return (
        head
        + struct.pack("<I", masked_crc32c(head))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def scalar_event(step: int, tag: str = "loss", value: float = 0.5, **event: Any) -> bytes:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(
        step=step, wall_time=event.pop("wall_time", 1.0), summary=summary, **event
    ).SerializeToString()


def tensor_event(step: int, tag: str, **fields: Any) -> bytes:
    fields.setdefault("tensor_shape", tensor_shape_pb2.TensorShapeProto())
    t = tensor_pb2.TensorProto(**fields)
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, tensor=t)])
    return event_pb2.Event(step=step, wall_time=1.0, summary=summary).SerializeToString()


def _read(path: Path, offset: int = 0) -> Any:
    return read_scalars(path, offset, "", root=path.parent)


def test_bad_values_are_skipped_and_counted_and_reading_goes_on(tmp_path: Path) -> None:
    """Once a 1-byte tensor_content raised struct.error out of read_scalars, and the whole run
    stopped being recorded."""
    path = tmp_path / "events.out.tfevents.1.bad"
    records = [
        scalar_event(1, value=0.25),
        tensor_event(2, "short_content", dtype=1, tensor_content=b"\x01"),
        tensor_event(3, "long_content", dtype=2, tensor_content=b"\x01" * 9),
        tensor_event(4, "half_high", dtype=19, half_val=[70000]),
        tensor_event(5, "half_negative", dtype=19, half_val=[-1]),
        scalar_event(6, wall_time=float("nan")),
        b"\x0a\xff\xff\xff\xff\x0f",  # a valid frame around bytes that are no Event
        scalar_event(7, value=0.75),
    ]
    path.write_bytes(b"".join(record(r) for r in records))
    r = _read(path)
    assert r.error is None and r.retry is None
    assert r.offset == path.stat().st_size
    assert [(s.name, s.step, s.value) for s in r.scalars] == [("loss", 1, 0.25), ("loss", 7, 0.75)]
    assert r.skipped == 6 and "short_content" in (r.skip_reason or "")


def test_a_broken_frame_is_corrupt_with_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.frame"
    good = record(scalar_event(1))
    bad = bytearray(record(scalar_event(2)))
    bad[3] ^= 1  # the length field no longer matches its checksum
    path.write_bytes(good + bytes(bad) + record(scalar_event(3)))
    r = _read(path)
    assert [s.step for s in r.scalars] == [1]
    assert r.offset == len(good) and r.error == f"corrupt record header at byte {len(good)}"


def test_large_event_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """Image-sized records between scalars: once the file was read whole (a 2 GiB file cost
    2 GiB in every backfill worker); now in chunks, the oversized record stepped over."""
    path = tmp_path / "events.out.tfevents.1.images"
    image = event_pb2.Event(
        step=2,
        summary=summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag="img",
                    image=summary_pb2.Summary.Image(encoded_image_string=os.urandom(MAX_RECORD)),
                )
            ]
        ),
    ).SerializeToString()
    # ~20 MB of records read and decoded, none of them a scalar (a [25000] float tensor)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=25000)]
    )
    medium = [
        tensor_event(
            100 + i, "hist", dtype=1, tensor_content=os.urandom(100_000), tensor_shape=shape
        )
        for i in range(200)
    ]
    with path.open("wb") as fh:
        fh.write(record(scalar_event(1)))
        fh.write(record(image))
        del image
        for m in medium:
            fh.write(record(m))
        fh.write(record(scalar_event(3)))
    size = path.stat().st_size
    assert size > 2 * MAX_RECORD
    with peak_memory() as peak:
        r = _read(path)
    assert r.error is None and r.offset == size
    assert [s.step for s in r.scalars] == [1, 3]
    assert r.skipped == 1 and "over" in (r.skip_reason or "")
    assert peak[0] < 8 * MiB, peak[0]


def test_sparse_2_gib_event_file_costs_no_memory(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.sparse"
    head = record(scalar_event(1))
    with path.open("wb") as fh:
        fh.write(head)
        fh.truncate(2 << 30)  # a hole: zeros, no blocks
    with peak_memory() as peak:
        r = _read(path)
    assert [s.step for s in r.scalars] == [1]
    assert r.offset == len(head) and r.error and "corrupt record header" in r.error
    assert peak[0] < 4 * MiB
    # A header claiming a 2 GiB record is stepped over without reading it.
    big = struct.pack("<Q", (2 << 30) - 100)
    with path.open("wb") as fh:
        fh.write(big + struct.pack("<I", masked_crc32c(big)))
        fh.truncate(12 + (2 << 30) - 100 + 4)
        fh.seek(0, 2)
        fh.write(record(scalar_event(9)))
    with peak_memory() as peak:
        r = _read(path)
    assert r.error is None and [s.step for s in r.scalars] == [9] and r.skipped == 1
    assert r.offset == path.stat().st_size and peak[0] < 4 * MiB


def test_symlinked_event_file_is_not_followed(corpus: Corpus, tmp_path: Path) -> None:
    outside = corpus.run_dir("tf2")
    (real,) = [p for p in event_files(outside) if p.parent.name == "eval"]
    run = tmp_path / "run"
    run.mkdir()
    link = run / real.name
    link.symlink_to(real)
    r = read_scalars(link, 0, "", root=tmp_path)
    assert r.scalars == [] and r.error == "not a regular file (a symlink)"
    # A symlinked directory on the way is refused the same way (never a retry).
    (run / "eval").symlink_to(real.parent)
    r = read_scalars(run / "eval" / real.name, 0, "eval", root=tmp_path)
    assert r.scalars == [] and r.retry is None and "symlink" in (r.error or "")


def test_fifo_event_file_is_corrupt_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "events.out.tfevents.1.fifo"
    os.mkfifo(fifo)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(_read(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=30)  # a hang guard, not a timing: the read must not block at all
    if reader.is_alive():  # blocked in open(): release it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=30)
        pytest.fail("reading a FIFO event file blocked")
    assert got[0].error == "not a regular file" and got[0].retry is None


def test_a_fifo_or_symlink_event_file_is_listed_so_its_read_reports_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "events.out.tfevents.1.fifo")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "events.out.tfevents.2.link").symlink_to("/dev/zero")
    (tmp_path / "events.out.tfevents.3.dir").mkdir()
    listed = sorted(p.relative_to(tmp_path).as_posix() for p in event_files(tmp_path))
    assert listed == ["eval/events.out.tfevents.2.link", "events.out.tfevents.1.fifo"]
    for path in listed:
        r = read_scalars(tmp_path / path, 0, "", root=tmp_path)
        assert r.scalars == [] and "not a regular file" in (r.error or "")


# ------------------------------------------------------------------ item 5: timestamps


def test_timestamps_are_clamped_to_what_a_datetime_holds() -> None:
    assert _from_ts(253402300800.0 + 3600) == datetime(9999, 12, 30)  # year 10000
    assert _from_ts(1e20) == datetime(9999, 12, 30)
    assert _from_ts(-1e15) == datetime(1, 1, 2)
    assert _from_ts(1.5) == datetime(1970, 1, 1, 0, 0, 1, 500000)
    assert _from_ts(0) is None


def _year_10000_dir() -> Path:
    """A directory whose filesystem keeps a year-10000 mtime (tmpfs does; ext4 wraps it)."""
    base = Path("/dev/shm")
    if not base.is_dir():
        pytest.skip("no tmpfs at /dev/shm to hold a year-10000 mtime")
    d = Path(tempfile.mkdtemp(prefix="ckptd-test-", dir=base))
    probe = d / "probe"
    probe.touch()
    os.utime(probe, (YEAR_10000, YEAR_10000))
    if probe.stat().st_mtime != YEAR_10000:
        shutil.rmtree(d)
        pytest.skip("/dev/shm cannot hold a year-10000 mtime")
    probe.unlink()
    return d


YEAR_10000 = 253402300800.0 + 3600


def test_live_daemon_records_past_a_bad_event_record_and_a_year_10000_mtime(
    corpus: Corpus, tmp_path: Path, daemon_factory: Any
) -> None:
    """A real daemon, real TF checkpoints: one bad record, one impossible mtime, and every
    later checkpoint of the run is still recorded."""
    watch = _year_10000_dir()
    try:
        run = corpus.copy("tf2", watch / "run")
        saves = corpus.saves["tf2"]
        first = Path(saves[0]["prefix"]).name
        for f in run.glob(first + ".*"):
            os.utime(f, (YEAR_10000, YEAR_10000))
        (eval_file,) = [p for p in event_files(run) if p.parent.name == "eval"]
        with eval_file.open("ab") as fh:
            fh.write(record(tensor_event(7, "accuracy", dtype=1, tensor_content=b"\x01")))
            fh.write(record(tensor_event(7, "loss", dtype=19, half_val=[1 << 20])))
            writer = RecordWriter(fh)
            writer.write(scalar_event(999, tag="accuracy", value=0.125))
        db = tmp_path / "ckptd.db"
        config = write_config(tmp_path / "ckptd.toml", watch, db=db)
        daemon = daemon_factory(config)
        steps = sorted(s["step"] for s in saves)
        wait_for(
            lambda: (
                sorted(
                    r[0] for r in query(db, "SELECT step FROM checkpoints WHERE state = 'complete'")
                )
                == steps
            )
        )
        created = query(db, "SELECT created_at FROM checkpoints WHERE step = ?", steps[0])
        assert created[0][0].startswith("9999-12-30")
        # the value after the bad records was read; the file is not corrupt
        wait_for(lambda: query(db, "SELECT value FROM scalars WHERE step = 999") == [(0.125,)])
        assert query(db, "SELECT error FROM event_files WHERE error IS NOT NULL") == []
        # and a checkpoint written later is recorded too
        last = Path(saves[-1]["prefix"]).name
        for f in sorted(run.glob(last + ".*"), key=lambda f: f.suffix == ".index"):  # index last
            shutil.copy(f, run / f.name.replace(last, "ckpt-990"))
        wait_for(
            lambda: (
                query(db, "SELECT state FROM checkpoints WHERE prefix LIKE '%/ckpt-990'")
                == [("complete",)]
            )
        )
        assert "Traceback" not in daemon.log()
        assert "skipped 2 value(s)" in daemon.log()
        assert daemon.stop() == 0
    finally:
        shutil.rmtree(watch, ignore_errors=True)


# ------------------------------------------------------------------ item 12: transient errors


@contextmanager
def denied(name: str, errno_: int = 13) -> Iterator[None]:
    """Opening ``name`` fails with ``errno_`` (EACCES by default), whichever call opens it.

    Tests run as root, where chmod 000 denies nothing; this injects the error the kernel would
    return to the ckptd user.
    """
    real_os_open, real_io_open = os.open, io.open

    def check(path: Any) -> None:
        if os.fsdecode(path).rsplit("/", 1)[-1] == name:
            raise OSError(errno_, os.strerror(errno_), os.fsdecode(path))

    def os_open(path: Any, *a: Any, **k: Any) -> int:
        check(path)
        return real_os_open(path, *a, **k)

    def io_open(path: Any, *a: Any, **k: Any) -> Any:
        if isinstance(path, str | bytes | os.PathLike):
            check(path)
        return real_io_open(path, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "open", os_open)
    mp.setattr(io, "open", io_open)
    try:
        yield
    finally:
        mp.undo()


def _reconciler(tmp_path: Path) -> tuple[Reconciler, Any, Any]:
    root = tmp_path / "runs"
    root.mkdir(exist_ok=True)
    cfg = parse_config(
        {
            "daemon": {"database": f"sqlite:///{tmp_path}/ckptd.db"},
            "watch": [{"path": str(root), "runs": "*", "best": {"metric": "eval/accuracy"}}],
        }
    )
    engine = make_engine(cfg.daemon.database)
    migrate.upgrade(engine)
    return Reconciler(Store(engine)), cfg.watches[0], engine


def _eval_metrics(engine: Any) -> dict[int, float | None]:
    with session_scope(engine) as s:
        return {c.step: c.metrics.get("eval/accuracy") for c in reads.checkpoints(s)}


@pytest.mark.parametrize("errno_", [13, 5, 2], ids=["EACCES", "EIO", "ENOENT"])
def test_briefly_unreadable_event_file_is_read_at_the_next_scan(
    corpus: Corpus, tmp_path: Path, errno_: int
) -> None:
    rec, watch, engine = _reconciler(tmp_path)
    run = corpus.copy("tf2", tmp_path / "runs" / "r")
    (eval_file,) = [p for p in event_files(run) if p.parent.name == "eval"]
    (spec,) = discover(0, watch)
    expected = {s["step"]: s["metrics"]["eval/accuracy"] for s in corpus.saves["tf2"]}
    past = time.time() - 60  # directories settled long ago: a quick rescan could trust them
    for d in (run, eval_file.parent):
        os.utime(d, (past, past))

    with denied(eval_file.name, errno_):
        rec.reconcile_many([spec])
    assert set(_eval_metrics(engine).values()) == {None}  # recorded, without eval values yet
    assert query(tmp_path / "ckptd.db", "SELECT error FROM event_files") != []
    assert all(e is None for (e,) in query(tmp_path / "ckptd.db", "SELECT error FROM event_files"))
    assert not rec.unchanged(spec)  # regaining access changes no mtime: never skipped

    rec.reconcile(spec)  # the next scan, access back
    assert _eval_metrics(engine) == pytest.approx(expected, rel=1e-6)


def test_unreadable_event_file_is_read_after_a_restart(corpus: Corpus, tmp_path: Path) -> None:
    rec, watch, engine = _reconciler(tmp_path)
    run = corpus.copy("tf2", tmp_path / "runs" / "r")
    (eval_file,) = [p for p in event_files(run) if p.parent.name == "eval"]
    (spec,) = discover(0, watch)
    with denied(eval_file.name):
        rec.reconcile_many([spec])
    restarted = Reconciler(Store(engine))
    restarted.reconcile(spec)
    assert None not in _eval_metrics(engine).values()


def test_unreadable_error_stored_by_0_1_0_is_retried(corpus: Corpus, tmp_path: Path) -> None:
    """ckptd 0.1.0 stored EACCES as if the file were corrupt; such rows are read again."""
    rec, watch, engine = _reconciler(tmp_path)
    corpus.copy("tf2", tmp_path / "runs" / "r")
    (spec,) = discover(0, watch)
    rec.reconcile(spec)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE event_files SET error = 'unreadable: Permission denied', \"offset\" = 0"
        )
        conn.exec_driver_sql("DELETE FROM metrics")
        conn.exec_driver_sql("DELETE FROM scalars")
    restarted = Reconciler(Store(engine))
    restarted.reconcile(spec)
    assert None not in _eval_metrics(engine).values()


def test_step_too_big_for_the_database_does_not_block_the_run(
    corpus: Corpus, tmp_path: Path
) -> None:
    """``ckpt-99999999999999999999``: SQLite refused the step (OverflowError) and with it every
    other checkpoint of the run, at every scan."""
    rec, watch, engine = _reconciler(tmp_path)
    run = corpus.copy("tf2", tmp_path / "runs" / "r")
    huge = "9" * 20
    first = Path(corpus.saves["tf2"][0]["prefix"]).name
    for f in run.glob(first + ".*"):
        f.rename(run / f.name.replace(first, f"ckpt-{huge}"))
    keras = next(corpus.run_dir("keras").glob("*.keras"))
    shutil.copy(keras, run / f"model.{huge}-0.50.keras")
    (spec,) = discover(0, watch)
    rec.reconcile(spec)
    with session_scope(engine) as s:
        got = {Path(c.prefix).name: (c.step, c.state) for c in reads.checkpoints(s)}
    # The step is the one the checkpoint holds, not the name's (which it would be recorded
    # without, see test_recording_diff).
    assert got[f"ckpt-{huge}"] == (corpus.saves["tf2"][0]["step"], "complete")
    assert got[f"model.{huge}-0.50.keras"][0] is None
    later = [Path(s["prefix"]).name for s in corpus.saves["tf2"][1:]]
    assert all(got[name][1] == "complete" for name in later)


def test_a_long_hostile_keras_name_cannot_stall_the_template_parser() -> None:
    """Fields separated by text a number may contain ("1") backtracked as n**4: 200 digits took
    two minutes. Fields are now atomic; the join bound is a hang guard, not a timing."""
    from ckptd.io.kerasname import KerasTemplate

    template = KerasTemplate("{a}1{b}1{c}1{d}.keras")
    got: list[object] = []
    parser = threading.Thread(
        target=lambda: got.append(template.parse("1" * 300 + ".keras")), daemon=True
    )
    parser.start()
    parser.join(timeout=30)
    assert not parser.is_alive(), "parsing one file name took more than 30 s"
    assert got == [None]  # atomic fields cannot split a run of digits: no match, no metrics
    assert KerasTemplate("model.{epoch:02d}-{val_loss:.2f}.keras").parse("model.03-0.41.keras") == (
        3,
        {"val_loss": 0.41},
    )
