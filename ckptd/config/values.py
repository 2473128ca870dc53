"""Converters from raw TOML values to typed config values.

A converter takes whatever TOML produced (any type) and returns the typed value or raises
ValueError whose message says what was expected and shows what was given; the reader adds the
file and the key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ckptd.store import urls

EXPORT_FORMATS = ("saved_model", "frozen_graph")


def show(value: object) -> str:
    """A value as an error message quotes it: one line, at most 80 characters."""
    if isinstance(value, str):
        text = value if len(value) <= 80 else value[:77] + "..."
        # Printable text as written (é, 💥); newlines and other controls escaped: one line.
        shown = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
        )
        return '"' + shown.replace('"', '\\"') + '"'
    if isinstance(value, dict | list):
        return "a table" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- durations

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_DURATION_EXAMPLE = 'a duration such as "90s", "10m" or "6h"'


def _seconds(value: object) -> float:
    """A duration's seconds, possibly NaN or infinite (the callers bound them)."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf  # a huge int: no OverflowError
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {show(value)}")
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {show(value)}")
    return seconds


def parse_duration(value: object) -> timedelta:
    """``"90s"``, ``"10m"``, ``"6h"``, ``"1.5d"`` or a number of seconds → timedelta."""
    seconds = _seconds(value)
    if not seconds <= timedelta.max.total_seconds():  # also NaN and infinity
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {show(value)}")
    return timedelta(seconds=seconds)


def duration(low: str, high: str) -> Callable[[object], timedelta]:
    """A duration within [low, high]: an absurd value is a typo, not a wish."""
    lo, hi = parse_duration(low).total_seconds(), parse_duration(high).total_seconds()

    def convert(value: object) -> timedelta:
        seconds = _seconds(value)
        if not lo <= seconds <= hi:  # also NaN
            raise ValueError(f"expected a duration from {low} to {high}, got {show(value)}")
        return timedelta(seconds=seconds)

    return convert


# ---------------------------------------------------------------- plain values


def choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            quoted = [f'"{c}"' for c in choices]
            expected = " or ".join(quoted) if len(choices) == 2 else "one of " + ", ".join(quoted)
            raise ValueError(f"expected {expected}, got {show(value)}")
        return str(value)

    return convert


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    if "\0" in value:  # no file name, URL or argv can hold one
        raise ValueError(f"expected text without NUL characters, got {show(value)}")
    return value


def daemon_name(value: object) -> str:
    """A daemon's name among those sharing a database: printable, 1 to 255 characters."""
    text = string(value).strip()
    if not text or len(text) > 255 or not text.isprintable():
        raise ValueError(f"expected a name of 1 to 255 printable characters, got {show(value)}")
    return text


def whole(low: int, high: int) -> Callable[[object], int]:
    """A whole number within [low, high] (SQLite stores at most int64)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {show(value)}")
        return value

    return convert


def tolerance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e300:
        raise ValueError(f"expected a finite number ≥ 0 such as 1e-5, got {show(value)}")
    return float(value)


def path(value: object) -> Path:
    text = string(value)
    if not text:
        raise ValueError("expected a path, got an empty string")
    if len(os.fsencode(text)) > 4095 or any(len(os.fsencode(p)) > 255 for p in text.split("/")):
        # Such a path can never exist (PATH_MAX, NAME_MAX): it would be "not there yet" forever.
        raise ValueError(
            f"expected a path of at most 4095 bytes, each name at most 255, got {show(value)}"
        )
    # Lexically normal ("/data/../x" is "/x"), so equal and nested watches are seen as such.
    return Path(os.path.normpath(os.path.expanduser(text)))


def str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(
            f'expected a table of strings such as {{ "x" = "x:0" }}, got {show(value)}'
        )
    return dict(value)


def export_formats(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(
            f'expected "saved_model", "frozen_graph" or a list of both, got {show(value)}'
        )
    for item in items:
        if item not in EXPORT_FORMATS:
            raise ValueError(f'expected "saved_model" or "frozen_graph", got {show(item)}')
    # SavedModel first: its builder needs an empty directory; frozen.pb is added after.
    return tuple(sorted(set(items), key=EXPORT_FORMATS.index))


def path_list(value: object) -> tuple[Path | str, ...]:
    """A non-empty list of paths or object store URLs (a worker's watches: each must be a
    [[watch]] path)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f'expected a list of paths such as ["/data/runs"], got {show(value)}')
    from ckptd.config.locations import path_or_url

    return tuple(dict.fromkeys(path_or_url(v) for v in value))


def subset(*choices: str) -> Callable[[object], tuple[str, ...]]:
    """A non-empty list of some of ``choices`` (in their order, each once)."""

    def convert(value: object) -> tuple[str, ...]:
        items = value if isinstance(value, list) else None
        bad = [item for item in items or [] if item not in choices]
        if not items or bad:
            quoted = ", ".join(f'"{c}"' for c in choices)
            got = show(bad[0]) if bad else show(value)
            raise ValueError(f"expected a non-empty list of {quoted}, got {got}")
        return tuple(c for c in choices if c in items)

    return convert


# ---------------------------------------------------------------- values checked by their user


