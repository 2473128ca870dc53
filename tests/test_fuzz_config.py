"""Fuzzing the TOML config (issue 10, item 6): only ConfigError escapes ``load_config``, and
``ckptd config check`` exits 0 or 78 with one line per problem, never a traceback.

Three kinds of input: structured configs (every known key, with values of the right shape or
of any other TOML type), mutations of the shipped example config, and raw bytes. A config that
validates is also handed to what the daemon builds from it (cron trigger, Keras name parser,
run globs, database URL), so "config check says OK" means the daemon can use it.

The default run is time-boxed for CI (well under 30 s); CKPTD_FUZZ_EXAMPLES=5000 runs longer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd import config as cfg
from ckptd.config import ConfigError, load_config
from tests.conftest import ENV, PY, REPO

EXAMPLES = int(os.environ.get("CKPTD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
EXAMPLE = (REPO / "deploy" / "ckptd.toml").read_text()

# ---------------------------------------------------------------- TOML values and documents

_text = st.text(st.characters(codec="utf-8"), max_size=20)
_scalars = st.one_of(
    _text,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(),  # beyond int64: TOML refuses them, the dict path gets them
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
# Values of the right shape, so the fuzzer gets past the type checks into the range checks.
_durations = st.builds(
    lambda n, unit: f"{n}{unit}",
    st.one_of(st.integers(0, 10**12), st.floats(0, 1e12, allow_nan=False).map(lambda f: f"{f:f}")),
    st.sampled_from(["", "ms", "s", "m", "h", "d", "w", " s", "x"]),
)
_cron_field = st.one_of(
    st.just("*"),
    st.integers(0, 70).map(str),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 40), st.integers(0, 40)),
    st.builds(lambda a: f"*/{a}", st.integers(0, 61)),
    st.sampled_from(["mon", "jan", "L", "last", "?", "1,2", ""]),
)
_cron = st.lists(_cron_field, min_size=4, max_size=6).map(" ".join)
_template_piece = st.sampled_from(
    ["model", ".", "-", "{epoch}", "{epoch:02d}", "{val_loss:.2f}", "{0}", "{}", "{loss:%}",
     "{epoch:zz}", "{{", "}}", "{a.b}", "{x[0]}", "{é}", "/", ".keras", ".weights.h5", ".h5"]
)  # fmt: skip
_template = st.lists(_template_piece, max_size=6).map("".join)
_address = st.builds(
    lambda h, p: f"{h}:{p}",
    st.sampled_from(["127.0.0.1", "localhost", "[::1]", "", "a b", "::1", "h..x"]),
    st.one_of(st.integers(-5, 70000).map(str), _text),
)
_url = st.one_of(
    st.sampled_from(
        ["sqlite:////tmp/x.db", "sqlite://", "sqlite:///:memory:", "nonsense", "x://", "a+b://h/d",
         "postgresql://u:p@h:notaport/db", "sqlite:///rel.db", "mysql+pymysql://u@h:3306/d"]
    ),
    _text,
)  # fmt: skip
_glob = st.one_of(
    st.sampled_from(["*", "team-*/*", ".", "..", "/abs", "", "a/../b", "./*", "*/", "**"]), _text
)

SHAPES: dict[str, st.SearchStrategy[Any]] = {
    "database": _url,
    "metrics_address": _address,
    "cron": _cron,
    "keras_template": _template,
    "runs": _glob,
    "path": st.sampled_from(["/data/runs", "/data/runs/a", "rel", "/data/../data/runs", "~", ""]),
    "export_dir": st.sampled_from(["/srv/x", "rel", ""]),
    "data": st.sampled_from(["/d.npz", "d.npz"]),
    "command": st.lists(st.sampled_from(["eval", "{checkpoint}", "{step}", "{bad}", "{", "}}"])),
}


def _shaped(key: str, convert: Any) -> st.SearchStrategy[Any]:
    if key in SHAPES:
        return st.one_of(SHAPES[key], _values)
    if getattr(convert, "__qualname__", "").startswith(("duration", "parse_duration")):
        return st.one_of(_durations, _values)
    return _values


def _section(schema: cfg.Schema) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {}, optional={k: _shaped(k, v) for k, v in schema.items()} | {"bogus": _values}
    )


_watch = st.builds(
    lambda w, subs: {**w, **subs},
    _section(cfg.WATCH_KEYS),
    st.fixed_dictionaries(
        {},
        optional={
            "best": _section(cfg.BEST_KEYS),
            "evaluate": _section(cfg.EVALUATE_KEYS),
            "freeze": _section(cfg.FREEZE_KEYS),
            "retain": _section(cfg.RETAIN_KEYS),
        },
    ),
)
_documents = st.fixed_dictionaries(
    {},
    optional={"daemon": _section(cfg.DAEMON_KEYS), "watch": st.lists(_watch, max_size=3)},
)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string (bar lone surrogates)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    lines = []
    for k, v in doc.get("daemon", {}).items():
        lines.append(f"daemon.{json.dumps(k)} = {toml_value(v)}")
    for w in doc.get("watch", []):
        lines.append("[[watch]]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in w.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- properties


def check_load(path: Path) -> cfg.Config | None:
    """The property: a Config, or a ConfigError that is one line per problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert exc.problems and "\n" not in str(exc)
        for problem in exc.problems:
            assert "\n" not in str(problem) and str(problem).startswith(str(path))
        return None
    daemon_can_use(config)
    return config


