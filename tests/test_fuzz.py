"""Fuzzing every parser of files a trainer (or anyone) can write, seeded from real files.

Targets: the tensor bundle index (tensorbundle), event files (read_scalars and its record
framing), the ``checkpoint`` state file (statefile.parse) and Keras file names (KerasTemplate,
step_from_name). The TOML config has its own fuzz target with the config tests.

Property: only the module's own error type escapes (BundleError; nothing at all for the others),
and memory stays bounded (inputs are bounded; tracemalloc's peak stays within a small multiple of
the input). Inputs are mutations of real files from the ``corpus`` fixture — bytes flipped,
truncated, spliced, inserted; checksums re-sealed so the mutation reaches the parser behind them;
entries and records rebuilt with fuzzed fields — and not only random bytes.

The ``ckptd-fuzz-ci`` profile keeps this file within about a minute; ``make fuzz`` selects
``ckptd-fuzz-long`` (CKPTD_FUZZ=ckptd-fuzz-long) for a longer run.
"""

from __future__ import annotations

import math
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

from ckptd.io import statefile
from ckptd.io.eventfiles import read_scalars
from ckptd.io.formats import KerasTemplate, event_files, step_from_name
from ckptd.io.formats import sstable as sst
from ckptd.io.formats import tensorbundle as tb
from tests.conftest import Corpus
from tests.test_safety_parsers import record, sstable, trailer

_COMMON = dict(
    deadline=timedelta(seconds=10),  # generous: a hang or a blow-up, not a slow machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ckptd-fuzz-ci", max_examples=150, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("ckptd-fuzz-long", max_examples=20_000, **_COMMON)  # type: ignore[arg-type]
FUZZ = settings.get_profile(os.environ.get("CKPTD_FUZZ", "ckptd-fuzz-ci"))

MiB = 1 << 20


@dataclass
class Seeds:
    indexes: list[bytes]  # real .index files: TF1, TF2 (object graph), sharded
    events: list[bytes]  # real event files: TF1 (simple_value) and TF2 (tensor) summaries
    states: list[str]  # real ``checkpoint`` state files: TF1 (absolute), TF2 (relative, stamps)


@pytest.fixture(scope="module")
def seeds(golden: Corpus) -> Seeds:
    corpus = golden  # read only: the module-scoped seeds cannot use the per-test `corpus`
    indexes = [
        Path(corpus.saves[kind][0]["prefix"] + ".index").read_bytes()
        for kind in ("tf1", "tf2", "sharded")
    ]
    events = [p.read_bytes() for kind in ("tf1", "tf2") for p in event_files(corpus.run_dir(kind))]
    states = [(corpus.run_dir(k) / "checkpoint").read_text() for k in ("tf1", "tf2")]
    return Seeds(indexes, events, states)


@contextmanager
def bounded_memory(limit: int) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak {peak:,} bytes > {limit:,}"


# ------------------------------------------------------------------ byte mutations

_INTERESTING = [
    b"\xff" * 9 + b"\x01",  # the largest 64-bit varint
    b"\x80" * 11,  # a varint that never ends
    b"\x00" * 8,
    b"\xff\xff\xff\x7f",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",  # int64 max (little endian)
    struct.pack("<Q", sst.TABLE_MAGIC),
]

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(
        st.just("splice"), st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(0, 1 << 16)
    ),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 16), st.sampled_from(_INTERESTING)),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(data)
    for op in ops:
        n = len(b)
        at = op[1] % (n + 1)
        if op[0] == "flip" and n:
            b[at % n] ^= op[2]
        elif op[0] == "truncate":
            del b[at:]
        elif op[0] == "insert":
            b[at:at] = op[2]
        elif op[0] == "delete":
            del b[at : at + op[2]]
        elif op[0] == "splice":  # a copy of another part of the file, placed elsewhere
            lo, hi = sorted((op[2] % (n + 1), op[3] % (n + 1)))
            b[at:at] = b[lo : min(hi, lo + 4096)]
        elif op[0] == "overwrite":
            b[at : at + len(op[2])] = op[2]
    return bytes(b)


def mutations(data: bytes, max_ops: int = 4) -> st.SearchStrategy[bytes]:
    return st.lists(_op, min_size=1, max_size=max_ops).map(lambda ops: mutate(data, ops))


# ------------------------------------------------------------------ the bundle index


def _block_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the index's data blocks and of the index block itself."""
    pos = len(data) - sst.FOOTER_LEN
    _, pos = sst.varint(data, pos)
    _, pos = sst.varint(data, pos)
    index_off, pos = sst.varint(data, pos)
    index_size, pos = sst.varint(data, pos)
    return [*sst._data_blocks(data), (index_off, index_size)]


