"""The ``checkpoint`` state file TensorFlow keeps beside its checkpoints.

A text-format ``CheckpointState`` proto. TF1 Saver writes absolute paths, TF2 CheckpointManager
relative ones plus ``all_model_checkpoint_timestamps``. Read without TensorFlow; rewritten the way
TensorFlow does it (temp file in the same directory, then rename) so that readers such as
``tf.train.latest_checkpoint`` never see half a file.

Both go through :mod:`ckptd.io.safeio`: the run directory is reached from the watch root without
following a symlink below it, a state file that is a FIFO, a device or a symlink is never opened
(it is unreadable), reads are capped, and a rewrite replaces the directory entry itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ckptd.core.retention import NO_STATE, TrainerState
from ckptd.io import safeio
from ckptd.io.safeio import StrPath

log = logging.getLogger(__name__)

STATE_FILE = "checkpoint"
# The largest state file ckptd reads. TensorFlow lists every kept checkpoint in it, one line of
# path (plus one of timestamp, TF2) each, and rewrites it whole at every save: 64 MiB is over
# 200,000 checkpoints with 200-byte paths, far beyond what any trainer keeps; a bigger file is
# unreadable (logged, treated as absent).
STATE_FILE_MAX_BYTES = 64 << 20
_LINE = re.compile(r'^\s*(\w+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|([-+0-9.eE]+|[-+]?inf|[-+]?nan))\s*$')
_ESCAPE = re.compile(r"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
# What TensorFlow writes (python protobuf ``text_format``, ``CEscape(as_utf8=False)``): the
# UTF-8 bytes, with quotes, backslash and control characters escaped, non-ASCII as octal.
_BYTE_ESCAPES = [f"\\{i:03o}" for i in range(32)] + [chr(i) for i in range(32, 127)]
_BYTE_ESCAPES += [f"\\{i:03o}" for i in range(127, 256)]
for _byte, _text in ((9, "\\t"), (10, "\\n"), (13, "\\r"), (34, '\\"'), (39, "\\'"), (92, "\\\\")):
    _BYTE_ESCAPES[_byte] = _text


@dataclass
class CheckpointState:
    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float | None = None

    def resolve(self, run_dir: Path, path: str) -> Path:
        """Absolute prefix path of an entry (TF2 writes them relative to the directory)."""
        p = Path(path)
        return p if p.is_absolute() else run_dir / p


def _unescape(text: str) -> str:
    """A text-format string's value: escapes (octal/hex ones are bytes of UTF-8) resolved."""
    if "\\" not in text:
        return text
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        esc = m.group(1)
        if esc[0] in "01234567":
            out.append(int(esc, 8) & 0xFF)
        elif esc[0] == "x" and len(esc) > 1:
            out.append(int(esc[1:], 16))
        else:
            out += _ESCAPES.get(esc, esc).encode("utf-8")
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return out.decode("utf-8", errors="replace")


def _escape(text: str) -> str:
    return "".join(_BYTE_ESCAPES[b] for b in text.encode("utf-8", errors="surrogateescape"))


def parse(text: str) -> CheckpointState:
    """Parse a state file's text; malformed lines are ignored (TF's own parser is lenient)."""
    state = CheckpointState()
    # Only "\n" ends a line: str.splitlines() would also split inside a path at \r, \x85, \u2028…
    for line in text.split("\n"):
        m = _LINE.match(line)
        if not m:
            continue
        key, string, number = m.groups()
        if key == "model_checkpoint_path" and string is not None:
            state.model_checkpoint_path = _unescape(string)
        elif key == "all_model_checkpoint_paths" and string is not None:
            state.all_model_checkpoint_paths.append(_unescape(string))
        elif number is not None and key in (
            "all_model_checkpoint_timestamps",
            "last_preserved_timestamp",
        ):
            try:
                value = float(number)
            except ValueError:
                continue  # e.g. "1.2.3": malformed, ignored like any other bad line
            if key == "last_preserved_timestamp":
                state.last_preserved_timestamp = value
            else:
                state.all_model_checkpoint_timestamps.append(value)
    return state


