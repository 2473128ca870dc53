"""Scalars from TensorBoard event files, read incrementally and without TensorFlow.

An event file is a TFRecord stream: ``uint64 length, uint32 masked_crc(length), data,
uint32 masked_crc(data)``, each ``data`` an ``Event`` proto (tensorboard ships the compiled protos,
so TensorFlow is not needed). The framing is parsed here rather than through tensorboard's loader
because we must resume at a remembered byte offset across daemon restarts, stop cleanly before a
record the trainer is still appending, and tell "truncated tail" (normal) from "corrupt" (report).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import google_crc32c

_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MAX_RECORD = 256 << 20  # a larger length field is garbage, not a record
_CHUNK = 1 << 20


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class Scalar(NamedTuple):
    """One logged value (a tuple: thousands per run cross from worker processes at backfill)."""

    name: str
    step: int
    value: float
    wall_time: float


@dataclass
class ReadResult:
    scalars: list[Scalar] = field(default_factory=list)
    offset: int = 0  # where the next read starts: just past the last whole record
    error: str | None = None  # set when the file is corrupt at ``offset``; stop reading it


def metric_prefix(run_dir: Path, event_file: Path) -> str:
    """``eval`` for ``RUN/eval/events.out…``; empty at the run root."""
    rel = event_file.parent.relative_to(run_dir)
    return "" if str(rel) == "." else rel.as_posix()


def _records(data: bytes, start: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(end offset, payload, error) for each whole record in ``data``; stops at a partial tail."""
    pos = start
    n = len(data)
    while pos + 12 <= n:
        length, length_crc = _HEADER.unpack_from(data, pos)
        if masked_crc32c(data[pos : pos + 8]) != length_crc or length > _MAX_RECORD:
            yield pos, None, f"corrupt record header at byte {pos}"
            return
        end = pos + 12 + length + 4
        if end > n:
            return  # the trainer is still writing this record
        payload = data[pos + 12 : pos + 12 + length]
        (data_crc,) = _CRC.unpack_from(data, pos + 12 + length)
        if masked_crc32c(payload) != data_crc:
            yield pos, None, f"corrupt record data at byte {pos}"
            return
        yield end, payload, None
        pos = end


def _tensor_scalar(tensor: object) -> float | None:
    """The value of a rank-0 numeric TensorProto (what TF2 ``tf.summary.scalar`` writes)."""
    t = tensor  # TensorProto
    if t.tensor_shape.dim:  # type: ignore[attr-defined]
        return None
    dtype = t.dtype  # type: ignore[attr-defined]
    for attr, code, fmt in (
        ("float_val", 1, "<f"),
        ("double_val", 2, "<d"),
        ("int_val", 3, "<i"),
        ("int64_val", 9, "<q"),
        ("half_val", 19, None),
    ):
        values = getattr(t, attr)
        if values and (dtype == code or attr == "int_val"):
            if attr == "half_val":
                return float(struct.unpack("<e", struct.pack("<H", values[0]))[0])
            return float(values[0])
        if dtype == code and t.tensor_content and fmt:  # type: ignore[attr-defined]
            return float(struct.unpack_from(fmt, t.tensor_content)[0])  # type: ignore[attr-defined]
    return None


def read_scalars(path: Path, offset: int, prefix: str) -> ReadResult:
    """Scalars appended to ``path`` since ``offset``; never raises for bad content."""
    from tensorboard.compat.proto import event_pb2  # ~40 ms; only when there is an event file

    result = ReadResult(offset=offset)
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError as exc:
        result.error = f"unreadable: {exc.strerror}"
        return result
    for end, payload, error in _records(data, 0):
        if error:
            result.error = error.replace(f"byte {end}", f"byte {offset + end}")
            break
        result.offset = offset + end
        try:
            event = event_pb2.Event.FromString(payload)
        except Exception:
            result.error = f"undecodable event before byte {offset + end}"
            break
        if not event.HasField("summary"):
            continue
        for v in event.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                value: float | None = v.simple_value
            elif kind == "tensor":
                value = _tensor_scalar(v.tensor)
            else:
                value = None
            if value is None:
                continue
            name = f"{prefix}/{v.tag}" if prefix else v.tag
            result.scalars.append(Scalar(name, int(event.step), float(value), event.wall_time))
    return result


def is_nan(value: float | None) -> bool:
    return value is None or math.isnan(value)