def reseal(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """Re-compute each block's checksum where it was, so a mutation inside a block is parsed."""
    b = bytearray(data)
    for off, size in spans:
        if off + size + 5 <= len(b):
            b[off : off + size + 5] = trailer(bytes(b[off : off + size]))
    return bytes(b)


def _index_calls(data: bytes) -> None:
    for fn in (tb.read_header, tb.list_tensors):
        try:
            fn(data)
        except tb.BundleError:
            pass


def _check_index(data: bytes) -> None:
    assert len(data) < 1 * MiB  # inputs stay bounded
    with bounded_memory(200 * len(data) + 4 * MiB):
        _index_calls(data)


@FUZZ
@pytest.mark.parametrize("reseal_blocks", [False, True], ids=["raw", "resealed"])
@given(st.data())
def test_fuzz_index_bytes(seeds: Seeds, reseal_blocks: bool, data: Any) -> None:
    seed = data.draw(st.sampled_from(seeds.indexes))
    blob = data.draw(mutations(seed))
    if reseal_blocks:
        blob = reseal(blob, _block_spans(seed))
    _check_index(blob)


_entry_op = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 1 << 16)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("swap"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(st.just("key"), st.integers(0, 1 << 16), st.lists(_op, min_size=1, max_size=3)),
    st.tuples(st.just("value"), st.integers(0, 1 << 16), st.lists(_op, min_size=1, max_size=3)),
    st.tuples(st.just("header"), st.binary(max_size=24)),
)


def _rebuild(
    entries: list[tuple[bytes, bytes]], ops: list[tuple[Any, ...]]
) -> list[tuple[bytes, bytes]]:
    out = list(entries)
    for op in ops:
        if not out:
            break
        i = op[1] % len(out) if isinstance(op[1], int) else 0
        if op[0] == "drop":
            del out[i]
        elif op[0] == "duplicate":
            out.insert(i, out[i])
        elif op[0] == "swap":
            j = op[2] % len(out)
            out[i], out[j] = out[j], out[i]
        elif op[0] == "key":
            out[i] = (mutate(out[i][0], op[2]), out[i][1])
        elif op[0] == "value":
            out[i] = (out[i][0], mutate(out[i][1], op[2]))
        elif op[0] == "header":
            out[0] = (b"", op[1])
    return out


HANDLE_REWRITES: list[Callable[[list[tuple[int, int]]], list[tuple[int, int]]]] = [
    lambda h: h,
    lambda h: h[::-1],
    lambda h: h + h,
    lambda h: [(o + 1, s) for o, s in h],
    lambda h: [(o, s + 7) for o, s in h],
    lambda h: h[:1],
]


@FUZZ
@given(st.data())
def test_fuzz_index_entries(seeds: Seeds, data: Any) -> None:
    """Entries of real indexes, mutated and re-laid out as valid SSTables (checksums right),
    split into blocks and addressed by (sometimes rewritten) handles."""
    seed = data.draw(st.sampled_from(seeds.indexes))
    entries = _rebuild(
        [(bytes(k), bytes(v)) for k, v in sst.entries(seed)],
        data.draw(st.lists(_entry_op, max_size=6)),
    )
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(entries) - 1, 1)), max_size=3)))
    blocks = [entries[a:b] for a, b in zip([0, *cuts], [*cuts, len(entries)], strict=True)]
    rewrite = data.draw(st.sampled_from(HANDLE_REWRITES))
    _check_index(sstable([b for b in blocks if b] or [[]], handles=rewrite))


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_index_random_bytes(blob: bytes) -> None:
    _check_index(blob)
    _check_index(b"\0\0" + blob + struct.pack("<Q", sst.TABLE_MAGIC))


# ------------------------------------------------------------------ event files


@pytest.fixture(scope="module")
def event_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-events")


def _check_events(directory: Path, blob: bytes, offset: int = 0) -> None:
    assert len(blob) < 4 * MiB
    path = directory / "events.out.tfevents.1.fuzz"
    path.write_bytes(blob)
    with bounded_memory(4 * len(blob) + 8 * MiB):
        r = read_scalars(path, offset, "eval", root=directory)
    assert r.retry is None  # nothing here is transient
    assert offset <= r.offset <= max(len(blob), offset)
    for s in r.scalars:
        assert isinstance(s.value, float) and isinstance(s.step, int)
        assert -(1 << 63) <= s.step < (1 << 63) and math.isfinite(s.wall_time)
        assert s.name.startswith("eval/")


@FUZZ
@given(st.data())
def test_fuzz_event_file_bytes(seeds: Seeds, event_dir: Path, data: Any) -> None:
    seed = data.draw(st.sampled_from(seeds.events))
    blob = data.draw(mutations(seed))
    offset = data.draw(st.one_of(st.just(0), st.integers(0, len(blob) + 16)))
    _check_events(event_dir, blob, offset)


