"""The TOML configuration: parsed once, validated completely, frozen.

Every error names the file, the key and what was expected, so a typo is fixed in one try:
``/etc/ckptd/ckptd.toml: watch[0].best.mode: expected "min" or "max", got "maximum"``.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ckptd.core import retention

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/ckptd/ckptd.toml")
EVALUATORS = ("tfevents", "meta_graph", "keras", "python", "command")
EXPORT_FORMATS = ("saved_model", "frozen_graph")
OBSERVERS = ("auto", "inotify", "polling")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Problem:
    """One mistake: ``FILE: key: what was expected, got what``."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.source}: {self.key}: {self.message}"
            if self.key
            else f"{self.source}: {self.message}"
        )


class ConfigError(Exception):
    """Configuration problems a user must fix; exit status 78 (EX_CONFIG).

    ``problems`` lists every mistake found (the first is ``source``/``key``/``message``), so
    one edit fixes them all; ``str()`` is one line (it goes into STATUS= and ``ckptd status``).
    """

    def __init__(
        self, source: str, key: str, message: str, *, more: Sequence[Problem] = ()
    ) -> None:
        self.source, self.key, self.message = source, key, message
        self.problems = [Problem(source, key, message), *more]
        super().__init__("; ".join(str(p) for p in self.problems))


# ---------------------------------------------------------------- value types

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
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {_show(value)}")
    return seconds


def parse_duration(value: object) -> timedelta:
    """``"90s"``, ``"10m"``, ``"6h"``, ``"1.5d"`` or a number of seconds → timedelta."""
    seconds = _seconds(value)
    if not seconds <= timedelta.max.total_seconds():  # also NaN and infinity
        raise ValueError(f"expected {_DURATION_EXAMPLE}, got {_show(value)}")
    return timedelta(seconds=seconds)


def _duration(low: str, high: str) -> Callable[[object], timedelta]:
    """A duration within [low, high]: an absurd value is a typo, not a wish."""
    lo, hi = parse_duration(low).total_seconds(), parse_duration(high).total_seconds()

    def convert(value: object) -> timedelta:
        seconds = _seconds(value)
        if not lo <= seconds <= hi:  # also NaN
            raise ValueError(f"expected a duration from {low} to {high}, got {_show(value)}")
        return timedelta(seconds=seconds)

    return convert


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            quoted = [f'"{c}"' for c in choices]
            expected = " or ".join(quoted) if len(choices) == 2 else "one of " + ", ".join(quoted)
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return str(value)

    return convert


def _show(value: object) -> str:
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


def _typed(kind: type | tuple[type, ...], what: str) -> Callable[[object], Any]:
    def convert(value: object) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ValueError(f"expected {what}, got {_show(value)}")
        return value

    return convert


_bool = _typed(bool, "true or false")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    if "\0" in value:  # no file name, URL or argv can hold one
        raise ValueError(f"expected text without NUL characters, got {_show(value)}")
    return value


