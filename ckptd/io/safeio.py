"""The one safe way ckptd opens, reads and writes files under a watch root.

Files in a run directory are written by trainers and by anyone else who can write there, so
nothing about them is trusted:

- directories are reached component by component from the watch root through directory file
  descriptors with ``O_NOFOLLOW`` (no ``..``, no symlink), so nothing outside the root is ever
  read, written or deleted; the root itself is the user's choice and may be a symlink;
- files are opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot block the open) and must be
  regular files (``fstat``), else :class:`NotRegularFile` ("not a regular file");
- every read is capped: a file claiming more than its cap raises :class:`TooLarge`;
- writes go to a temporary name in the same directory fd, are fsynced, then renamed over the
  final name, and the directory is fsynced.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

StrPath = str | os.PathLike[str]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path that would leave the watch root or pass through a symlink: refused."""


class NotRegularFile(OSError):
    """A FIFO, device, socket, directory or symlink where a regular file was expected."""


class TooLarge(OSError):
    """A file bigger than any real one of its kind: not read."""


def _absolute(path: StrPath) -> str:
    """``os.path.abspath``, skipped for a path that is already absolute and normal (ckptd's own
    paths always are: every scan of every run comes here)."""
    text = os.fspath(path)
    if text[:1] == "/" and "/." not in text and "//" not in text and text[-1:] != "/":
        return text
    return os.path.abspath(text)


def _split(root: StrPath, path: StrPath) -> tuple[str, list[str]]:
    root_s = _absolute(root).rstrip("/") or "/"
    path_s = _absolute(path)
    if path_s == root_s:
        return root_s, []
    base = root_s if root_s.endswith("/") else root_s + "/"
    if not path_s.startswith(base):
        raise UnsafePath(errno.EXDEV, f"{path_s} is not under the watch root {root_s}")
    parts = path_s[len(base) :].split("/")
    if any(part in ("..", ".", "") for part in parts):
        raise UnsafePath(errno.EINVAL, f"{path_s}: refusing a path with '..' or '.'")
    return root_s, parts


def relative_parts(root: StrPath, path: StrPath) -> list[str]:
    """The components of ``path`` below ``root`` (both made absolute); raises UnsafePath."""
    return _split(root, path)[1]


@contextmanager
def open_dir_under(root: StrPath, directory: StrPath) -> Iterator[int]:
    """A file descriptor for ``directory``, reached from ``root`` without following symlinks."""
    root_s, parts = _split(root, directory)
    fd = os.open(root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(
                        exc.errno, f"{directory}: {part!r} is a symlink or not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def open_subdir(name: str, dir_fd: int) -> int:
    """A file descriptor for the directory ``name`` in ``dir_fd``; never a symlink (UnsafePath).

    For walking below a directory already reached safely (event-file subdirectories, nested
    run globs). Caller closes the fd.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(errno.EINVAL, f"{name!r}: not a plain directory name")
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(exc.errno, f"{name!r} is a symlink or not a directory") from None
        raise


def open_regular(name: str, dir_fd: int) -> tuple[int, os.stat_result]:
    """Open base name ``name`` in ``dir_fd`` for reading: (fd, fstat). Caller closes the fd.

    Never blocks on a FIFO and never follows a symlink; anything but a regular file raises
    :class:`NotRegularFile`.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(errno.EINVAL, f"{name!r}: not a plain file name")
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise NotRegularFile(errno.ELOOP, "not a regular file (a symlink)") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a socket / a directory
            raise NotRegularFile(exc.errno, "not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file")
    return fd, st


def read_fd(fd: int, size_hint: int, max_bytes: int, offset: int = 0) -> bytes:
    """Bytes of an open file from ``offset`` to its end, at most ``max_bytes`` of them.

    One ``pread`` when the file is no bigger than its stat size (the common case: a backfill
    reads thousands of small indexes); raises :class:`TooLarge` past ``max_bytes``.
    """
    want = max(size_hint - offset, 0)
    if want > max_bytes:
        raise TooLarge(errno.EFBIG, f"larger than {max_bytes:,} bytes")
    data = os.pread(fd, want + 1, offset)
    if len(data) <= want:
        return data
    grown = bytearray(data)  # it grew since the stat: read on to its end, capped
    while True:
        if len(grown) > max_bytes:
            raise TooLarge(errno.EFBIG, f"larger than {max_bytes:,} bytes")
        chunk = os.pread(fd, 1 << 20, offset + len(grown))
        if not chunk:
            return bytes(grown)
        grown += chunk


def read_file(name: str, dir_fd: int, max_bytes: int) -> bytes:
    """The whole regular file ``name`` in ``dir_fd``, capped at ``max_bytes``."""
    fd, st = open_regular(name, dir_fd)
    try:
        return read_fd(fd, st.st_size, max_bytes)
    finally:
        os.close(fd)


def read_checked(name: str, dir_fd: int, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of ``name`` in ``dir_fd``, for bytes the caller checks
    against a checksum it holds (a checkpoint's step: one per checkpoint at backfill, so no
    fstat). A symlink is refused (``O_NOFOLLOW``), a FIFO neither blocks (``O_NONBLOCK``) nor
    reads (``pread`` fails); any other file that is not the one expected gives bytes that fail
    the caller's checksum."""
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(errno.EINVAL, f"{name!r}: not a plain file name")
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def read_under(root: StrPath, path: StrPath, max_bytes: int) -> bytes:
    """The regular file ``path`` (under ``root``), reached safely and capped at ``max_bytes``."""
    directory, name = os.path.split(os.path.abspath(path))
    with open_dir_under(root, directory) as dfd:
        return read_file(name, dfd, max_bytes)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``name`` in ``dir_fd`` with ``data`` atomically: temp name, fsync, rename, fsync.

    The temporary name ends in ``.tmp<hex>``, which TensorFlow and ckptd's scanner both ignore.
    Whatever ``name`` was (a symlink, a FIFO), the rename replaces the directory entry itself;
    its old target is never opened or written.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePath(errno.EINVAL, f"{name!r}: not a plain file name")
    tmp = f"{name}.tmp{uuid.uuid4().hex}"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.fsync(dir_fd)