def argv(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f'expected a list of strings such as ["eval.sh", "{{checkpoint}}"], got {show(value)}'
        )
    args = tuple(string(v) for v in value)
    # Formatted as the evaluator does (api/evaluate.py), so it cannot fail there.
    for arg in args:
        try:
            arg.format(checkpoint="/x/model.ckpt-1", step="1", run="r")
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(
                "expected arguments whose only fields are {checkpoint}, {step} and {run} "
                f"(write {{{{ and }}}} for a literal brace; {type(exc).__name__}: {exc}), "
                f"got {show(arg)}"
            ) from None
    return args


def crontab(value: object) -> str:
    """A 5-field crontab, checked by the parser the scheduler uses (APScheduler, in UTC)."""
    text = string(value)
    if len(text.split()) != 5:
        raise ValueError(
            f'expected a crontab schedule of 5 fields such as "0 * * * *", got {show(value)}'
        )
    from datetime import UTC, datetime

    from apscheduler.triggers.cron import CronTrigger  # only configs with a cron key pay for it

    try:
        trigger = CronTrigger.from_crontab(text, timezone="UTC")
    except Exception as exc:  # its messages name the bad field, whatever the type
        raise ValueError(f"expected a valid crontab schedule ({exc}), got {show(value)}") from None
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ValueError(f"expected a crontab schedule that fires, got {show(value)} (never)")
    return text


def entry_point(value: object) -> str:
    text = string(value)
    if not re.fullmatch(r"[\w.]+:[\w.]+", text):
        raise ValueError(f'expected "module:function", got {show(value)}')
    return text


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def address(value: object) -> str:
    """``host:port`` with a port from 1 to 65535, or "" for no metrics endpoint."""
    text = string(value)
    host, sep, port = text.rpartition(":")
    if text and not (
        sep
        and _HOST.fullmatch(host)
        and port.isascii()
        and port.isdigit()
        and 1 <= int(port) <= 65535
    ):
        raise ValueError(
            f'expected "host:port" with a port from 1 to 65535, such as "127.0.0.1:9464", '
            f"got {show(value)}"
        )
    return text


def database(value: object) -> str:
    """A database URL the store can open: ``sqlite:////abs/path.db`` or ``dialect[+driver]://``."""
    text = string(value)
    try:
        urls.check(text)
        urls.check_driver(text)
    except urls.MissingDriver:
        raise  # says what to install
    except ValueError as exc:
        why = f" ({exc})" if str(exc) else ""
        raise ValueError(
            f'expected a database URL such as "{urls.EXAMPLE}"{why}, got {show(value)}'
        ) from None
    return text


def runs_glob(value: object) -> str:
    """A relative glob naming subdirectories: ``"*"``, ``"team-*/*"``."""
    text = string(value)
    parts = Path(text).parts
    if not parts or text.startswith("/") or any(p in ("..", ".") for p in parts):
        raise ValueError(
            f'expected a glob of subdirectories relative to path such as "*" or "team-*/*" '
            f'(not empty, ".", ".." or absolute), got {show(value)}'
        )
    return Path(text).as_posix()


def step_variable(value: object) -> str:
    """A checkpoint tensor key: ``"global_step"``, ``"train/step"`` or a key as
    ``tf.train.list_variables`` prints it (``"train/step/.ATTRIBUTES/VARIABLE_VALUE"``)."""
    text = string(value).strip()
    if not text or text.startswith("/") or "//" in text:
        raise ValueError(
            "expected the name of the checkpoint variable holding the training step, as "
            'tf.train.list_variables prints it, e.g. "global_step" or "train/step", '
            f"got {show(value)}"
        )
    return text


def keras_template(value: object) -> str:
    """A ModelCheckpoint file name template ckptd can parse: formatted and parsed back here."""
    from string import Formatter

    from ckptd.io.kerasname import KerasTemplate

    text = string(value)
    expected = 'expected a file name template such as "model.{epoch:02d}-{val_loss:.2f}.keras"'
    try:
        fields = [
            (name, spec or "") for _, name, spec, _ in Formatter().parse(text) if name is not None
        ]
    except ValueError as exc:
        raise ValueError(f"{expected} ({exc}), got {show(value)}") from None
    if "/" in text or not text.endswith((".keras", ".weights.h5")):
        raise ValueError(
            f"{expected} (a file name ending in .keras or .weights.h5), got {show(value)}"
        )
    for name, _spec in fields:
        if not name.isidentifier():
            raise ValueError(
                f"{expected} (fields are named, like {{epoch}} or {{val_loss:.4f}}; "
                f"not {{{name}}}), got {show(value)}"
            )
    sample = {n: 3 if n in ("epoch", "batch") or s.endswith("d") else 0.25 for n, s in fields}
    try:
        name = text.format(**sample)
        parsed = KerasTemplate(text).parse(name)
    except (ValueError, KeyError, IndexError, re.error) as exc:
        raise ValueError(f"{expected} ({exc}), got {show(value)}") from None
    metrics = {n for n in sample if n not in ("epoch", "batch")}
    if parsed is None or set(parsed[1]) != metrics:
        raise ValueError(f"{expected} (ckptd cannot read {name!r} back with it), got {show(value)}")
    return text
