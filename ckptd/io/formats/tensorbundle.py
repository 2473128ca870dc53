"""Read TensorFlow's tensor-bundle ``.index`` files without TensorFlow.

The ``.index`` of a TF1 Saver (V2 format) or TF2 object checkpoint is a LevelDB-style SSTable
(framed as ``sstable.py`` reads it) written uncompressed by ``BundleWriter``
(tensorflow/core/util/tensor_bundle). Its footer ends in a fixed magic number, so a file still
being written (TF2 writes ``.index`` in place) is recognised; the first entry (empty key) is a
``BundleHeaderProto`` giving the number of data shards; every other entry is a
``BundleEntryProto`` (dtype, shape, shard). This module is written by hand because no library
outside TensorFlow reads this format, and importing TensorFlow is slow and large.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptd.io.formats.sstable import BundleError, entries, varint

OBJECT_GRAPH_KEY = b"_CHECKPOINTABLE_OBJECT_GRAPH"

# tensorflow/core/framework/types.proto DataType
DTYPES = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    8: "complex64",
    9: "int64",
    10: "bool",
    11: "qint8",
    12: "quint8",
    13: "qint32",
    14: "bfloat16",
    15: "qint16",
    16: "quint16",
    17: "uint16",
    18: "complex128",
    19: "float16",
    20: "resource",
    21: "variant",
    22: "uint32",
    23: "uint64",
    24: "float8_e5m2",
    25: "float8_e4m3fn",
}


# Data files are named PREFIX.data-NNNNN-of-NNNNN: five digits (TensorFlow's "%05d").
MAX_SHARDS = 99_999


@dataclass(frozen=True)
class TensorAt:
    """Where one tensor's bytes lie in the data shards, as its BundleEntryProto says."""

    key: bytes
    dtype: int  # a DataType number (DTYPES)
    shard: int
    offset: int
    size: int
    crc32c: int  # masked crc32c of the tensor's bytes


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int
    is_object_graph: bool
    # shard id -> bytes the index says that data file must hold (max offset + size)
    shard_bytes: dict[int, int] = field(default_factory=dict)
    # The first of the keys read_header was asked to locate that the index holds.
    located: TensorAt | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    size: int


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Protobuf wire-format fields: (number, wire type, int value or bytes)."""
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        num, wt = key >> 3, key & 7
        value: int | bytes
        if wt == 0:
            value, pos = varint(buf, pos)
        elif wt == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wt == 2:
            n, pos = varint(buf, pos)
            value, pos = bytes(buf[pos : pos + n]), pos + n
        elif wt == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wt}")
        yield num, wt, value


def _entry_classes() -> tuple[Any, Any]:
    """Compiled (upb) message classes for BundleEntryProto and a list of them.

    Built from a descriptor at import (TensorFlow's own tensor_bundle.proto is not shipped outside
    TensorFlow). Field numbers and wire types are TensorFlow's; ``shape`` and ``slices`` are kept
    as raw bytes because only list_tensors needs them (and decodes them itself).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="ckptd_tensor_bundle.proto", package="ckptd.bundle", syntax="proto3"
    )
    entry = proto.message_type.add(name="BundleEntryProto")
    for name, number, kind, label in (
        ("dtype", 1, f.TYPE_INT32, f.LABEL_OPTIONAL),
        ("shape", 2, f.TYPE_BYTES, f.LABEL_OPTIONAL),
        ("shard_id", 3, f.TYPE_INT32, f.LABEL_OPTIONAL),
        ("offset", 4, f.TYPE_INT64, f.LABEL_OPTIONAL),
        ("size", 5, f.TYPE_INT64, f.LABEL_OPTIONAL),
        ("crc32c", 6, f.TYPE_FIXED32, f.LABEL_OPTIONAL),
        ("slices", 7, f.TYPE_BYTES, f.LABEL_REPEATED),
    ):
        entry.field.add(name=name, number=number, type=kind, label=label)
    many = proto.message_type.add(name="Entries")
    many.field.add(
        name="entry",
        number=1,
        type=f.TYPE_MESSAGE,
        type_name=".ckptd.bundle.BundleEntryProto",
        label=f.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ckptd.bundle.{n}"))
        for n in ("BundleEntryProto", "Entries")
    )


_BundleEntry, _Entries = _entry_classes()
_FIELD1 = b"\x0a"  # tag of Entries.entry (field 1, length-delimited)


def _num_shards(header: bytes) -> int:
    """BundleHeaderProto.num_shards (field 1) of the header entry's value (the last one wins,
    as in protobuf)."""
    shards = 0
    for num, _wt, v in _fields(header):
        if num == 1 and isinstance(v, int):
            shards = v
    return shards