def read_at(dir_fd: int) -> CheckpointState | None:
    """The state file in the run directory ``dir_fd``; None when there is none.

    Raises OSError when it cannot be read: :class:`safeio.NotRegularFile` (a FIFO, a symlink …),
    :class:`safeio.TooLarge` (over STATE_FILE_MAX_BYTES), or the system's error.
    """
    try:
        data = safeio.read_file(STATE_FILE, dir_fd, STATE_FILE_MAX_BYTES)
    except FileNotFoundError:
        return None
    return parse(data.decode("utf-8", errors="replace"))


def read(run_dir: Path, root: Path | None = None) -> CheckpointState | None:
    """The run's state file, or None when it is absent or unreadable (logged).

    ``run_dir`` is reached from the watch ``root`` (default: the run directory itself).
    """
    try:
        with safeio.open_dir_under(root if root is not None else run_dir, run_dir) as dfd:
            return read_at(dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("%s/%s: %s; ignored", run_dir, STATE_FILE, exc.strerror or exc)
        return None


def trainer_state(run_dir: StrPath, root: StrPath) -> TrainerState:
    """What the run's state file tells retention (one read of it, reached from the watch
    ``root``): the checkpoint TensorFlow resumes from, as a prefix spelt like ckptd records
    them, and the manager's ``last_preserved_timestamp``. Nothing without a readable file."""
    state = read(Path(run_dir), Path(root))
    if state is None:
        return NO_STATE
    return TrainerState(current_prefix(state, run_dir), utc(state.last_preserved_timestamp))


def current_prefix(state: CheckpointState, run_dir: StrPath) -> str | None:
    """``model_checkpoint_path`` as ckptd spells a checkpoint of ``run_dir`` (its path joined
    with the name): TF1 writes the directory as the trainer spelt it, maybe through a symlink."""
    if not state.model_checkpoint_path:
        return None
    base = str(Path(run_dir))
    path = _resolve(base, state.model_checkpoint_path)
    directory, name = os.path.split(path)
    if directory != base and os.path.realpath(directory) == os.path.realpath(base):
        return os.path.join(base, name)
    return path


def utc(timestamp: float | None) -> datetime | None:
    """A state file's POSIX timestamp as the naive UTC time the store keeps; None if absurd."""
    if timestamp is None:
        return None
    try:
        return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):  # inf, nan, beyond year 9999
        return None


def render(state: CheckpointState) -> str:
    lines = [f'model_checkpoint_path: "{_escape(state.model_checkpoint_path)}"']
    lines += [
        f'all_model_checkpoint_paths: "{_escape(p)}"' for p in state.all_model_checkpoint_paths
    ]
    lines += [
        f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps
    ]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    return "\n".join(lines) + "\n"


def write_at(dir_fd: int, state: CheckpointState) -> None:
    """Replace the state file in ``dir_fd`` atomically (temp name TF itself ignores, fsync,
    rename, fsync dir); whatever the old entry was (a symlink), its target is never written."""
    safeio.write_atomic(dir_fd, STATE_FILE, render(state).encode("utf-8"))


def write_atomic(run_dir: Path, state: CheckpointState, root: Path | None = None) -> None:
    """:func:`write_at` in ``run_dir``, reached from the watch ``root`` (default: itself)."""
    with safeio.open_dir_under(root if root is not None else run_dir, run_dir) as dfd:
        write_at(dfd, state)


def _resolve(run_dir: str, entry: str) -> str:
    """``str(CheckpointState().resolve(Path(run_dir), entry))`` without building paths for plain
    base names (TF2 writes those); ``run_dir`` must already be normalized (``str(Path(...))``)."""
    if entry and "/" not in entry and entry not in (".", ".."):
        return f"{run_dir}/{entry}" if run_dir != "/" else f"/{entry}"
    return str(CheckpointState().resolve(Path(run_dir), entry))


