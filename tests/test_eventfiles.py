"""Scalars from REAL TensorBoard event files, read incrementally without TensorFlow.

Expected values always come from what the trainer itself reported (``corpus.saves``), never from
hard-coded numbers: metrics differ from run to run.
"""

from __future__ import annotations

import itertools
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter

from ckptd.io.eventfiles import ReadResult, Scalar, masked_crc32c, metric_prefix, read_scalars
from ckptd.io.formats import event_files
from tests.conftest import Corpus

F32 = {"rel": 1e-6}  # the trainer reports float32 values widened to float


def _read(path: Path, offset: int, prefix: str) -> ReadResult:
    return read_scalars(path, offset, prefix, root=path.parent)


def _read_run(run: Path) -> dict[Path, ReadResult]:
    return {p: _read(p, 0, metric_prefix(run, p)) for p in event_files(run)}


def _boundaries(data: bytes) -> list[int]:
    """Record end offsets, from the TFRecord framing alone (the test's own independent parse)."""
    out, pos = [0], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + 4 + length + 4
        out.append(pos)
    assert pos == len(data)
    return out


def _value_kinds(path: Path) -> set[str]:
    """Which Summary.Value oneof the writer used (TF1: simple_value; TF2: tensor)."""
    data, kinds = path.read_bytes(), set()
    bounds = _boundaries(data)
    for start, end in itertools.pairwise(bounds):
        event = event_pb2.Event.FromString(data[start + 12 : end - 4])
        kinds |= {v.WhichOneof("value") for v in event.summary.value}
    return kinds


def _eval_file(run: Path) -> Path:
    (path,) = [p for p in event_files(run) if p.parent.name == "eval"]
    return path


@pytest.mark.parametrize("kind", ["tf1", "tf2", "sharded"])
def test_event_metrics_are_exactly_what_the_trainer_logged(corpus: Corpus, kind: str) -> None:
    run = corpus.run_dir(kind)
    results = _read_run(run)
    assert {p.parent for p in results} == {run, run / "eval"}
    assert _value_kinds(_eval_file(run)) == ({"simple_value"} if kind == "tf1" else {"tensor"})
    for path, result in results.items():
        assert result.error is None, (path, result.error)
        assert result.offset == path.stat().st_size

    evals = [s for p, r in results.items() if p.parent.name == "eval" for s in r.scalars]
    got = {(s.name, s.step): s.value for s in evals}
    assert len(got) == len(evals), "a scalar was read twice"
    expected = {
        (name, rec["step"]): value
        for rec in corpus.saves[kind]
        for name, value in rec["metrics"].items()
    }
    assert set(got) == set(expected)  # eval/accuracy and eval/loss at every save, nothing else
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, **F32), key

    # The root writer logged the training loss (no prefix) once per step, 1..last step.
    train = [s for p, r in results.items() if p.parent == run for s in r.scalars]
    last = corpus.saves[kind][-1]["step"]
    assert {s.name for s in train} == {"loss"}
    assert sorted(s.step for s in train) == list(range(1, last + 1))
    assert all(s.wall_time > 0 for s in evals + train)


@pytest.mark.parametrize("kind", ["tf1", "tf2"])
def test_every_cut_point_reads_whole_records_then_resumes(
    corpus: Corpus, tmp_path: Path, kind: str
) -> None:
    """A trainer appending: cut the eval file at every byte, read, append the rest, resume."""
    run = corpus.run_dir(kind)
    source = _eval_file(run)
    data = source.read_bytes()
    full = _read(source, 0, "eval")
    assert full.error is None and len(full.scalars) == 2 * len(corpus.saves[kind])
    bounds = _boundaries(data)
    assert len(bounds) > 3
    path = tmp_path / source.name
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        first = _read(path, 0, "eval")
        assert first.error is None, (cut, first.error)
        assert first.offset == max(b for b in bounds if b <= cut), cut
        with path.open("ab") as fh:
            fh.write(data[cut:])
        rest = _read(path, first.offset, "eval")
        assert rest.error is None and rest.offset == len(data), cut
        assert first.scalars + rest.scalars == full.scalars, cut


def test_resume_on_the_big_training_file(corpus: Corpus, tmp_path: Path) -> None:
    """The same on the TF1 root file (graph def + one summary per step), cut mid-payload."""
    run = corpus.run_dir("tf1")
    (source,) = [p for p in event_files(run) if p.parent == run]
    data = source.read_bytes()
    full = _read(source, 0, "")
    bounds = _boundaries(data)
    offsets = []
    path = tmp_path / source.name
    path.write_bytes(b"")
    got: list[Scalar] = []
    offset = 0
    rng = random.Random(7)
    cuts = sorted({rng.randrange(len(data)) for _ in range(20)} | {len(data)})
    prev = 0
    for cut in cuts:
        with path.open("ab") as fh:
            fh.write(data[prev:cut])
        prev = cut
        r = _read(path, offset, "")
        assert r.error is None
        assert r.offset in bounds and r.offset <= cut
        got += r.scalars
        offset = r.offset
        offsets.append(offset)
    assert offset == len(data)
    assert offsets == sorted(offsets)
    assert got == full.scalars
    assert len({(s.name, s.step) for s in got}) == len(got)  # no duplicates


