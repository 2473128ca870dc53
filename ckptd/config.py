"""The TOML configuration: parsed once, validated completely, frozen.

Every error names the file, the key and what was expected, so a typo is fixed in one try:
``/etc/ckptd/ckptd.toml: watch[0].best.mode: expected "min" or "max", got "maximum"``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/ckptd/ckptd.toml")
EVALUATORS = ("tfevents", "meta_graph", "keras", "python", "command")
EXPORT_FORMATS = ("saved_model", "frozen_graph")
OBSERVERS = ("auto", "inotify", "polling")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem a user must fix; exit status 78 (EX_CONFIG)."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# ---------------------------------------------------------------- value types

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object) -> timedelta:
    """``"90s"``, ``"10m"``, ``"6h"``, ``"1.5d"`` or a number of seconds → timedelta."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "90s", "10m" or "6h", got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f'expected a duration such as "90s", "10m" or "6h", got {value!r}')
    if seconds < 0:
        raise ValueError(f"expected a non-negative duration, got {value!r}")
    return timedelta(seconds=seconds)


def format_duration(td: timedelta) -> str:
    seconds = td.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            quoted = [f'"{c}"' for c in choices]
            expected = " or ".join(quoted) if len(choices) == 2 else "one of " + ", ".join(quoted)
            raise ValueError(f"expected {expected}, got {_show(value)}")
        return str(value)

    return convert


def _show(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _typed(kind: type | tuple[type, ...], what: str) -> Callable[[object], Any]:
    def convert(value: object) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ValueError(f"expected {what}, got {_show(value)}")
        return value

    return convert


_str = _typed(str, "a string")
_bool = _typed(bool, "true or false")


def _nonneg_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number ≥ 0, got {_show(value)}")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number ≥ 1, got {_show(value)}")
    return value


def _path(value: object) -> Path:
    text = _str(value)
    if not text:
        raise ValueError("expected a path, got an empty string")
    return Path(os.path.expanduser(text))


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
    return tuple(value)


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
    text = _str(value)
    if len(text.split()) != 5:
        raise ValueError(
            f'expected a crontab schedule of 5 fields such as "0 * * * *", got {_show(value)}'
        )
    return text


def _tolerance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a non-negative number such as 1e-5, got {_show(value)}")
    return float(value)


def _entry_point(value: object) -> str:
    text = _str(value)
    if not re.fullmatch(r"[\w.]+:[\w.]+", text):
        raise ValueError(f'expected "module:function", got {_show(value)}')
    return text


def _address(value: object) -> str:
    text = _str(value)
    if text and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", text):
        raise ValueError(f'expected "host:port" such as "127.0.0.1:9464", got {_show(value)}')
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

DAEMON_KEYS: Schema = {
    "database": _str,
    "rescan_interval": parse_duration,
    "heartbeat_interval": parse_duration,
    "log_level": _choice(*LOG_LEVELS),
    "metrics_address": _address,
    "debounce": parse_duration,
}
WATCH_KEYS: Schema = {
    "path": _path,
    "runs": _str,
    "observer": _choice(*OBSERVERS),
    "keras_template": _str,
}
BEST_KEYS: Schema = {"metric": _str, "mode": _choice("min", "max")}
EVALUATE_KEYS: Schema = {
    "evaluator": _choice(*EVALUATORS),
    "every": parse_duration,
    "timeout": parse_duration,
    "on_new": _bool,
    "order": _choice("oldest", "newest"),
    "max_attempts": _positive_int,
    "retry_backoff": parse_duration,
    "data": _path,
    "feed": _str_map,
    "fetch": _str_map,
    "use_ema": _bool,
    "function": _entry_point,
    "command": _argv,
    "batch_size": _positive_int,
}
FREEZE_KEYS: Schema = {
    "export_dir": _path,
    "format": _formats,
    "every": parse_duration,
    "cron": _crontab,
    "keep": _positive_int,
    "inputs": _str_map,
    "outputs": _str_map,
    "builder": _entry_point,
    "timeout": parse_duration,
    "tolerance": _tolerance,
}
RETAIN_KEYS: Schema = {
    "keep_last": _nonneg_int,
    "keep_best": _nonneg_int,
    "keep_every": parse_duration,
    "keep_every_steps": _positive_int,
    "min_age": parse_duration,
    "every": parse_duration,
    "dry_run": _bool,
}