def without(
    state: CheckpointState,
    run_dir: StrPath,
    removed: Collection[StrPath],
    gone: Callable[[str], bool] | None = None,
) -> CheckpointState:
    """The state with ``removed`` prefixes dropped, keeping paths' style and their timestamps.

    With ``gone``, every other entry whose checkpoint ``gone(absolute prefix)`` says no longer
    exists is dropped too. ``model_checkpoint_path`` stays unless dropped; then it becomes the
    newest remaining entry, as TF would have it.
    """
    base = str(Path(run_dir))
    drop = {str(p) for p in removed}
    paths: list[str] = []
    stamps: list[float] = []
    dropped: set[str] = set()
    old_stamps = state.all_model_checkpoint_timestamps
    has_stamps = len(old_stamps) == len(state.all_model_checkpoint_paths)
    for i, entry in enumerate(state.all_model_checkpoint_paths):
        path = _resolve(base, entry)
        if path in drop or (gone is not None and gone(path)):
            dropped.add(path)
            continue
        paths.append(entry)
        if has_stamps:
            stamps.append(old_stamps[i])
    current = state.model_checkpoint_path
    if current:
        path = _resolve(base, current)
        if path in drop or path in dropped:
            current = paths[-1] if paths else ""
    return CheckpointState(current, paths, stamps, state.last_preserved_timestamp)


def gone_at(dir_fd: int, run_dir: StrPath) -> Callable[[str], bool]:
    """For :func:`without`: whether a checkpoint prefix no longer exists (neither its .index nor
    a file of that name). Entries in the run directory are looked up in ``dir_fd``, never through
    a symlink; one naming another directory (TF1 writes absolute paths, maybe through another
    mount) only by a stat of its path: nothing there is ever opened."""
    base = str(Path(run_dir))
    real: list[str] = []

    def gone(path: str) -> bool:
        directory, name = os.path.split(path)
        in_run = directory == base
        if not in_run:  # TF1 writes absolute paths as the trainer spelt them: maybe the real one
            if not real:
                real.append(os.path.realpath(base))
            in_run = directory == real[0]
        if in_run:
            return not _exists_at(dir_fd, name)
        return not (os.path.exists(path + ".index") or os.path.exists(path))

    return gone


def _exists_at(dir_fd: int, name: str) -> bool:
    for candidate in (name + ".index", name):
        try:
            os.stat(candidate, dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            continue
        except OSError:
            return True  # cannot tell: keep the entry
    return False


def drop_entries(
    run_dir: StrPath, root: StrPath, removed: Collection[str], newest: Callable[[], str | None]
) -> None:
    """Rewrite the run's state file without the ``removed`` prefixes (deleted by a prune: dropped
    without a look at the disk) and without every entry whose files are gone.

    The run directory is reached from the watch ``root`` through :mod:`ckptd.io.safeio`: a run
    that is gone, or whose directory (or anything on the way below the root) is now a symlink,
    is left alone, and a state file that is a symlink, a FIFO or too big is never read. When no
    entry is left, the file points at ``newest()`` (TF refuses a state file without a latest
    checkpoint), or is left as it is when that is None.
    """
    try:
        with safeio.open_dir_under(root, run_dir) as dfd:
            _drop_entries_at(dfd, str(Path(run_dir)), removed, newest)
    except FileNotFoundError:
        return  # the run directory is gone: nothing to repair
    except OSError as exc:  # a symlink below the root, permissions …: left alone
        log.warning("%s/%s: not rewritten: %s", run_dir, STATE_FILE, exc.strerror or exc)


def _drop_entries_at(
    dfd: int, run_dir: str, removed: Collection[str], newest: Callable[[], str | None]
) -> None:
    try:
        state = read_at(dfd)
    except OSError as exc:
        log.warning(
            "%s/%s: %s; not read or rewritten (ckptd uses only a regular state file: "
            "replace or remove it)",
            run_dir,
            STATE_FILE,
            exc.strerror or exc,
        )
        return
    if state is None:
        return
    new = without(state, run_dir, removed, gone_at(dfd, run_dir))
    if not new.all_model_checkpoint_paths:
        prefix = newest()
        if prefix is None:
            return
        name = os.path.basename(prefix)
        new = CheckpointState(name, [name], [], state.last_preserved_timestamp)
    if new != state:
        try:
            write_at(dfd, new)
        except OSError as exc:
            log.error("could not rewrite %s/checkpoint: %s", run_dir, exc)