def _payloads(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 12 <= len(blob):
        (n,) = struct.unpack_from("<Q", blob, pos)
        out.append(blob[pos + 12 : pos + 12 + n])
        pos += 16 + n
    return out


@FUZZ
@given(st.data())
def test_fuzz_event_payloads_reframed(seeds: Seeds, event_dir: Path, data: Any) -> None:
    """Real records' payloads mutated, then framed with valid checksums: the protobuf decoding
    and the value extraction see the damage, not the framing."""
    payloads = _payloads(data.draw(st.sampled_from(seeds.events)))
    picks = data.draw(st.lists(st.integers(0, len(payloads) - 1), min_size=1, max_size=6))
    out = [data.draw(mutations(payloads[i], 3)) for i in picks]
    _check_events(event_dir, b"".join(record(p) for p in out))


_dims = st.lists(st.integers(-2, 3), max_size=2).map(
    lambda ds: tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in ds]
    )
)
_int32 = st.integers(-(1 << 31), (1 << 31) - 1)
_tensors = st.builds(
    tensor_pb2.TensorProto,
    dtype=st.one_of(st.sampled_from([1, 2, 3, 9, 19, 7, 10]), st.integers(0, 30)),
    tensor_shape=st.one_of(st.just(tensor_shape_pb2.TensorShapeProto()), _dims),
    tensor_content=st.binary(max_size=12),
    float_val=st.lists(st.floats(width=32), max_size=2),
    double_val=st.lists(st.floats(), max_size=2),
    int_val=st.lists(_int32, max_size=2),
    int64_val=st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=2),
    half_val=st.lists(_int32, max_size=2),
)
_values = st.builds(
    lambda tag, kind, simple, tensor: (
        summary_pb2.Summary.Value(tag=tag, simple_value=simple)
        if kind
        else summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    ),
    st.text(max_size=20),
    st.booleans(),
    st.floats(width=32),
    _tensors,
)
_events = st.builds(
    lambda step, wall, values: event_pb2.Event(
        step=step, wall_time=wall, summary=summary_pb2.Summary(value=values)
    ).SerializeToString(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.floats(),
    st.lists(_values, max_size=3),
)


@pytest.mark.slow
@FUZZ
@given(st.lists(_events, min_size=1, max_size=8))
def test_fuzz_event_fields(event_dir: Path, events: list[bytes]) -> None:
    """Well-framed events whose summary values claim any dtype, shape and contents."""
    _check_events(event_dir, b"".join(record(e) for e in events))


# ------------------------------------------------------------------ the state file


def _check_state(text: str) -> None:
    assert len(text) < 1 * MiB
    with bounded_memory(20 * len(text) + 1 * MiB):
        state = statefile.parse(text)
    assert isinstance(state.model_checkpoint_path, str)
    assert all(isinstance(p, str) for p in state.all_model_checkpoint_paths)
    assert all(isinstance(t, float) for t in state.all_model_checkpoint_timestamps)


@FUZZ
@given(st.data())
def test_fuzz_state_file(seeds: Seeds, data: Any) -> None:
    seed = data.draw(st.sampled_from(seeds.states)).encode()
    blob = data.draw(mutations(seed))
    _check_state(blob.decode("utf-8", errors="replace"))  # as statefile.read decodes it


_state_line = st.builds(
    "{}: {}".format,
    st.sampled_from(
        [
            "model_checkpoint_path",
            "all_model_checkpoint_paths",
            "all_model_checkpoint_timestamps",
            "last_preserved_timestamp",
        ]
    ),
    st.one_of(
        st.text(max_size=40).map(lambda s: f'"{s}"'),
        st.text(alphabet='\\"0123456789xabn', max_size=40).map(lambda s: f'"{s}"'),
        st.text(alphabet="0123456789.eE+-infa", max_size=30),
    ),
)


@FUZZ
@given(st.lists(st.one_of(_state_line, st.text(max_size=60)), max_size=20))
def test_fuzz_state_file_text(lines: list[str]) -> None:
    _check_state("\n".join(lines))


_path = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@FUZZ
@given(
    st.builds(
        statefile.CheckpointState,
        _path,
        st.lists(_path, max_size=4),
        st.lists(st.floats(allow_nan=False), max_size=4),
        st.one_of(st.none(), st.floats(allow_nan=False)),
    )
)
def test_fuzz_state_file_round_trip(state: statefile.CheckpointState) -> None:
    """What ckptd writes (render) parses back to the same state."""
    assert statefile.parse(statefile.render(state)) == state


# ------------------------------------------------------------------ Keras file names

TEMPLATES = [
    "model.{epoch:02d}-{val_loss:.2f}.keras",
    "weights.{epoch:03d}-{val_accuracy:.4f}-{loss:.3f}.weights.h5",
    "ckpt_{epoch}{val_loss}.keras",  # adjacent fields: the regex's worst case
    "{epoch}.keras",
]
NAMES = [
    "model.03-0.41.keras",
    "weights.012-0.9312-0.115.weights.h5",
    "ckpt_70.25.keras",
    "7.keras",
    "model.ckpt-120.index",
]


_names = st.one_of(
    st.sampled_from(NAMES)
    .flatmap(lambda n: mutations(n.encode(), 4))
    .map(lambda b: b.decode("utf-8", errors="replace")[:255]),
    st.text(alphabet="0123456789.-+eEnaif_", max_size=255),
    st.text(max_size=255),
)


@FUZZ
@given(st.sampled_from(TEMPLATES), _names)
def test_fuzz_keras_names(template: str, name: str) -> None:
    parsed = KerasTemplate(template).parse(name)
    if parsed is not None:
        step, metrics = parsed
        assert step is None or step >= 0
        assert all(isinstance(v, float) for v in metrics.values())
    step = step_from_name(name)
    assert step is None or step >= 0