class _Reader:
    """Walks the raw TOML tables, converting values and naming the exact key on error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def section(
        self, raw: object, where: str, schema: Schema, subsections: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise ConfigError(self.source, where, f"expected a table, got {_show(raw)}")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = f"{where}.{key}" if where else key
            if key in subsections:
                continue
            if key not in schema:
                known = list(schema) + list(subsections)
                hint = difflib.get_close_matches(key, known, n=1)
                did_you_mean = f' (did you mean "{hint[0]}"?)' if hint else ""
                raise ConfigError(
                    self.source, name, f"unknown key{did_you_mean}; known keys: {', '.join(known)}"
                )
            try:
                out[key] = schema[key](value)
            except ValueError as exc:
                raise ConfigError(self.source, name, str(exc)) from None
        return out

    def require(self, values: dict[str, Any], where: str, key: str, what: str) -> None:
        if key not in values:
            raise ConfigError(self.source, f"{where}.{key}", f"required: {what}")


def default_database_url() -> str:
    """``$STATE_DIRECTORY/ckptd.db`` under systemd, else ``~/.local/state/ckptd/ckptd.db``."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state) if state else Path.home() / ".local" / "state" / "ckptd"
    return f"sqlite:///{base / 'ckptd.db'}"


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document into a frozen :class:`Config`."""
    reader = _Reader(source)
    top = reader.section(dict(data), "", {}, subsections=("daemon", "watch"))
    del top
    daemon_raw = reader.section(data.get("daemon", {}), "daemon", DAEMON_KEYS)
    daemon_raw.setdefault("database", default_database_url())
    daemon = DaemonConfig(**daemon_raw)

    watch_list = data.get("watch", [])
    if isinstance(watch_list, dict):
        watch_list = [watch_list]
    if not isinstance(watch_list, list):
        raise ConfigError(source, "watch", "expected [[watch]] tables")
    watches = []
    for i, raw in enumerate(watch_list):
        where = f"watch[{i}]"
        subs = ("best", "evaluate", "freeze", "retain")
        values = reader.section(raw, where, WATCH_KEYS, subsections=subs)
        reader.require(values, where, "path", 'the directory to watch, e.g. path = "/data/runs"')
        if not values["path"].is_absolute():
            base = Path(source).parent if not source.startswith("<") else Path.cwd()
            values["path"] = (base / values["path"]).resolve()
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
            evaluate = EvaluateConfig(**ev)
        if "freeze" in raw:
            fr = reader.section(raw["freeze"], f"{where}.freeze", FREEZE_KEYS)
            reader.require(fr, f"{where}.freeze", "export_dir", "where exports are published")
            if "frozen_graph" in fr.get("format", ()) and not fr.get("outputs"):
                reader.require({}, f"{where}.freeze", "outputs", "frozen_graph needs output nodes")
            freeze = FreezeConfig(**fr)
        if "retain" in raw:
            retain = RetainConfig(**reader.section(raw["retain"], f"{where}.retain", RETAIN_KEYS))
        needs_metric = freeze is not None or (retain is not None and retain.keep_best)
        if needs_metric and not best.metric:
            raise ConfigError(
                source,
                f"{where}.best.metric",
                "required when freeze or keep_best is set: the metric that ranks checkpoints, "
                'e.g. metric = "eval/accuracy"',
            )
        watches.append(
            WatchConfig(best=best, evaluate=evaluate, freeze=freeze, retain=retain, **values)
        )
    seen: dict[Path, int] = {}
    for i, w in enumerate(watches):
        if w.path in seen:
            raise ConfigError(
                source, f"watch[{i}].path", f"{w.path} is already watched by watch[{seen[w.path]}]"
            )
        seen[w.path] = i
    return Config(source=source, daemon=daemon, watches=tuple(watches))


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where the config lives and whether the user asked for it explicitly."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get("CKPTD_CONFIG"):
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(explicit: str | os.PathLike[str] | None = None, *, required: bool = True) -> Config:
    """Read and validate the config; a missing default file is allowed when not ``required``."""
    path, asked = config_path(explicit)
    if not path.exists():
        if asked or required:
            raise ConfigError(
                str(path),
                "",
                "no such file; pass --config FILE or set CKPTD_CONFIG "
                "(an annotated example is deploy/ckptd.toml)",
            )
        return parse_config({}, source="<defaults>")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    return parse_config(data, source=str(path))


def missing_paths(config: Config) -> list[str]:
    """Watch paths that do not exist yet: a warning, not an error (they are picked up later)."""
    return [
        f"{config.source}: watch[{i}].path: {w.path} does not exist yet; it will be watched "
        "when it appears"
        for i, w in enumerate(config.watches)
        if not w.path.exists()
    ]


def warn_missing_paths(config: Config) -> list[str]:
    warnings = missing_paths(config)
    for msg in warnings:
        log.warning(msg)
    return warnings
