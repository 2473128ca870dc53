"""Scalars from TensorBoard event files, read incrementally and without TensorFlow.

An event file is a TFRecord stream: ``uint64 length, uint32 masked_crc(length), data,
uint32 masked_crc(data)``, each ``data`` an ``Event`` proto (tensorboard ships the compiled protos,
so TensorFlow is not needed). The framing is parsed here rather than through tensorboard's loader
because we must resume at a remembered byte offset across daemon restarts, stop cleanly before a
record the trainer is still appending, and tell "truncated tail" (normal) from "corrupt" (report).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import google_crc32c

from ckptd.io import safeio

_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_CHUNK = 1 << 20  # bytes read at a time: memory stays bounded whatever the file's size
# A record bigger than this is an image, audio clip or graph, never a scalar summary worth
# decoding: it is stepped over without being read (its length field is checksummed).
MAX_RECORD = 16 << 20


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
    # The file is corrupt at ``offset`` (a broken frame, not a regular file): stop reading it.
    error: str | None = None
    # It could not be read now (permission, I/O error, removed meanwhile): read on from
    # ``offset`` at the next scan. Never permanent.
    retry: str | None = None
    skipped: int = 0  # values (or whole records) in valid frames that were not usable scalars
    skip_reason: str | None = None  # why the first of them was skipped

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if self.skip_reason is None:
            self.skip_reason = reason


def metric_prefix(run_dir: Path, event_file: Path) -> str:
    """``eval`` for ``RUN/eval/events.out…``; empty at the run root."""
    rel = event_file.parent.relative_to(run_dir)
    return "" if str(rel) == "." else rel.as_posix()


Pread = Callable[[int, int], bytes]  # (size, offset) -> up to size bytes from offset


def _frames(read: Pread, pos: int, end: int) -> Iterator[tuple[int, int, bytes | None, str | None]]:
    """(start, end, payload, error) of each whole record of the file ``read`` reads, from
    ``pos`` up to ``end`` (a local file: ``os.pread`` of its fd; an object: ranged GETs).

    Stops at a partial tail (the trainer is still writing it). Reads ``_CHUNK`` bytes at a time
    and holds at most one chunk plus one record; the payload of a record over ``MAX_RECORD`` is
    None (stepped over, not read). After an error nothing more is yielded.
    """
    buf, i = b"", 0  # buf[i:] holds the file's bytes from pos on

    def fill(n: int) -> bool:
        """Make buf[i:] at least n bytes long; False if the file ends first (it shrank)."""
        nonlocal buf, i
        have = buf[i:]
        while len(have) < n:
            chunk = read(min(max(_CHUNK, n - len(have)), end - pos - len(have)), pos + len(have))
            if not chunk:
                return False
            have += chunk
        buf, i = have, 0
        return True

    while pos + 12 <= end:
        if len(buf) - i < 12 and not fill(12):
            return
        length, length_crc = _HEADER.unpack_from(buf, i)
        if masked_crc32c(buf[i : i + 8]) != length_crc:
            yield pos, pos, None, f"corrupt record header at byte {pos}"
            return
        size = 12 + length + 4
        if pos + size > end:
            return  # the trainer is still writing this record
        if length > MAX_RECORD:
            yield pos, pos + size, None, None
            pos += size
            buf, i = (buf, i + size) if len(buf) - i >= size else (b"", 0)
            continue
        if len(buf) - i < size and not fill(size):
            return
        payload = buf[i + 12 : i + 12 + length]
        (data_crc,) = _CRC.unpack_from(buf, i + 12 + length)
        if masked_crc32c(payload) != data_crc:
            yield pos, pos, None, f"corrupt record data at byte {pos}"
            return
        yield pos, pos + size, payload, None
        pos += size
        i += size


class _BadValue(ValueError):
    """A summary value that cannot be a scalar as it claims (skipped and counted)."""


_ITEMSIZE = {"<f": 4, "<d": 8, "<i": 4, "<q": 8}


def _tensor_scalar(tensor: object) -> float | None:
    """The value of a rank-0 numeric TensorProto (what TF2 ``tf.summary.scalar`` writes).

    None for tensors that are not numeric scalars; :class:`_BadValue` for one whose bytes
    cannot hold the value its dtype says.
    """
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
                if not 0 <= values[0] <= 0xFFFF:
                    raise _BadValue(f"half_val {values[0]} is not a 16-bit float")
                return float(struct.unpack("<e", struct.pack("<H", values[0]))[0])
            return float(values[0])
        content = t.tensor_content  # type: ignore[attr-defined]
        if dtype == code and content and fmt:
            if len(content) != _ITEMSIZE[fmt]:
                raise _BadValue(
                    f"tensor_content of {len(content)} bytes for a scalar of dtype {dtype}"
                )
            return float(struct.unpack(fmt, content)[0])
    return None


def read_scalars(path: Path, offset: int, prefix: str, *, root: Path) -> ReadResult:
    """Scalars appended to ``path`` (under the watch ``root``) since ``offset``; never raises.

    The file is reached through :mod:`ckptd.io.safeio` (no symlink, a regular file) and read in
    bounded chunks. A broken frame sets ``error`` (permanent); an OS error sets ``retry``; a
    value that is not a valid scalar is skipped and counted, and reading goes on.
    """
    result = ReadResult(offset=offset)
    try:
        with safeio.open_dir_under(root, path.parent) as dfd:
            fd, st = safeio.open_regular(path.name, dfd)
    except (safeio.NotRegularFile, safeio.UnsafePath) as exc:
        result.error = exc.strerror
        return result
    except OSError as exc:
        result.retry = f"unreadable: {exc.strerror or exc}"
        return result
    try:
        scan_records(lambda n, pos: os.pread(fd, n, pos), st.st_size, prefix, result)
    except OSError as exc:  # e.g. EIO part way: keep what was read, the rest at the next scan
        result.retry = f"unreadable: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return result


def scan_records(read: Pread, size: int, prefix: str, result: ReadResult) -> None:
    """Add to ``result`` the scalars of the whole records between ``result.offset`` and
    ``size``, moving ``result.offset`` past each; errors of ``read`` propagate (what was read
    before them stays in ``result``)."""
    from tensorboard.compat.proto import event_pb2  # slow to import: only for an event file

    for start, end, payload, error in _frames(read, result.offset, size):
        if error:
            result.error = error
            break
        result.offset = end
        if payload is None:
            result.skip(f"record at byte {start} is over {MAX_RECORD:,} bytes (not a scalar)")
            continue
        _scalars(event_pb2, payload, start, prefix, result)


def _scalars(event_pb2: Any, payload: bytes, start: int, prefix: str, result: ReadResult) -> None:
    """Append the scalars of one record; a bad record or value is skipped and counted."""
    try:
        event = event_pb2.Event.FromString(payload)
    except Exception:  # protobuf's DecodeError
        result.skip(f"undecodable event at byte {start}")
        return
    if not event.HasField("summary"):
        return
    if not math.isfinite(event.wall_time):
        result.skip(f"event at byte {start} has wall_time {event.wall_time}")
        return
    for v in event.summary.value:
        kind = v.WhichOneof("value")
        try:
            if kind == "simple_value":
                value: float | None = v.simple_value
            elif kind == "tensor":
                value = _tensor_scalar(v.tensor)
            else:
                value = None
        except _BadValue as exc:
            result.skip(f"{v.tag} at byte {start}: {exc}")
            continue
        if value is None:
            continue
        name = f"{prefix}/{v.tag}" if prefix else v.tag
        result.scalars.append(Scalar(name, int(event.step), float(value), event.wall_time))


def is_nan(value: float | None) -> bool:
    return value is None or math.isnan(value)