def _checked_shards(header: bytes) -> int:
    """num_shards of the header entry, refused when no checkpoint can have that many."""
    shards = _num_shards(header)
    if shards > MAX_SHARDS:
        raise BundleError(f"header claims {shards:,} data shards (at most {MAX_SHARDS:,} exist)")
    return shards


def _check_shard_ids(shard_bytes: dict[int, int], num_shards: int) -> None:
    """Every tensor's data must lie in one of the header's shards (else TF cannot restore it)."""
    for shard in shard_bytes:
        if shard < 0 or (num_shards and shard >= num_shards):
            raise BundleError(f"a tensor lies in data shard {shard}, but there are {num_shards}")


def read_header(data: bytes, locate: Sequence[bytes] = ()) -> BundleHeader:
    """Parse the header, detect a TF2 object graph and the size each data shard must have;
    ``locate``: tensor keys by preference, the first one present is ``located``.

    One pass over every entry (the index is small next to the data); raises BundleError when
    the index is incomplete or corrupt. This runs for every checkpoint at backfill, so the
    BundleEntryProtos are framed as one repeated field and decoded by the compiled protobuf
    runtime in one call instead of one by one.
    """
    num_shards = None
    is_object = False
    parts: list[bytes] = []
    append = parts.append
    wanted = frozenset(locate)
    at: dict[bytes, int] = {}  # key -> its position among the decoded entries
    for key, value in entries(data):
        if not key:
            num_shards = _checked_shards(value)
            continue
        if key == OBJECT_GRAPH_KEY:
            is_object = True
        elif key in wanted:
            at[key] = len(parts) // 3
        n = len(value)
        append(_FIELD1)
        append(_LEN1[n] if n < 0x80 else _varint_bytes(n))
        append(value)
    if num_shards is None:
        raise BundleError("index has no bundle header entry")
    try:
        decoded = _Entries.FromString(b"".join(parts)).entry
    except Exception as exc:  # protobuf's DecodeError
        raise BundleError(f"an entry does not parse as a BundleEntryProto: {exc}") from None
    shard_bytes: dict[int, int] = {}
    for e in decoded:
        extent = e.offset + e.size
        if extent > shard_bytes.get(e.shard_id, 0):
            shard_bytes[e.shard_id] = extent
    _check_shard_ids(shard_bytes, num_shards)
    located = None
    for key in locate:
        if key in at:
            e = decoded[at[key]]
            located = TensorAt(key, e.dtype, e.shard_id, e.offset, e.size, e.crc32c)
            break
    return BundleHeader(num_shards, is_object, shard_bytes, located)


_LEN1 = [bytes((n,)) for n in range(0x80)]


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for num, _wt, v in _fields(buf):
        if num == 2 and isinstance(v, bytes):
            size = 0
            for n2, _w2, v2 in _fields(v):
                if n2 == 1 and isinstance(v2, int):
                    size = v2 - (1 << 64) if v2 >= 1 << 63 else v2
            dims.append(size)
    return tuple(dims)


def _slice_owner(key: bytes) -> bytes:
    """The tensor name in a slice key (``EncodeTensorNameSlice``: OrderedCode 0, then the name
    as an OrderedCode string: NUL is ``00 FF``, 0xFF is ``FF 00``, and ``00 01`` ends it)."""
    out = bytearray()
    i = 1
    while i < len(key):
        b = key[i]
        if b in (0, 0xFF) and i + 1 < len(key):
            if b == 0 and key[i + 1] == 1:
                break
            i += 1  # skip the escape's second byte
        out.append(b)
        i += 1
    return bytes(out)


def list_tensors(data: bytes) -> list[TensorInfo]:
    """Every saved tensor: what ``tf.train.list_variables`` and inspect_checkpoint print.

    A tensor saved in slices (e.g. split over shards by a sharding policy) is listed once, with
    the total size of its slices; the slice entries themselves (keys starting with NUL) are not.
    """
    out = []
    slice_bytes: dict[bytes, int] = {}
    for key, value in entries(data):
        if key == b"":
            continue
        dtype, shard, size = 0, 0, 0
        shape: tuple[int, ...] = ()
        for num, _wt, v in _fields(value):
            if num == 1 and isinstance(v, int):
                dtype = v
            elif num == 2 and isinstance(v, bytes):
                shape = _shape(v)
            elif num == 3 and isinstance(v, int):
                shard = v
            elif num == 5 and isinstance(v, int):
                size = v
        if key.startswith(b"\0"):
            owner = _slice_owner(key)
            slice_bytes[owner] = slice_bytes.get(owner, 0) + size
            continue
        size = size or slice_bytes.get(key, 0)
        out.append(
            TensorInfo(
                key.decode("utf-8", "replace"),
                DTYPES.get(dtype, f"dtype{dtype}"),
                shape,
                shard,
                size,
            )
        )
    return out
