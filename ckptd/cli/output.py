"""Shared CLI plumbing: the --json option, tables, the context that opens config and database."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import json
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ckptd.config import Config, WatchConfig, load_config
from ckptd.core.model import INT64_MAX, Action, Checkpoint, iso

if TYPE_CHECKING:  # the store (and SQLAlchemy) load with the commands that use it, not for --help
    from ckptd.api.status import DaemonStatus
    from ckptd.store.handle import Store

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


@dataclass
class CliContext:
    config_arg: str | None
    _config: Config | None = None
    _stores: dict[bool, Store] = field(default_factory=dict)

    def config(self, required: bool = False) -> Config:
        if self._config is None:
            self._config = load_config(self.config_arg, required=required)
        return self._config

    def store(self, *, readonly: bool = True) -> Store:
        """The configured database, opened once per mode (read-only unless asked)."""
        if readonly not in self._stores:
            from ckptd.store.handle import Store

            if readonly:
                _freeze_gc_at_exit()
            self._stores[readonly] = Store.open(self.config().daemon.database, readonly=readonly)
        return self._stores[readonly]

    def close_writable(self) -> None:
        """Close the read-write store a command opened: its connections go and SQLite folds
        the WAL into the database file now, not whenever the process exits (a caller that
        moves the file next, or runs another command in the same process, sees it whole)."""
        writable = self._stores.pop(False, None)
        if writable is not None:
            writable.close()

    def watch_for(self, watch_path: str) -> WatchConfig | None:
        from ckptd.api.targets import watch_of

        return watch_of(self.config(), watch_path)


pass_ctx = click.make_pass_decorator(CliContext)

COUNT = click.IntRange(1, INT64_MAX)


class CheckpointType(click.ParamType):
    """A checkpoint prefix path or ``RUN@STEP`` with a step SQLite can hold (a usage error
    otherwise, not an OverflowError from the driver)."""

    name = "checkpoint"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        _, sep, step = text.rpartition("@")
        if sep and step.isdigit() and not (step.isascii() and int(step) <= INT64_MAX):
            self.fail(f"{text!r}: the step after @ must be a whole number from 0 to {INT64_MAX}")
        return text


CHECKPOINT = CheckpointType()

_gc_frozen_at_exit = False


def _freeze_gc_at_exit() -> None:
    """A read command's process is about to end: skip the cyclic GC's last pass at exit.

    Collecting SQLAlchemy's object graph at interpreter shutdown was a large part of each
    `ckptd status`; the OS frees the memory anyway. Refcounting and atexit handlers still run, and a
    read-only connection has nothing to write back when it is not closed by a collection.
    """
    global _gc_frozen_at_exit
    if not _gc_frozen_at_exit:
        _gc_frozen_at_exit = True
        atexit.register(gc.freeze)


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--json``: print JSON only (for scripts) instead of a table."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON only, for scripts.")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def _clean(data: Any) -> Any:
    """NaN is not JSON: it becomes null (and ranks worst, as everywhere in ckptd)."""
    if isinstance(data, float) and data != data:
        return None
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_clean(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """One ``json.dumps`` and one write: ``json.dump`` would write each token separately.

    Indented on a terminal (for people); one line otherwise (for scripts): ``indent`` makes the
    json module fall back from its C encoder to pure Python, slow for long listings."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(_clean(data), indent=indent, default=str, allow_nan=False) + "\n")


# ---------------------------------------------------------------- the --json contracts


def checkpoint_json(c: Checkpoint, best: bool) -> dict[str, Any]:
    """The ``ls --json`` contract: run, step, path, state, metrics, best, exported, recorded_at;
    ``export_version`` (its highest published version) and ``serving`` (that version is the
    run's highest, the one TF Serving serves)."""
    return {
        "run": c.run,
        "step": c.step,
        "path": c.prefix,
        "state": c.state,
        "metrics": c.metrics,
        "best": best,
        "exported": c.exported,
        "export_version": c.export_version,
        "serving": c.serving,
        "recorded_at": iso(c.recorded_at),
        "format": c.format,
        "size": c.size,
        "files": list(c.files),
        "has_meta": c.has_meta,
        "reason": c.reason,
        "pinned": c.pinned,
        "evaluation": c.evaluation,
        "created_at": iso(c.created_at),
        "incarnation": c.incarnation,
    }


