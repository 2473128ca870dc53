"""Read TensorFlow's tensor-bundle ``.index`` files without TensorFlow.

The ``.index`` of a TF1 Saver (V2 format) or TF2 object checkpoint is a LevelDB-style SSTable
written uncompressed by ``BundleWriter`` (tensorflow/core/util/tensor_bundle). Its footer ends in a
fixed magic number, so a file still being written (TF2 writes ``.index`` in place) is recognised;
the first entry (empty key) is a ``BundleHeaderProto`` giving the number of data shards; every
other entry is a ``BundleEntryProto`` (dtype, shape, shard). This module is written by hand because
no library outside TensorFlow reads this format, and importing TensorFlow is slow and large.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_LEN = 5  # compression type byte + crc32c
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
_KEY_BYTES_PER_BYTE = 16  # see _block


class BundleError(ValueError):
    """The index is not (yet) a valid tensor bundle; the message says why."""


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


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("bad varint")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Protobuf wire-format fields: (number, wire type, int value or bytes)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        value: int | bytes
        if wt == 0:
            value, pos = _varint(buf, pos)
        elif wt == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos : pos + n]), pos + n
        elif wt == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wt}")
        yield num, wt, value


def _block(data: bytes, offset: int, size: int) -> Iterator[tuple[bytes, bytes]]:
    """Entries (key, value) of one uncompressed SSTable block.

    Rebuilding a prefix-compressed key copies its shared part, so the work is the keys' total
    length, which a hostile block makes quadratic in its size. TensorFlow's writer stores a whole
    key at least every 16 entries (its restart interval), so the keys of a real block add up to
    less than 16 times its size: a block claiming more is refused. Only entries with a multi-byte
    length are counted: sharing under 128 bytes costs little whatever the block, and the common
    entry stays as cheap as it was.
    """
    limit = _check_block(data, offset, size)
    budget = _KEY_BYTES_PER_BYTE * size
    pos, key = offset, b""
    while pos < limit:
        # Fast path: the three lengths are almost always single-byte varints.
        shared, non_shared, value_len = data[pos], data[pos + 1], data[pos + 2]
        if (shared | non_shared | value_len) < 0x80:
            pos += 3
        else:
            shared, pos = _varint(data, pos)
            non_shared, pos = _varint(data, pos)
            value_len, pos = _varint(data, pos)
            budget -= shared
            if budget < 0:
                raise BundleError(
                    f"keys of the block at byte {offset} add up to far more than it holds"
                )
        key = key[:shared] + data[pos : pos + non_shared]
        pos += non_shared
        end = pos + value_len
        if end > limit:
            raise BundleError("entry extends past its block")
        yield key, data[pos:end]
        pos = end


def _data_blocks(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset, size) of each data block, in file order.

    TensorFlow's table writer lays the blocks out one after the other, before the index block;
    handles that go backwards, overlap or point past the data area are refused, so every byte of
    the file is parsed at most once (a hostile index block repeating one handle would otherwise
    make the index count many times its size).
    """
    # The first entry of every bundle index is its header, whose key is empty: the file starts
    # with shared = 0, non_shared = 0. A file still being written starts so too; garbage does not.
    if data[:2] != b"\0\0"[: len(data)]:
        raise BundleError("not a tensor bundle index (it does not start with the header entry)")
    if len(data) < FOOTER_LEN:
        raise BundleError(f"file is too short to be an SSTable ({len(data)} bytes)")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != TABLE_MAGIC:
        raise BundleError("no SSTable footer (still being written, or truncated)")
    pos = len(data) - FOOTER_LEN
    _meta_off, pos = _varint(data, pos)
    _meta_size, pos = _varint(data, pos)
    index_off, pos = _varint(data, pos)
    index_size, pos = _varint(data, pos)
    if index_off + index_size + BLOCK_TRAILER_LEN > len(data) - FOOTER_LEN:
        raise BundleError("index block handle points past the footer")
    free = 0  # where the next data block may start
    for _key, handle in _block(data, index_off, index_size):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        if off < free or off + size + BLOCK_TRAILER_LEN > index_off:
            raise BundleError(
                f"data block handle ({off}, {size}) overlaps another block or the index block"
            )
        free = off + size + BLOCK_TRAILER_LEN
        yield off, size


def entries(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, serialized proto) pairs of an index file's bytes, in key order."""
    for off, size in _data_blocks(data):
        yield from _block(data, off, size)


def masked_crc32c(data: bytes) -> int:
    """The crc32c TensorFlow stores (in block trailers and BundleEntryProto.crc32c): masked,
    as LevelDB does, so that a crc of data holding crcs stays meaningful."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _check_block(data: bytes, offset: int, size: int) -> int:
    """Validate one block's trailer and checksum; return where its entries end."""
    end = offset + size
    if end + BLOCK_TRAILER_LEN > len(data) or size < 4:
        raise BundleError("block extends past the end of the file")
    if data[end] != 0:
        raise BundleError(f"compressed block (type {data[end]}) is not supported")
    # The trailer's masked crc32c covers the block and its type byte; TensorFlow's reader checks
    # it (DataLoss "block checksum mismatch"), so a checkpoint failing it cannot be restored.
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if masked_crc32c(data[offset : end + 1]) != stored:
        raise BundleError(f"block checksum mismatch at byte {offset}")
    (num_restarts,) = struct.unpack_from("<I", data, end - 4)
    limit = end - 4 - 4 * num_restarts
    if limit < offset:
        raise BundleError("bad block restart array")
    return limit


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
