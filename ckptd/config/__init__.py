"""The TOML configuration: parsed once, validated completely, frozen.

``values`` converts raw values, ``schema`` holds the frozen dataclasses and the keys of each
table, ``load`` reads the file and walks it. Import from here: ``from ckptd.config import X``.
"""

from ckptd.config.load import (
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_BYTES,
    config_path,
    default_database_url,
    load_config,
    missing_paths,
    parse_config,
    warn_missing_paths,
)
from ckptd.config.schema import (
    BEST_KEYS,
    DAEMON_KEYS,
    EVALUATE_KEYS,
    EVALUATORS,
    EXPORT_FORMATS,
    FREEZE_KEYS,
    LOG_LEVELS,
    OBSERVERS,
    RETAIN_KEYS,
    WATCH_KEYS,
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
)
from ckptd.config.values import parse_duration

__all__ = [
    "BEST_KEYS",
    "DAEMON_KEYS",
    "DEFAULT_CONFIG_PATH",
    "EVALUATE_KEYS",
    "EVALUATORS",
    "EXPORT_FORMATS",
    "FREEZE_KEYS",
    "LOG_LEVELS",
    "MAX_CONFIG_BYTES",
    "OBSERVERS",
    "RETAIN_KEYS",
    "WATCH_KEYS",
    "BestConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "EvaluateConfig",
    "FreezeConfig",
    "Problem",
    "RetainConfig",
    "Schema",
    "WatchConfig",
    "config_path",
    "default_database_url",
    "load_config",
    "missing_paths",
    "parse_config",
    "parse_duration",
    "warn_missing_paths",
]
