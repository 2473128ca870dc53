"""Reading the TOML configuration: parsed once, validated completely, frozen.

Every error names the file, the key and what was expected, so a typo is fixed in one try:
``/etc/ckptd/ckptd.toml: watch[0].best.mode: expected "min" or "max", got "maximum"``.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.config import locations
from ckptd.config.schema import (
    BEST_KEYS,
    DAEMON_KEYS,
    EVALUATE_KEYS,
    FREEZE_KEYS,
    KERAS_FEED,
    RETAIN_KEYS,
    WATCH_KEYS,
    WORKER_KEYS,
    BestConfig,
    Config,
    ConfigError,
    DaemonConfig,
    EvaluateConfig,
    FreezeConfig,
    Problem,
    RetainConfig,
    Schema,
    WatchConfig,
    WorkerConfig,
    is_function,
)
from ckptd.config.values import show
from ckptd.store import urls

log = logging.getLogger("ckptd.config")  # the name the journal has always shown

DEFAULT_CONFIG_PATH = Path("/etc/ckptd/ckptd.toml")


def _key(name: str) -> str:
    """A TOML key as the user would write it (quoted when it is not a bare key)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else show(name)


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
            self.fail(where, f"expected a table, got {show(raw)}")
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
    reader.section(dict(data), "", {}, subsections=("daemon", "watch", "worker"))
    daemon_raw = reader.section(data.get("daemon", {}), "daemon", DAEMON_KEYS)
    daemon_raw.setdefault("database", default_database_url())
    daemon_raw["database"] = urls.absolute(daemon_raw["database"], _base(source))
    daemon = DaemonConfig(**daemon_raw)

    watch_list = data.get("watch", [])
    if isinstance(watch_list, dict):
        watch_list = [watch_list]
    if not isinstance(watch_list, list):
        reader.fail("watch", f"expected [[watch]] tables, got {show(watch_list)}")
        watch_list = []
    watches: list[tuple[int, WatchConfig]] = []
    for i, raw in enumerate(watch_list):
        where = f"watch[{i}]"
        if not isinstance(raw, dict):
            reader.fail(where, f"expected a [[watch]] table, got {show(raw)}")
            continue
        watch = _watch(reader, raw, where)
        if watch is not None:
            watches.append((i, watch))
    # Each watch against the watches above it (O(watches x depth), not every pair).
    first: dict[Path | str, int] = {}
    for j, w in watches:
        if w.path in first:
            reader.fail(
                f"watch[{j}].path", f"{w.path} is already watched by watch[{first[w.path]}]"
            )
        else:
            first[w.path] = j
    by_index = dict(watches)
    for j, inner in watches:
        for parent in locations.parents(inner.path):
            outer = first.get(parent)
            if outer is not None and (problem := _overlap(outer, by_index[outer], j, inner)):
                reader.fail(f"watch[{max(outer, j)}].path", problem)
                break
    worker = _worker(reader, data.get("worker", {}), [w for _, w in watches])
    reader.done()
    return Config(source=source, daemon=daemon, watches=tuple(w for _, w in watches), worker=worker)


def _worker(reader: _Reader, raw: object, watches: list[WatchConfig]) -> WorkerConfig:
    """``[worker]``; each of its watches must be the path of a [[watch]] (relative ones are
    relative to the config file, as a watch's own path)."""
    values = reader.section(raw, "worker", WORKER_KEYS)
    if "watches" in values:
        base, known = _base(reader.source), {w.path for w in watches}
        # Resolved as a relative [[watch]] path is, so both name the same directory.
        served = tuple(
            p if isinstance(p, str) or p.is_absolute() else (base / p).resolve()
            for p in values["watches"]
        )
        for p in served:
            if p not in known:
                listed = ", ".join(str(w.path) for w in watches) or "none"
                reader.fail(
                    "worker.watches",
                    f"{p} is not the path of a [[watch]] in this file (watch paths: {listed}); "
                    "a worker serves watches this config defines",
                )
        values["watches"] = served
    return WorkerConfig(**values)


def _base(source: str) -> Path:
    """What relative paths are relative to: the config file's directory. The daemon (cwd / under
    systemd) and the CLI (any cwd) must mean the same files."""
    return Path(os.path.abspath(Path(source).parent if not source.startswith("<") else "."))


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
    if path_ok and isinstance(values["path"], str):
        locations.check_object_watch(reader.fail, values, where)
    elif path_ok:
        for key in ("endpoint_url", "poll_interval"):
            if key in values:
                reader.fail(
                    f"{where}.{key}",
                    'applies to object store watches (path = "s3://…" or "gs://…") only; '
                    "a local watch is notified by inotify and rescanned every "
                    "daemon.rescan_interval",
                )
    if path_ok and isinstance(values["path"], Path) and not values["path"].is_absolute():
        try:
            values["path"] = (base / values["path"]).resolve()
        except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
            reader.fail(f"{where}.path", f"cannot be resolved: {exc}")
    model = values.get("keras_model")
    if model is not None and not is_function(model):
        values["keras_model"] = os.path.normpath(base / model)
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
            if isinstance(fr["export_dir"], Path):
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
    _keras_combinations(reader, where, model, evaluate, freeze)
    if len(reader.problems) > before:
        return None
    return WatchConfig(best=best, evaluate=evaluate, freeze=freeze, retain=retain, **values)


def _keras_combinations(
    reader: _Reader,
    where: str,
    model: str | None,
    evaluate: EvaluateConfig | None,
    freeze: FreezeConfig | None,
) -> None:
    """Settings that cannot work on Keras checkpoints (a watch with ``keras_model`` or the
    keras evaluator), refused now rather than failing at every evaluation or export."""
    keras_eval = evaluate is not None and evaluate.evaluator == "keras"
    if evaluate is not None and keras_eval:
        feed = dict(evaluate.feed)
        unknown = sorted(set(feed) - set(KERAS_FEED))
        if unknown or (feed and "x" not in feed):
            reader.fail(
                f"{where}.evaluate.feed",
                "the keras evaluator maps x (required), y and sample_weight of model.evaluate "
                f'to arrays of the .npz, e.g. {{ x = "images", y = "labels" }}; got '
                f"{', '.join(unknown) or 'no x'}",
            )
        if evaluate.use_ema:
            reader.fail(
                f"{where}.evaluate.use_ema",
                "applies to TF1 meta graphs (the meta_graph evaluator), not to Keras models",
            )
    if (keras_eval or model) and freeze is not None and "frozen_graph" in freeze.format:
        reader.fail(
            f"{where}.freeze.format",
            'frozen_graph needs a TF1 meta graph; Keras checkpoints export as "saved_model"',
        )


def _overlap(i: int, outer: WatchConfig, j: int, inner: WatchConfig) -> str | None:
    """Why watch[j], whose path is below watch[i]'s, may not be watched beside it, or None.

    Two watches must never own the same run: which one's retention and best settings applied
    would depend on event order. So a watch path may not lie inside another watch's runs; one
    merely inside the other's directory, in a branch its ``runs`` glob cannot match, is fine.
    """
    rel = locations.relative_parts(inner.path, outer.path)
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
        if isinstance(w.path, str):
            continue  # an object store prefix exists once an object is under it
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