def daemon_can_use(config: cfg.Config) -> None:
    """What the daemon builds from a valid config must build (no crash after `config check`)."""
    from apscheduler.triggers.cron import CronTrigger
    from sqlalchemy.engine import make_url

    from ckptd.daemon.runs import run_of
    from ckptd.io.kerasname import KerasTemplate

    make_url(config.daemon.database)
    for i, w in enumerate(config.watches):
        run_of(i, w, str(w.path / "a" / "b" / "c"))
        if w.keras_template:
            KerasTemplate(w.keras_template).parse("model.03-0.25.keras")
        if w.freeze and w.freeze.cron:
            trigger = CronTrigger.from_crontab(w.freeze.cron, timezone="UTC")
            assert trigger.get_next_fire_time(None, datetime.now(UTC)) is not None
        if w.evaluate:
            for arg in w.evaluate.command:
                arg.format(checkpoint="c", step="1", run="r")


@FUZZ
@given(doc=_documents)
@pytest.mark.slow
def test_structured_configs(tmp_path_factory: Any, doc: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("s") / "c.toml"
    path.write_text(toml_document(doc), encoding="utf-8", errors="surrogatepass")
    check_load(path)
    try:  # and straight from a dict (values TOML cannot express, such as ints beyond int64)
        config = cfg.parse_config(doc, source="d.toml")
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        daemon_can_use(config)


_mutation = st.tuples(
    st.sampled_from(["delete", "insert", "replace", "duplicate_line", "drop_line"]),
    st.integers(0, len(EXAMPLE)),
    st.integers(0, 40),
    _text,
)


def mutate(text: str, mutations: list[tuple[str, int, int, str]]) -> str:
    for kind, at, n, new in mutations:
        at = min(at, len(text))
        if kind == "delete":
            text = text[:at] + text[at + n :]
        elif kind == "insert":
            text = text[:at] + new + text[at:]
        elif kind == "replace":
            text = text[:at] + new + text[at + len(new) :]
        else:
            lines = text.splitlines()
            i = text[:at].count("\n") % max(len(lines), 1)
            lines[i:i] = [lines[i]] if kind == "duplicate_line" and lines else []
            if kind == "drop_line" and lines:
                del lines[i]
            text = "\n".join(lines)
    return text


@FUZZ
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_example_config(tmp_path_factory: Any, mutations: list[Any]) -> None:
    path = tmp_path_factory.mktemp("m") / "c.toml"
    path.write_text(mutate(EXAMPLE, mutations), encoding="utf-8", errors="surrogatepass")
    check_load(path)


@FUZZ
@given(data=st.binary(max_size=200) | st.builds(lambda b: EXAMPLE.encode()[:300] + b, st.binary()))
def test_raw_bytes(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("b") / "c.toml"
    path.write_bytes(data)
    check_load(path)


@settings(FUZZ, max_examples=max(EXAMPLES // 15, 8))
@given(
    text=st.one_of(
        _documents.map(toml_document),
        st.lists(_mutation, min_size=1, max_size=3).map(lambda m: mutate(EXAMPLE, m)),
    )
)
@pytest.mark.slow
def test_config_check_exits_0_or_78_with_one_line_per_problem(
    tmp_path_factory: Any, text: str
) -> None:
    path = tmp_path_factory.mktemp("c") / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = subprocess.run(
        [PY, "-m", "ckptd", "--config", str(path), "config", "check"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert result.returncode in (0, 78), result.stderr
    assert "Traceback" not in result.stderr
    for line in result.stderr.splitlines():
        assert line.startswith(("ckptd: config error: ", "warning: ")), result.stderr
    if result.returncode == 78:
        assert result.stderr.startswith("ckptd: config error: ")