def test_random_bytes_set_an_error_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.garbage"
    path.write_bytes(random.Random(0).randbytes(4096))
    r = _read(path, 0, "")
    assert r.error and "corrupt" in r.error
    assert r.scalars == [] and r.offset == 0


def test_unreadable_file_is_retried_not_corrupt(tmp_path: Path) -> None:
    r = _read(tmp_path / "events.out.tfevents.1.absent", 0, "")
    assert r.error is None and r.retry and r.retry.startswith("unreadable")
    assert r.scalars == [] and r.offset == 0


@pytest.mark.parametrize("kind", ["tf1", "tf2"])
def test_valid_records_then_garbage(corpus: Corpus, tmp_path: Path, kind: str) -> None:
    source = _eval_file(corpus.run_dir(kind))
    data = source.read_bytes()
    full = _read(source, 0, "eval")
    path = tmp_path / source.name
    path.write_bytes(data + random.Random(1).randbytes(64))
    r = _read(path, 0, "eval")
    assert r.scalars == full.scalars
    assert r.offset == len(data)
    assert r.error and f"byte {len(data)}" in r.error
    # Reading on from the remembered offset reports the same error, and nothing new.
    again = _read(path, r.offset, "eval")
    assert again.scalars == [] and again.error == r.error and again.offset == len(data)


def test_flipped_payload_byte_stops_at_that_record(corpus: Corpus, tmp_path: Path) -> None:
    source = _eval_file(corpus.run_dir("tf2"))
    data = bytearray(source.read_bytes())
    bounds = _boundaries(bytes(data))
    full = _read(source, 0, "eval")
    # Damage the payload of the third record (file_version, then one record per scalar).
    start = bounds[2]
    data[start + 12 + 3] ^= 0x40
    path = tmp_path / source.name
    path.write_bytes(bytes(data))
    r = _read(path, 0, "eval")
    assert r.offset == start and r.error and f"data at byte {start}" in r.error
    assert r.scalars == full.scalars[:1]


def test_tensor_summaries_of_every_scalar_kind(tmp_path: Path) -> None:
    """TF2 writes scalars as rank-0 tensors; only numeric rank-0 ones are metrics."""

    def tensor(dtype: int, **fields: object) -> tensor_pb2.TensorProto:
        return tensor_pb2.TensorProto(
            dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(), **fields
        )

    values = {
        "f32": tensor(1, float_val=[0.25]),
        "f64": tensor(2, double_val=[0.125]),
        "i32": tensor(3, int_val=[-7]),
        "i64": tensor(9, int64_val=[1 << 40]),
        "f16": tensor(19, half_val=[struct.unpack("<H", struct.pack("<e", 1.5))[0]]),
        "content_f32": tensor(1, tensor_content=struct.pack("<f", 3.5)),
        "content_f64": tensor(2, tensor_content=struct.pack("<d", -2.25)),
        "text": tensor(7, string_val=[b"hello"]),
        "vector": tensor_pb2.TensorProto(
            dtype=1,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)]
            ),
            float_val=[1.0, 2.0],
        ),
    }
    path = tmp_path / "events.out.tfevents.1.synthetic"
    with path.open("wb") as fh:
        writer = RecordWriter(fh)
        writer.write(
            event_pb2.Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()
        )
        for step, (tag, t) in enumerate(values.items()):
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, tensor=t)])
            writer.write(
                event_pb2.Event(wall_time=2.0, step=step, summary=summary).SerializeToString()
            )
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag="simple", simple_value=0.5)]
        )
        writer.write(event_pb2.Event(wall_time=3.0, step=99, summary=summary).SerializeToString())
    r = _read(path, 0, "sub/dir")
    assert r.error is None and r.offset == path.stat().st_size
    got = {s.name: (s.step, s.value) for s in r.scalars}
    assert got == {
        "sub/dir/f32": (0, 0.25),
        "sub/dir/f64": (1, 0.125),
        "sub/dir/i32": (2, -7.0),
        "sub/dir/i64": (3, float(1 << 40)),
        "sub/dir/f16": (4, 1.5),
        "sub/dir/content_f32": (5, 3.5),
        "sub/dir/content_f64": (6, -2.25),
        "sub/dir/simple": (99, 0.5),
    }


def test_metric_prefix(tmp_path: Path) -> None:
    assert metric_prefix(tmp_path, tmp_path / "events.out.tfevents.1.h") == ""
    assert metric_prefix(tmp_path, tmp_path / "eval" / "events.out.tfevents.1.h") == "eval"
    assert metric_prefix(tmp_path, tmp_path / "a" / "b" / "events.out.tfevents.1.h") == "a/b"


@pytest.mark.parametrize("data", [b"", b"a", b"123456789", b"\x00" * 32, bytes(range(256))])
def test_masked_crc32c_known_inputs(data: bytes) -> None:
    assert masked_crc32c(data) == tb_masked_crc32c(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_masked_crc32c_matches_tensorboard(data: bytes) -> None:
    assert masked_crc32c(data) == tb_masked_crc32c(data)