def export_text(c: Checkpoint) -> str:
    """``v3``, its highest published version, and ``(serving)`` when TF Serving serves it."""
    if not c.exported:
        return ""
    return f"v{c.export_version}" + (" (serving)" if c.serving else "")


def event_json(a: Action) -> dict[str, Any]:
    """The ``events --json`` contract."""
    return {
        "id": a.id,
        "at": iso(a.at),
        "kind": a.kind,
        "run": a.run,
        "subject": a.subject,
        "reason": a.reason,
        "detail": a.detail,
    }


def daemon_json(d: DaemonStatus | None) -> dict[str, Any]:
    """The ``status --json`` contract's ``daemon`` object."""
    if d is None:
        return {"alive": False}
    data = dataclasses.asdict(d)
    for key in ("started_at", "heartbeat_at", "stopped_at", "lease_expires_at"):
        data[key] = iso(data[key])
    return data


def console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


TABLE_GAP = 2  # spaces between columns


def cell_len(text: str) -> int:
    """Terminal columns of ``text`` (wide East Asian characters take two)."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _fold(text: str, width: int) -> list[str]:
    """``text`` cut into pieces of at most ``width`` columns (rich's ``overflow="fold"``)."""
    out: list[str] = []
    for line in text.splitlines() or [""]:
        if cell_len(line) <= width:
            out.append(line)
            continue
        if line.isascii():  # at spaces where it can, as rich does
            import textwrap

            out += textwrap.wrap(line, width, break_on_hyphens=False) or [""]
            continue
        piece, used = "", 0
        for ch in line:
            w = cell_len(ch)
            if used + w > width and piece:
                out.append(piece)
                piece, used = "", 0
            piece += ch
            used += w
        out.append(piece)
    return out


def _fit(widths: list[int], floors: list[int], limit: int) -> list[int]:
    """Narrow the widest columns (never below their floor) until the row fits ``limit``."""
    widths = list(widths)
    while sum(widths) + TABLE_GAP * (len(widths) - 1) > limit:
        i = max(range(len(widths)), key=lambda k: widths[k] - floors[k])
        if widths[i] <= floors[i]:
            break
        widths[i] -= 1
    return widths


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    empty: str = "nothing to show",
) -> None:
    """Aligned columns, written at once (rich's Table was slow for long tables).

    On a terminal the title and header are bold and long cells fold to fit its width; into a
    pipe or file nothing is folded, so each row stays on one line for grep and awk.
    """
    if not rows:
        click.echo(click.style(empty, dim=True))
        return
    blank = [""] * len(columns)
    cells = [list(columns)]
    cells += [(["" if v is None else str(v) for v in r] + blank)[: len(columns)] for r in rows]
    widths = [
        max(cell_len(line) for row in cells for line in row[i].splitlines() or [""])
        for i in range(len(columns))
    ]
    tty = sys.stdout.isatty()
    if tty:
        import shutil

        floors = [
            min(w, max([4, *(cell_len(x) for x in c.split())]))
            for w, c in zip(widths, columns, strict=True)
        ]
        widths = _fit(widths, floors, shutil.get_terminal_size().columns)
    lines = [click.style(title, bold=True)] if title else []
    for n, row in enumerate(cells):
        folded = [_fold(c, w) for c, w in zip(row, widths, strict=True)]
        for k in range(max(len(f) for f in folded)):
            parts = [f[k] if k < len(f) else "" for f in folded]
            text = (
                (" " * TABLE_GAP)
                .join(p + " " * (w - cell_len(p)) for p, w in zip(parts, widths, strict=True))
                .rstrip()
            )
            lines.append(click.style(text, bold=True) if n == 0 else text)
    click.echo("\n".join(lines))


def metric_columns(
    metrics: Sequence[dict[str, float]], first: Sequence[str | None] = (), limit: int = 4
) -> list[str]:
    """The metric columns of a table, ``limit`` in all: the configured best metrics ``first``
    (those any row has, so ranking is never hidden), then the others by name."""
    names = sorted({k for m in metrics for k in m})
    leading = [n for n in dict.fromkeys(first) if n in names]
    return (leading + [n for n in names if n not in leading])[:limit]


def fmt_value(v: float | None) -> str:
    if v is None:
        return "—"
    if v != v:
        return "nan"
    return f"{v:.4g}"


def fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
