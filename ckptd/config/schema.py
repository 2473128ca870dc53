"""What a config holds: its frozen dataclasses, the keys each table takes, and its errors."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from ckptd.config import locations
from ckptd.config import values as v
from ckptd.core import retention
from ckptd.core.model import INT64_MAX

EVALUATORS = ("tfevents", "meta_graph", "keras", "python", "command")
EXPORT_FORMATS = v.EXPORT_FORMATS
OBSERVERS = ("auto", "inotify", "polling")
DEFAULT_POLL_INTERVAL = timedelta(seconds=10)  # of an object store watch: one LIST per run
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
    export_dir: Path | str  # a local directory, or an object store URL (s3://, gs://)
    format: tuple[str, ...] = ("saved_model",)
    every: timedelta = timedelta(hours=1)
    cron: str | None = None
    keep: int = 3
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    builder: str | None = None
    timeout: timedelta = timedelta(minutes=30)
    tolerance: float = 1e-5
    max_attempts: int = 3  # of one checkpoint's export, as [watch.evaluate]'s
    retry_backoff: timedelta = timedelta(seconds=30)


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
    # A local directory (a Path), or an object store URL ("s3://bucket/runs", a str).
    path: Path | str
    runs: str | None = None
    observer: str = "auto"
    keras_template: str | None = None
    step_variable: str | None = None
    # The architecture of weights-only Keras checkpoints: a .keras file or "module:function"
    keras_model: str | None = None
    best: BestConfig = field(default_factory=BestConfig)
    evaluate: EvaluateConfig | None = None
    freeze: FreezeConfig | None = None
    retain: RetainConfig | None = None
    # Object store watches only: their server (else the library's default: AWS_ENDPOINT_URL,
    # STORAGE_EMULATOR_HOST or the cloud's) and how often each run is listed (no inotify there).
    endpoint_url: str | None = None
    poll_interval: timedelta = DEFAULT_POLL_INTERVAL

    @property
    def is_object_store(self) -> bool:
        return isinstance(self.path, str)

    @property
    def local_path(self) -> Path:
        """The directory of a local watch (an object store watch has none: a ValueError)."""
        if isinstance(self.path, str):
            raise ValueError(f"{self.path} is an object store URL, not a local directory")
        return self.path


@dataclass(frozen=True)
class DaemonConfig:
    database: str
    rescan_interval: timedelta = timedelta(seconds=60)
    heartbeat_interval: timedelta = timedelta(seconds=10)
    log_level: str = "info"
    metrics_address: str = ""
    debounce: timedelta = timedelta(milliseconds=2)
    # Daemons sharing one database are told apart by name; each run is acted on by one of them.
    name: str = field(default_factory=socket.gethostname)
    lease_ttl: timedelta = timedelta(seconds=30)
    # "workers": evaluations and exports are left to `ckptd worker` processes (no TF here).
    evaluate_on: str = "local"


WORKER_KINDS = ("evaluate", "export")


@dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: what a ``ckptd worker`` process serves (the daemon ignores it)."""

    name: str = field(default_factory=socket.gethostname)
    watches: tuple[Path | str, ...] | None = None  # watch paths it serves; None: every watch
    kinds: tuple[str, ...] = WORKER_KINDS
    concurrency: int = 1  # warm TensorFlow workers, each working one job at a time
    claim_ttl: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class Config:
    source: str
    daemon: DaemonConfig
    watches: tuple[WatchConfig, ...] = ()
    worker: WorkerConfig = field(default_factory=WorkerConfig)


# ---------------------------------------------------------------- keys of each table

KERAS_FEED = ("x", "y", "sample_weight")  # what the keras evaluator passes to model.evaluate


def is_function(text: str) -> bool:
    """Whether ``text`` names a user function (``module:function``) rather than a file."""
    try:
        v.entry_point(text)
    except ValueError:
        return False
    return True


def keras_model(value: object) -> str:
    """A ``.keras`` file, or ``module:function`` returning a keras.Model."""
    text = v.string(value)
    if is_function(text):
        return text
    if not text.endswith(".keras"):
        raise ValueError(
            'expected a .keras file with the architecture or "module:function" returning a '
            f"keras.Model, got {v.show(value)}"
        )
    return str(v.path(text))


Schema = dict[str, Callable[[object], Any]]

# Durations and numbers have ranges: a 10-year debounce or a 0 s rescan is a typo, and the
# scheduler and SQLite (int64) have limits of their own. deploy/ckptd.toml lists them.
DAEMON_KEYS: Schema = {
    "database": v.database,
    "rescan_interval": v.duration("1s", "1d"),
    "heartbeat_interval": v.duration("1s", "1h"),
    "log_level": v.choice(*LOG_LEVELS),
    "metrics_address": v.address,
    "debounce": v.duration("0s", "10s"),
    "name": v.daemon_name,
    "lease_ttl": v.duration("3s", "1h"),
    "evaluate_on": v.choice("local", "workers"),
}
WORKER_KEYS: Schema = {
    "name": v.daemon_name,
    "watches": v.path_list,
    "kinds": v.subset(*WORKER_KINDS),
    "concurrency": v.whole(1, 64),
    "claim_ttl": v.duration("3s", "1d"),
}
WATCH_KEYS: Schema = {
    "path": locations.path_or_url,
    "runs": v.runs_glob,
    "observer": v.choice(*OBSERVERS),
    "keras_template": v.keras_template,
    "step_variable": v.step_variable,
    "keras_model": keras_model,
    "endpoint_url": locations.endpoint_url,
    "poll_interval": v.duration("1s", "1d"),
}
BEST_KEYS: Schema = {"metric": v.string, "mode": v.choice("min", "max")}
EVALUATE_KEYS: Schema = {
    "evaluator": v.choice(*EVALUATORS),
    "every": v.duration("1s", "30d"),
    "timeout": v.duration("1s", "7d"),
    "on_new": v.boolean,
    "order": v.choice("oldest", "newest"),
    "max_attempts": v.whole(1, 100),
    "retry_backoff": v.duration("0s", "1d"),
    "data": v.path,
    "feed": v.str_map,
    "fetch": v.str_map,
    "use_ema": v.boolean,
    "function": v.entry_point,
    "command": v.argv,
    "batch_size": v.whole(1, 2**31 - 1),
}
FREEZE_KEYS: Schema = {
    "export_dir": locations.path_or_url,
    "format": v.export_formats,
    "every": v.duration("1s", "30d"),
    "cron": v.crontab,
    "keep": v.whole(1, 1000),
    "inputs": v.str_map,
    "outputs": v.str_map,
    "builder": v.entry_point,
    "timeout": v.duration("1s", "7d"),
    "tolerance": v.tolerance,
    "max_attempts": v.whole(1, 100),
    "retry_backoff": v.duration("0s", "1d"),
}
RETAIN_KEYS: Schema = {
    "keep_last": v.whole(0, 1_000_000),
    "keep_best": v.whole(0, 1_000_000),
    "keep_every": v.duration("1s", "365d"),
    "keep_every_steps": v.whole(1, INT64_MAX),
    "min_age": v.duration("0s", "365d"),
    "every": v.duration("1s", "30d"),
    "dry_run": v.boolean,
}