def _int(low: int, high: int) -> Callable[[object], int]:
    """A whole number within [low, high] (SQLite stores at most int64)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {_show(value)}")
        return value

    return convert


INT64_MAX = 2**63 - 1


def _path(value: object) -> Path:
    text = _str(value)
    if not text:
        raise ValueError("expected a path, got an empty string")
    if len(os.fsencode(text)) > 4095 or any(len(os.fsencode(p)) > 255 for p in text.split("/")):
        # Such a path can never exist (PATH_MAX, NAME_MAX): it would be "not there yet" forever.
        raise ValueError(
            f"expected a path of at most 4095 bytes, each name at most 255, got {_show(value)}"
        )
    # Lexically normal ("/data/../x" is "/x"), so equal and nested watches are seen as such.
    return Path(os.path.normpath(os.path.expanduser(text)))


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(
            f'expected a table of strings such as {{ "x" = "x:0" }}, got {_show(value)}'
        )
    return dict(value)


def _argv(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f'expected a list of strings such as ["eval.sh", "{{checkpoint}}"], got {_show(value)}'
        )
    argv = tuple(_str(v) for v in value)
    for (
        arg
    ) in argv:  # formatted as the evaluator does (daemon/evaluate.py), so it cannot fail there
        try:
            arg.format(checkpoint="/x/model.ckpt-1", step="1", run="r")
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(
                "expected arguments whose only fields are {checkpoint}, {step} and {run} "
                f"(write {{{{ and }}}} for a literal brace; {type(exc).__name__}: {exc}), "
                f"got {_show(arg)}"
            ) from None
    return argv


def _formats(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(
            f'expected "saved_model", "frozen_graph" or a list of both, got {_show(value)}'
        )
    for item in items:
        if item not in EXPORT_FORMATS:
            raise ValueError(f'expected "saved_model" or "frozen_graph", got {_show(item)}')
    # SavedModel first: its builder needs an empty directory; frozen.pb is added after.
    return tuple(sorted(set(items), key=EXPORT_FORMATS.index))


def _crontab(value: object) -> str:
    """A 5-field crontab, checked by the parser the scheduler uses (APScheduler, in UTC)."""
    text = _str(value)
    if len(text.split()) != 5:
        raise ValueError(
            f'expected a crontab schedule of 5 fields such as "0 * * * *", got {_show(value)}'
        )
    from datetime import UTC, datetime

    from apscheduler.triggers.cron import CronTrigger  # only configs with a cron key pay for it

    try:
        trigger = CronTrigger.from_crontab(text, timezone="UTC")
    except Exception as exc:  # its messages name the bad field, whatever the type
        raise ValueError(f"expected a valid crontab schedule ({exc}), got {_show(value)}") from None
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ValueError(f"expected a crontab schedule that fires, got {_show(value)} (never)")
    return text


def _tolerance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e300:
        raise ValueError(f"expected a finite number ≥ 0 such as 1e-5, got {_show(value)}")
    return float(value)


def _entry_point(value: object) -> str:
    text = _str(value)
    if not re.fullmatch(r"[\w.]+:[\w.]+", text):
        raise ValueError(f'expected "module:function", got {_show(value)}')
    return text


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def _address(value: object) -> str:
    """``host:port`` with a port from 1 to 65535, or "" for no metrics endpoint."""
    text = _str(value)
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
            f"got {_show(value)}"
        )
    return text


def _database(value: object) -> str:
    """An SQLAlchemy URL: ``sqlite:////abs/path.db`` or ``dialect[+driver]://...``."""
    text = _str(value)
    expected = 'expected a database URL such as "sqlite:////var/lib/ckptd/ckptd.db"'
    if not re.match(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://", text):
        raise ValueError(f"{expected}, got {_show(value)}")
    from sqlalchemy.engine import make_url  # the CLI's database commands import it anyway

    try:
        url = make_url(text)
        url.port  # noqa: B018 - parsed lazily: a port that is not a number raises here
    except Exception as exc:  # ArgumentError, ValueError: one message either way
        raise ValueError(f"{expected} ({exc}), got {_show(value)}") from None
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError(
            f"{expected} (an in-memory database is lost at exit and the CLI cannot see it), "
            f"got {_show(value)}"
        )
    return text


def _runs_glob(value: object) -> str:
    """A relative glob naming subdirectories: ``"*"``, ``"team-*/*"``."""
    text = _str(value)
    parts = Path(text).parts
    if not parts or text.startswith("/") or any(p in ("..", ".") for p in parts):
        raise ValueError(
            f'expected a glob of subdirectories relative to path such as "*" or "team-*/*" '
            f'(not empty, ".", ".." or absolute), got {_show(value)}'
        )
    return Path(text).as_posix()


def _keras_template(value: object) -> str:
    """A ModelCheckpoint file name template ckptd can parse: formatted and parsed back here."""
    import string

    from ckptd.io.kerasname import KerasTemplate

    text = _str(value)
    expected = 'expected a file name template such as "model.{epoch:02d}-{val_loss:.2f}.keras"'
    try:
        fields = [
            (name, spec or "")
            for _, name, spec, _ in string.Formatter().parse(text)
            if name is not None
        ]
    except ValueError as exc:
        raise ValueError(f"{expected} ({exc}), got {_show(value)}") from None
    if "/" in text or not text.endswith((".keras", ".weights.h5")):
        raise ValueError(
            f"{expected} (a file name ending in .keras or .weights.h5), got {_show(value)}"
        )
    for name, _spec in fields:
        if not name.isidentifier():
            raise ValueError(
                f"{expected} (fields are named, like {{epoch}} or {{val_loss:.4f}}; "
                f"not {{{name}}}), got {_show(value)}"
            )
    sample = {n: 3 if n in ("epoch", "batch") or s.endswith("d") else 0.25 for n, s in fields}
    try:
        name = text.format(**sample)
        parsed = KerasTemplate(text).parse(name)
    except (ValueError, KeyError, IndexError, re.error) as exc:
        raise ValueError(f"{expected} ({exc}), got {_show(value)}") from None
    metrics = {n for n in sample if n not in ("epoch", "batch")}
    if parsed is None or set(parsed[1]) != metrics:
        raise ValueError(
            f"{expected} (ckptd cannot read {name!r} back with it), got {_show(value)}"
        )
    return text


# ---------------------------------------------------------------- frozen config


@dataclass(frozen=True)
class BestConfig:
    metric: str | None = None
    mode: str = "max"


@dataclass(frozen=True)
class EvaluateConfig:
    evaluator: str = "tfevents"
    every: timedelta = timedelta(minutes=5)
    timeout: timedelta = timedelta(minutes=30)
    on_new: bool = True
    order: str = "oldest"
    max_attempts: int = 3
    retry_backoff: timedelta = timedelta(seconds=30)
    data: Path | None = None
    feed: Mapping[str, str] = field(default_factory=dict)
    fetch: Mapping[str, str] = field(default_factory=dict)
    use_ema: bool = False
    function: str | None = None
    command: tuple[str, ...] = ()
    batch_size: int | None = None


@dataclass(frozen=True)
class FreezeConfig:
    export_dir: Path
    format: tuple[str, ...] = ("saved_model",)
    every: timedelta = timedelta(hours=1)
    cron: str | None = None
    keep: int = 3
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    builder: str | None = None
    timeout: timedelta = timedelta(minutes=30)
    tolerance: float = 1e-5


@dataclass(frozen=True)
class RetainConfig:
    keep_last: int | None = None
    keep_best: int | None = None
    keep_every: timedelta | None = None
    keep_every_steps: int | None = None
    min_age: timedelta = timedelta(minutes=10)
    every: timedelta = timedelta(minutes=10)
    dry_run: bool = False

    def rules(self, best: BestConfig) -> tuple[retention.Rule, ...]:
        """The retention rules of this section; a prune keeps the union of what they keep."""
        return retention.rules_from(self, best.metric, best.mode)


@dataclass(frozen=True)
class WatchConfig:
    path: Path
    runs: str | None = None
    observer: str = "auto"
    keras_template: str | None = None
    best: BestConfig = field(default_factory=BestConfig)
    evaluate: EvaluateConfig | None = None
    freeze: FreezeConfig | None = None
    retain: RetainConfig | None = None


@dataclass(frozen=True)
class DaemonConfig:
    database: str
    rescan_interval: timedelta = timedelta(seconds=60)
    heartbeat_interval: timedelta = timedelta(seconds=10)
    log_level: str = "info"
    metrics_address: str = ""
    debounce: timedelta = timedelta(milliseconds=2)


@dataclass(frozen=True)
class Config:
    source: str
    daemon: DaemonConfig
    watches: tuple[WatchConfig, ...] = ()


# ---------------------------------------------------------------- schema

Schema = dict[str, Callable[[object], Any]]

# Durations and numbers have ranges: a 10-year debounce or a 0 s rescan is a typo, and the
# scheduler and SQLite (int64) have limits of their own. deploy/ckptd.toml lists them.
DAEMON_KEYS: Schema = {
    "database": _database,
    "rescan_interval": _duration("1s", "1d"),
    "heartbeat_interval": _duration("1s", "1h"),
    "log_level": _choice(*LOG_LEVELS),
    "metrics_address": _address,
    "debounce": _duration("0s", "10s"),
}
WATCH_KEYS: Schema = {
    "path": _path,
    "runs": _runs_glob,
    "observer": _choice(*OBSERVERS),
    "keras_template": _keras_template,
}
BEST_KEYS: Schema = {"metric": _str, "mode": _choice("min", "max")}
EVALUATE_KEYS: Schema = {
    "evaluator": _choice(*EVALUATORS),
    "every": _duration("1s", "30d"),
    "timeout": _duration("1s", "7d"),
    "on_new": _bool,
    "order": _choice("oldest", "newest"),
    "max_attempts": _int(1, 100),
    "retry_backoff": _duration("0s", "1d"),
    "data": _path,
    "feed": _str_map,
    "fetch": _str_map,
    "use_ema": _bool,
    "function": _entry_point,
    "command": _argv,
    "batch_size": _int(1, 2**31 - 1),
}
FREEZE_KEYS: Schema = {
    "export_dir": _path,
    "format": _formats,
    "every": _duration("1s", "30d"),
    "cron": _crontab,
    "keep": _int(1, 1000),
    "inputs": _str_map,
    "outputs": _str_map,
    "builder": _entry_point,
    "timeout": _duration("1s", "7d"),
    "tolerance": _tolerance,
}
RETAIN_KEYS: Schema = {
    "keep_last": _int(0, 1_000_000),
    "keep_best": _int(0, 1_000_000),
    "keep_every": _duration("1s", "365d"),
    "keep_every_steps": _int(1, INT64_MAX),
    "min_age": _duration("0s", "365d"),
    "every": _duration("1s", "30d"),
    "dry_run": _bool,
}


def _key(name: str) -> str:
    """A TOML key as the user would write it (quoted when it is not a bare key)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _show(name)


class _Reader:
    """Walks the raw TOML tables, converting values; every mistake is collected with its key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.failed: set[str] = set()  # keys already reported: no follow-on "required" for them

    def fail(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, key, message))
        self.failed.add(key)

    def section(
        self, raw: object, where: str, schema: Schema, subsections: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(where, f"expected a table, got {_show(raw)}")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = f"{where}.{_key(key)}" if where else _key(key)
            if key in subsections:
                continue
            if key not in schema:
                known = list(schema) + list(subsections)
                hint = difflib.get_close_matches(key, known, n=1)
                did_you_mean = f' (did you mean "{hint[0]}"?)' if hint else ""
                self.fail(name, f"unknown key{did_you_mean}; known keys: {', '.join(known)}")
                continue
            try:
                out[key] = schema[key](value)
            except ValueError as exc:
                self.fail(name, str(exc))
        return out

    def require(self, values: dict[str, Any], where: str, key: str, what: str) -> bool:
        name = f"{where}.{key}"
        if key in values:
            return True
        if name not in self.failed:
            self.fail(name, f"required: {what}")
        return False

    def done(self) -> None:
        if self.problems:
            first, *more = self.problems
            raise ConfigError(first.source, first.key, first.message, more=more)


def default_database_url() -> str:
    """``$STATE_DIRECTORY/ckptd.db`` under systemd, else ``~/.local/state/ckptd/ckptd.db``."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state) if state else Path.home() / ".local" / "state" / "ckptd"
    return f"sqlite:///{base / 'ckptd.db'}"


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document into a frozen :class:`Config`.

    Every problem is collected (then raised as one :class:`ConfigError`), so one edit fixes all.
    """
    reader = _Reader(source)
    reader.section(dict(data), "", {}, subsections=("daemon", "watch"))
    daemon_raw = reader.section(data.get("daemon", {}), "daemon", DAEMON_KEYS)
    daemon_raw.setdefault("database", default_database_url())
    daemon_raw["database"] = _sqlite_absolute(daemon_raw["database"], _base(source))
    daemon = DaemonConfig(**daemon_raw)

    watch_list = data.get("watch", [])
    if isinstance(watch_list, dict):
        watch_list = [watch_list]
    if not isinstance(watch_list, list):
        reader.fail("watch", f"expected [[watch]] tables, got {_show(watch_list)}")
        watch_list = []
    watches: list[tuple[int, WatchConfig]] = []
    for i, raw in enumerate(watch_list):
        where = f"watch[{i}]"
        if not isinstance(raw, dict):
            reader.fail(where, f"expected a [[watch]] table, got {_show(raw)}")
            continue
        watch = _watch(reader, raw, where)
        if watch is not None:
            watches.append((i, watch))
    # Each watch against the watches above it (O(watches x depth), not every pair).
    first: dict[Path, int] = {}
    for j, w in watches:
        if w.path in first:
            reader.fail(
                f"watch[{j}].path", f"{w.path} is already watched by watch[{first[w.path]}]"
            )
        else:
            first[w.path] = j
    by_index = dict(watches)
    for j, inner in watches:
        for parent in inner.path.parents:
            outer = first.get(parent)
            if outer is not None and (problem := _overlap(outer, by_index[outer], j, inner)):
                reader.fail(f"watch[{max(outer, j)}].path", problem)
                break
    reader.done()
    return Config(source=source, daemon=daemon, watches=tuple(w for _, w in watches))


def _base(source: str) -> Path:
    """What relative paths are relative to: the config file's directory. The daemon (cwd / under
    systemd) and the CLI (any cwd) must mean the same files."""
    return Path(os.path.abspath(Path(source).parent if not source.startswith("<") else "."))


def _sqlite_absolute(url: str, base: Path) -> str:
    """``sqlite:///ckptd.db`` made relative to ``base``, like every other path in the config."""
    if not url.startswith("sqlite") or url.startswith("sqlite:////"):
        return url
    from sqlalchemy.engine import make_url

    u = make_url(url)
    db = u.database or ""
    if u.get_backend_name() != "sqlite" or not db or os.path.isabs(db) or db.startswith("file:"):
        return url
    return u.set(database=os.path.normpath(base / db)).render_as_string(hide_password=False)


def _watch(reader: _Reader, raw: dict[str, Any], where: str) -> WatchConfig | None:
    """One [[watch]] table; None when it has a problem (already recorded in ``reader``)."""
    source = reader.source
    before = len(reader.problems)
    subs = ("best", "evaluate", "freeze", "retain")
    values = reader.section(raw, where, WATCH_KEYS, subsections=subs)
    base = _base(source)
    path_ok = reader.require(
        values, where, "path", 'the directory to watch, e.g. path = "/data/runs"'
    )
    if path_ok and not values["path"].is_absolute():
        try:
            values["path"] = (base / values["path"]).resolve()
        except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
            reader.fail(f"{where}.path", f"cannot be resolved: {exc}")
    best = BestConfig(**reader.section(raw.get("best", {}), f"{where}.best", BEST_KEYS))
    evaluate = freeze = retain = None
    if "evaluate" in raw:
        ev = reader.section(raw["evaluate"], f"{where}.evaluate", EVALUATE_KEYS)
        kind = ev.get("evaluator", "tfevents")
        needs = {
            "meta_graph": ("data", "feed", "fetch"),
            "keras": ("data",),
            "python": ("function",),
            "command": ("command",),
        }
        for key in needs.get(kind, ()):
            reader.require(ev, f"{where}.evaluate", key, f'the {kind} evaluator needs "{key}"')
        if "data" in ev:
            ev["data"] = Path(os.path.normpath(base / ev["data"]))
        evaluate = EvaluateConfig(**ev)
    if "freeze" in raw:
        fr = reader.section(raw["freeze"], f"{where}.freeze", FREEZE_KEYS)
        if reader.require(fr, f"{where}.freeze", "export_dir", "where exports are published"):
            if "frozen_graph" in fr.get("format", ()) and not fr.get("outputs"):
                reader.require({}, f"{where}.freeze", "outputs", "frozen_graph needs output nodes")
            fr["export_dir"] = Path(os.path.normpath(base / fr["export_dir"]))
            freeze = FreezeConfig(**fr)
    if "retain" in raw:
        retain = RetainConfig(**reader.section(raw["retain"], f"{where}.retain", RETAIN_KEYS))
    needs_metric = "freeze" in raw or (retain is not None and retain.keep_best)
    if needs_metric and not best.metric and f"{where}.best.metric" not in reader.failed:
        reader.fail(
            f"{where}.best.metric",
            "required when freeze or keep_best is set: the metric that ranks checkpoints, "
            'e.g. metric = "eval/accuracy"',
        )
    if len(reader.problems) > before:
        return None
    return WatchConfig(best=best, evaluate=evaluate, freeze=freeze, retain=retain, **values)


def _overlap(i: int, outer: WatchConfig, j: int, inner: WatchConfig) -> str | None:
    """Why watch[j], whose path is below watch[i]'s, may not be watched beside it, or None.

    Two watches must never own the same run: which one's retention and best settings applied
    would depend on event order. So a watch path may not lie inside another watch's runs; one
    merely inside the other's directory, in a branch its ``runs`` glob cannot match, is fine.
    """
    rel = inner.path.relative_to(outer.path).parts
    if outer.runs is not None:
        pattern = Path(outer.runs).parts
        if not all(fnmatch.fnmatchcase(r, p) for r, p in zip(rel, pattern, strict=False)):
            return None
    runs = f'runs = "{outer.runs}"' if outer.runs else "a single run"
    return (
        f"{inner.path} (watch[{j}]) is or holds a run of watch[{i}] ({outer.path}, {runs}); "
        "a run can belong to one watch only: watch disjoint directories, or narrow the runs glob"
    )


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where the config lives and whether the user asked for it explicitly."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get("CKPTD_CONFIG"):
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


MAX_CONFIG_BYTES = 1 << 20  # far more than any real config; a FIFO or /dev/zero is refused


def _read_config_file(path: Path) -> bytes:
    """The file's bytes: never blocks on a FIFO, never reads a device or an endless file."""
    import stat

    from ckptd.io.safeio import read_fd

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        return read_fd(fd, st.st_size, MAX_CONFIG_BYTES)
    finally:
        os.close(fd)


def load_config(explicit: str | os.PathLike[str] | None = None, *, required: bool = True) -> Config:
    """Read and validate the config: the one path for ``config check``, ``run`` and SIGHUP.

    A missing default file is allowed when not ``required``. Every way the file can be wrong
    (unreadable, not UTF-8, not TOML, a bad value) is a :class:`ConfigError`.
    """
    path, asked = config_path(explicit)
    source = os.fsencode(path).decode("utf-8", "backslashreplace")
    if source != str(path):
        # Its name is stored with the daemon's row and shown by `ckptd status`: it must be text.
        raise ConfigError(source, "", "the file name is not valid UTF-8; rename the file")
    try:
        raw = _read_config_file(path)
    except FileNotFoundError:
        if asked or required:
            raise ConfigError(
                source,
                "",
                "no such file; pass --config FILE or set CKPTD_CONFIG "
                "(an annotated example is deploy/ckptd.toml)",
            ) from None
        return parse_config({}, source="<defaults>")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, and a date such as 2024-02-30
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(
            source, "", "not valid TOML: arrays or tables nested too deeply"
        ) from None
    return parse_config(data, source=source)


def missing_paths(config: Config) -> list[str]:
    """Watch paths that do not exist yet: a warning, not an error (they are picked up later)."""
    out = []
    for i, w in enumerate(config.watches):
        try:
            os.stat(w.path)
        except FileNotFoundError:
            out.append(
                f"{config.source}: watch[{i}].path: {w.path} does not exist yet; it will be "
                "watched when it appears"
            )
        except OSError as exc:
            out.append(f"{config.source}: watch[{i}].path: {w.path}: {exc.strerror or exc}")
    return out


def warn_missing_paths(config: Config) -> list[str]:
    warnings = missing_paths(config)
    for msg in warnings:
        log.warning(msg)
    return warnings
