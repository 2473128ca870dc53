"""Shared CLI plumbing: the --json option, tables, the context that opens config and database."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ckptd.config import Config, WatchConfig, load_config

if TYPE_CHECKING:  # SQLAlchemy is imported by the commands that use the database, not by --help
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78


@dataclass
class CliContext:
    config_arg: str | None
    _config: Config | None = None
    _engines: dict[bool, Engine] = field(default_factory=dict)

    def config(self, required: bool = False) -> Config:
        if self._config is None:
            self._config = load_config(self.config_arg, required=required)
        return self._config

    def engine(self, *, readonly: bool = True) -> Engine:
        if readonly not in self._engines:
            from ckptd.store.db import make_engine

            self._engines[readonly] = make_engine(self.config().daemon.database, readonly=readonly)
        return self._engines[readonly]

    @contextmanager
    def session(self, *, readonly: bool = True) -> Iterator[Session]:
        from ckptd.store.db import session_scope

        with session_scope(self.engine(readonly=readonly)) as s:
            yield s

    def watch_for(self, watch_path: str) -> WatchConfig | None:
        for w in self.config().watches:
            if str(w.path) == watch_path:
                return w
        return None


pass_ctx = click.make_pass_decorator(CliContext)


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
    json.dump(_clean(data), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")


def console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    empty: str = "nothing to show",
) -> None:
    from rich.table import Table

    out = console()
    if not rows:
        out.print(f"[dim]{empty}[/dim]")
        return
    t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    out.print(t)


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
