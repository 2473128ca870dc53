"""The SSTable framing of a tensor-bundle ``.index`` (LevelDB's table format, as TensorFlow's
table writer lays it out): footer and magic, block handles, block trailers and their masked
crc32c, prefix-compressed entries. What the entries mean is ``tensorbundle.py``'s job."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import google_crc32c

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_LEN = 5  # compression type byte + crc32c
_KEY_BYTES_PER_BYTE = 16  # see _block


class BundleError(ValueError):
    """The index is not (yet) a valid tensor bundle; the message says why."""


def varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` (LevelDB's and protobuf's): (value, position after it)."""
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
            shared, pos = varint(data, pos)
            non_shared, pos = varint(data, pos)
            value_len, pos = varint(data, pos)
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
    _meta_off, pos = varint(data, pos)
    _meta_size, pos = varint(data, pos)
    index_off, pos = varint(data, pos)
    index_size, pos = varint(data, pos)
    if index_off + index_size + BLOCK_TRAILER_LEN > len(data) - FOOTER_LEN:
        raise BundleError("index block handle points past the footer")
    free = 0  # where the next data block may start
    for _key, handle in _block(data, index_off, index_size):
        off, p = varint(handle, 0)
        size, _ = varint(handle, p)
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
