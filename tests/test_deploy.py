"""Checks for the deployment files in deploy/ (systemd unit, sysusers/tmpfiles
snippets and the example configuration).

The systemd checks run the real tools when they are installed and skip
otherwise; none of them needs a running systemd (PID 1) or root, except the
optional tmpfiles "create into a scratch root" check, which needs root for
chown and falls back to the format check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from ckptd.config import (
    BEST_KEYS,
    DAEMON_KEYS,
    EVALUATE_KEYS,
    FREEZE_KEYS,
    RETAIN_KEYS,
    WATCH_KEYS,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "ckptd.service"
CONFIG = DEPLOY / "ckptd.toml"
SYSUSERS = DEPLOY / "sysusers.d" / "ckptd.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "ckptd.conf"

MAX_EXPOSURE = 2.5

# No colours, pager or terminal-width dependent output from systemd tools.
_ENV = {
    **os.environ,
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_LOG_COLOR": "0",
    "COLUMNS": "300",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=_ENV, timeout=120, **kwargs
    )


def _unit_copy(tmp_path: Path) -> Path:
    """Copy the unit into an otherwise empty directory, so verify/security only
    see this unit (plus system units it references) and never a stale,
    installed /etc/systemd/system/ckptd.service."""
    dest = tmp_path / "ckptd.service"
    shutil.copyfile(UNIT, dest)
    return dest


def _unit_directives(path: Path = UNIT) -> dict[str, list[str]]:
    """Very small unit-file parser: {"Section.Key": [values...]}."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"malformed unit line: {raw!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


# --------------------------------------------------------------- systemd unit


def test_unit_has_required_directives() -> None:
    d = _unit_directives()
    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.WatchdogSec": "60",
        "Service.Restart": "on-failure",
        "Service.RestartSec": "5",
        "Service.KillMode": "mixed",
        "Service.TimeoutStopSec": "90",
        "Service.User": "ckptd",
        "Service.Group": "ckptd",
        "Service.StateDirectory": "ckptd",
        "Service.ConfigurationDirectory": "ckptd",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.NoNewPrivileges": "yes",
        "Service.PrivateTmp": "yes",
        "Service.PrivateDevices": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.AmbientCapabilities": "",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Service.SystemCallArchitectures": "native",
        "Service.UMask": "0027",
        "Service.IPAddressDeny": "any",
        "Service.IPAddressAllow": "localhost",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID",
        "Install.WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert key in d, f"{key} missing from {UNIT.name}"
        assert d[key][-1] == value, f"{key}={d[key][-1]!r}, expected {value!r}"

    assert "@system-service" in d["Service.SystemCallFilter"]
    (start,) = d["Service.ExecStart"]
    (pre,) = d["Service.ExecStartPre"]
    assert re.search(r"\bckptd run --config \S+/ckptd\.toml$", start), start
    assert re.search(r"\bckptd db upgrade --config \S+/ckptd\.toml$", pre), pre
    rw = d["Service.ReadWritePaths"][-1].split()
    assert {p.lstrip("-") for p in rw} >= {"/data/runs", "/srv/models"}


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = _unit_copy(tmp_path)
    proc = _run(analyze, "verify", str(unit))
    output = proc.stdout + proc.stderr
    # verify also loads referenced system units; on some hosts those produce
    # their own warnings. Only messages about our unit count.
    ours = [line for line in output.splitlines() if "ckptd" in line]
    assert proc.returncode == 0, output
    assert not ours, "systemd-analyze verify warnings:\n" + "\n".join(ours)


def test_verify_catches_missing_executable(tmp_path: Path) -> None:
    """Guard against the verify test silently passing on a broken unit: a
    non-existent ExecStart binary must be reported on this systemd."""
    analyze = _tool("systemd-analyze")
    bad = tmp_path / "ckptd.service"
    bad.write_text(
        UNIT.read_text().replace("ExecStart=/usr/bin/env ckptd", "ExecStart=/nonexistent/ckptd")
    )
    proc = _run(analyze, "verify", str(bad))
    assert proc.returncode != 0 or "ckptd" in proc.stdout + proc.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    if "--offline" not in _run(analyze, "--help").stdout:
        version = _run(analyze, "--version").stdout.splitlines()[:1]
        pytest.skip(f"systemd-analyze has no --offline (needs systemd >= 250): {version}")
    unit = _unit_copy(tmp_path)
    proc = _run(analyze, "security", "--no-pager", "--offline=true", str(unit))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"Overall exposure level for ckptd\.service:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no exposure line in output:\n{output}"
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, output


# --------------------------------------------------------------- example config

# The contract is ckptd's own schema (one source of truth), not a copy of it.
_CONTRACT = {
    "daemon": set(DAEMON_KEYS),
    "watch": set(WATCH_KEYS),
    "watch.best": set(BEST_KEYS),
    "watch.evaluate": set(EVALUATE_KEYS),
    "watch.freeze": set(FREEZE_KEYS),
    "watch.retain": set(RETAIN_KEYS),
}
_DURATION = re.compile(r"^\d+(?:\.\d+)?(?:ms|s|m|h|d)$")


def test_example_config_parses() -> None:
    with CONFIG.open("rb") as f:
        cfg = tomllib.load(f)

    daemon = cfg["daemon"]
    assert set(daemon) <= _CONTRACT["daemon"]
    assert daemon["log_level"] in {"debug", "info", "warning", "error"}
    for key in ("rescan_interval", "heartbeat_interval"):
        assert _DURATION.match(daemon[key]), (key, daemon[key])

    assert isinstance(cfg["watch"], list) and cfg["watch"]
    for watch in cfg["watch"]:
        subtables = {"best", "evaluate", "freeze", "retain"}
        assert set(watch) - subtables <= _CONTRACT["watch"]
        assert watch["observer"] in {"auto", "inotify", "polling"}
        assert watch["best"]["mode"] in {"max", "min"}
        for name in subtables & set(watch):
            unknown = set(watch[name]) - _CONTRACT[f"watch.{name}"]
            assert not unknown, f"[watch.{name}] unknown keys {unknown}"
        ev = watch.get("evaluate")
        if ev:
            assert ev["evaluator"] in {"tfevents", "meta_graph", "keras", "python", "command"}
            assert ev["order"] in {"oldest", "newest"}
            for key in ("every", "timeout"):
                assert _DURATION.match(ev[key]), (key, ev[key])
        if "freeze" in watch:
            assert watch["freeze"]["format"] in {"saved_model", "frozen_graph"}


def test_example_config_documents_every_key() -> None:
    """Every contract key appears in the example, set or commented out."""
    text = CONFIG.read_text()
    for table, keys in _CONTRACT.items():
        for key in keys:
            assert re.search(rf"^\s*#?\s*{key}\s*=", text, re.M), f"{table}.{key} not shown"


def test_commented_alternatives_are_valid_toml() -> None:
    """The commented-out evaluator keys must be valid TOML once uncommented."""
    lines = [
        line.lstrip("#").strip()
        for line in CONFIG.read_text().splitlines()
        if re.match(r"^#(function|command)\s*=", line)
    ]
    assert len(lines) == 2, lines
    parsed = tomllib.loads("\n".join(lines))
    assert isinstance(parsed["command"], list)
    assert ":" in parsed["function"]


# --------------------------------------------------------------- sysusers / tmpfiles


def _entries(path: Path) -> list[list[str]]:
    import shlex

    return [
        shlex.split(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_sysusers_format() -> None:
    entries = _entries(SYSUSERS)
    users = [e for e in entries if e[0] == "u"]
    assert users == [
        ["u", "ckptd", "-", "ckptd checkpoint lifecycle daemon", "/var/lib/ckptd", "-"]
    ]
    for e in entries:
        assert e[0] in {"u", "g", "m", "r"}, e


def test_sysusers_dry_run(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    proc = _run(sysusers, f"--root={tmp_path}", "--dry-run", str(SYSUSERS))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Creating user 'ckptd'" in output, output


def test_tmpfiles_format() -> None:
    entries = _entries(TMPFILES)
    assert ["d", "/var/lib/ckptd", "0750", "ckptd", "ckptd", "-", "-"] in entries
    for e in entries:
        assert len(e) >= 2 and e[1].startswith("/"), e
        if len(e) > 2 and e[2] != "-":
            assert re.fullmatch(r"[~:]?[0-7]{3,4}", e[2]), e


def test_tmpfiles_create_in_scratch_root(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("creating owned directories needs root (chown); format checked above")
    (tmp_path / "etc").mkdir()
    proc = _run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert proc.returncode == 0, proc.stderr
    proc = _run(tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = tmp_path / "var/lib/ckptd"
    assert state.is_dir()
    assert state.stat().st_mode & 0o7777 == 0o750
    passwd = (tmp_path / "etc/passwd").read_text()
    uid = next(int(ln.split(":")[2]) for ln in passwd.splitlines() if ln.startswith("ckptd:"))
    assert state.stat().st_uid == uid
