"""The one safe path for files under a watch root: no symlinks out, no FIFOs, bounded reads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ckptd.io import safeio


def test_read_under_reads_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.index").write_bytes(b"x" * 10)
    assert safeio.read_under(tmp_path, tmp_path / "run" / "a.index", 100) == b"x" * 10


def test_a_fifo_is_not_a_regular_file_and_never_blocks(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.ckpt-5.index")
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            safeio.read_under(tmp_path, tmp_path / "model.ckpt-5.index", 100)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "opening a FIFO blocked"
    assert isinstance(errors[0], safeio.NotRegularFile)
    assert "not a regular file" in str(errors[0])


def test_a_symlinked_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint").symlink_to(tmp_path / "secret")
    with pytest.raises(safeio.NotRegularFile):
        safeio.read_under(tmp_path / "run", tmp_path / "run" / "checkpoint", 100)


def test_a_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").symlink_to("/dev/zero")
    with pytest.raises(safeio.NotRegularFile):
        safeio.read_under(tmp_path, tmp_path / "checkpoint", 100)


def test_a_symlinked_directory_below_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "checkpoint").write_text("theirs")
    root = tmp_path / "root"
    root.mkdir()
    (root / "run").symlink_to(outside)
    with pytest.raises(safeio.UnsafePath):
        safeio.read_under(root, root / "run" / "checkpoint", 100)
    with pytest.raises(safeio.UnsafePath), safeio.open_dir_under(root, root / "run"):
        pass


def test_the_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"ok")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert safeio.read_under(tmp_path / "link", tmp_path / "link" / "f", 10) == b"ok"


def test_paths_outside_or_with_dots_are_refused(tmp_path: Path) -> None:
    with pytest.raises(safeio.UnsafePath):
        safeio.relative_parts(tmp_path / "a", tmp_path / "b")
    with pytest.raises(safeio.UnsafePath):
        safeio.relative_parts(tmp_path / "a", str(tmp_path / "a") + "x/y")


def test_reads_are_capped_even_for_sparse_files(tmp_path: Path) -> None:
    with open(tmp_path / "big.index", "wb") as fh:
        fh.truncate(2 << 30)  # 2 GiB, sparse: costs nothing on disk
    with pytest.raises(safeio.TooLarge):
        safeio.read_under(tmp_path, tmp_path / "big.index", 1 << 20)


def test_read_fd_caps_a_file_that_grows_after_its_stat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert safeio.read_fd(fd, 10, 100) == b"a" * 10
        path.write_bytes(b"a" * 50)
        assert safeio.read_fd(fd, 10, 100) == b"a" * 50  # grew: read to its end
        path.write_bytes(b"a" * 500)
        with pytest.raises(safeio.TooLarge):
            safeio.read_fd(fd, 10, 100)
        assert safeio.read_fd(fd, 500, 1000, offset=490) == b"a" * 10
    finally:
        os.close(fd)


def test_write_atomic_replaces_a_symlink_without_touching_its_target(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("do not touch")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").symlink_to(target)
    with safeio.open_dir_under(run, run) as dfd:
        safeio.write_atomic(dfd, "checkpoint", b"new\n")
    assert target.read_text() == "do not touch"
    assert not (run / "checkpoint").is_symlink()
    assert (run / "checkpoint").read_bytes() == b"new\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]  # no temp left
