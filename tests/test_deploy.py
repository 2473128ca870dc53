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
import textwrap
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
    WORKER_KEYS,
)
from tests.conftest import ENV, PY, Corpus, query, write_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "ckptd.service"
NETWORK_DROP_IN = DEPLOY / "ckptd.service.d" / "network.conf"
CONFIG = DEPLOY / "ckptd.toml"
SYSUSERS = DEPLOY / "sysusers.d" / "ckptd.conf"
TMPFILES = DEPLOY / "tmpfiles.d" / "ckptd.conf"

MAX_EXPOSURE = 1.5

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


def _run(
    *args: str, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=env or _ENV, timeout=120, **kwargs
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
        "Service.RestrictAddressFamilies": "AF_UNIX",
        "Service.PrivateNetwork": "yes",
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
    # Nothing in a watched root or an export directory is ever executed.
    assert set(d["Service.NoExecPaths"][-1].split()) == set(rw)


_UNITS = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
_SIZES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)\s*([a-z]*)", value).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS[unit]


def _bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * _SIZES.get(unit, 1)


def test_unit_limits_resources_and_lets_start_limit_trip() -> None:
    d = _unit_directives()
    # The OOM killer takes ckptd (and its workers) before a trainer (score 0).
    assert int(d["Service.OOMScoreAdjust"][-1]) > 0
    assert 0 < _bytes(d["Service.MemoryHigh"][-1]) < _bytes(d["Service.MemoryMax"][-1])
    assert int(d["Service.TasksMax"][-1]) >= 256  # TF workers' thread pools fit
    # A start-up that always hangs fails StartLimitBurst times within the interval, so
    # systemd gives up instead of retrying forever.
    burst = int(d["Unit.StartLimitBurst"][-1])
    per_start = _seconds(d["Service.TimeoutStartSec"][-1]) + _seconds(d["Service.RestartSec"][-1])
    assert burst * per_start < _seconds(d["Unit.StartLimitIntervalSec"][-1])


def _with_drop_in(tmp_path: Path) -> Path:
    """The unit and deploy's network.conf drop-in, as installed in a unit directory."""
    unit = _unit_copy(tmp_path)
    (tmp_path / "ckptd.service.d").mkdir()
    shutil.copyfile(NETWORK_DROP_IN, tmp_path / "ckptd.service.d" / NETWORK_DROP_IN.name)
    return unit


def _exposure(analyze: str, unit: Path, **env: str) -> float:
    proc = _run(analyze, "security", "--no-pager", "--offline=true", str(unit), env={**_ENV, **env})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    match = re.search(r"Overall exposure level for ckptd\.service:\s*([0-9]+(?:\.[0-9]+)?)", output)
    assert match, f"no exposure line in output:\n{output}"
    return float(match.group(1))


def test_network_drop_in_opens_only_ip_families_and_verifies(tmp_path: Path) -> None:
    d = _unit_directives(NETWORK_DROP_IN)
    assert d["Service.PrivateNetwork"] == ["no"]
    assert d["Service.RestrictAddressFamilies"] == ["", "AF_UNIX AF_INET AF_INET6"]
    assert set(d) == {"Service.PrivateNetwork", "Service.RestrictAddressFamilies"}
    analyze = _tool("systemd-analyze")
    unit = _with_drop_in(tmp_path)
    # The unit path makes verify and security load the drop-in next to the unit.
    env = {"SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    proc = _run(analyze, "verify", str(unit), env={**_ENV, **env})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not [line for line in output.splitlines() if "ckptd" in line], output
    if "--offline" not in _run(analyze, "--help").stdout:
        pytest.skip("systemd-analyze has no --offline (needs systemd >= 250)")
    opened = _exposure(analyze, unit, **env)
    plain = tmp_path / "plain"
    plain.mkdir()
    closed = _exposure(analyze, _unit_copy(plain))
    assert closed < opened <= MAX_EXPOSURE  # loaded, and still within the bound


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
    exposure = _exposure(analyze, _unit_copy(tmp_path))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE


# --------------------------------------------------------------- example config

# The contract is ckptd's own schema (one source of truth), not a copy of it.
_CONTRACT = {
    "daemon": set(DAEMON_KEYS),
    "watch": set(WATCH_KEYS),
    "watch.best": set(BEST_KEYS),
    "watch.evaluate": set(EVALUATE_KEYS),
    "watch.freeze": set(FREEZE_KEYS),
    "watch.retain": set(RETAIN_KEYS),
    "worker": set(WORKER_KEYS),
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


# --------------------------------------------------------------- the sandbox, for real

# Installs what RestrictAddressFamilies=AF_UNIX compiles to (a seccomp filter: socket() with any
# other family fails with EAFNOSUPPORT, inherited by every child), checks it, then execs argv.
AF_UNIX_ONLY = textwrap.dedent(
    """
    import ctypes, errno, os, socket, struct, sys
    AUDIT_ARCH_X86_64, NR_SOCKET = 0xC000003E, 41
    code = [
        (0x20, 0, 0, 4),  # A = arch
        (0x15, 0, 5, AUDIT_ARCH_X86_64),
        (0x20, 0, 0, 0),  # A = syscall number
        (0x15, 0, 3, NR_SOCKET),
        (0x20, 0, 0, 16),  # A = first argument: the family
        (0x15, 1, 0, socket.AF_UNIX),
        (0x06, 0, 0, 0x00050000 | errno.EAFNOSUPPORT),  # SECCOMP_RET_ERRNO
        (0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *c) for c in code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    prog = Prog(len(code), ctypes.addressof(raw))
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(prog), 0, 0):
        sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
    try:
        socket.socket(socket.AF_INET6).close()
        sys.exit("seccomp filter not effective")
    except OSError as exc:
        assert exc.errno == errno.EAFNOSUPPORT, exc
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


@pytest.mark.tf
def test_daemon_and_tf_workers_run_in_the_units_sandbox(tmp_path: Path, corpus: Corpus) -> None:
    """What the unit forbids, enforced for real: no socket but AF_UNIX (seccomp, as
    RestrictAddressFamilies=AF_UNIX) and the training root and export directory mounted noexec
    (as NoExecPaths=). Recording, a TF evaluation and a verified TF export still work."""
    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter here is written for x86_64")
    unshare = _tool("unshare")
    if os.geteuid() != 0 or _run(unshare, "-m", "true").returncode != 0:
        pytest.skip("mounting noexec in a private mount namespace needs root")
    root, export = tmp_path / "runs", tmp_path / "export"
    corpus.copy("tf1", root / "mnist")
    export.mkdir()
    planted = root / "mnist" / "planted.sh"
    planted.write_text("#!/bin/sh\nexit 0\n")
    planted.chmod(0o755)
    conf = write_config(
        tmp_path / "c.toml",
        root,
        db=tmp_path / "ckptd.db",
        extra=textwrap.dedent(
            f"""
            [watch.evaluate]
            evaluator = "python"
            function = "tests.daemon_eval_fns:step_score"

            [watch.freeze]
            format = ["saved_model", "frozen_graph"]
            export_dir = "{export}"
            inputs = {{ "x" = "x:0" }}
            outputs = {{ "y" = "y:0" }}
            """
        ),
    )
    mounts = " && ".join(
        f"mount --bind {d} {d} && mount -o remount,bind,noexec {d} {d}" for d in (root, export)
    )
    script = f'{mounts} && {{ ! {planted} 2>/dev/null || exit 9; }} && exec "$@"'
    cmd = [PY, "-c", AF_UNIX_ONLY, PY, "-m", "ckptd", "--config", str(conf), "run", "--once"]
    proc = subprocess.run(
        [unshare, "-m", "sh", "-c", script, "sh", *cmd],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{ENV.get('PYTHONPATH', '')}"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]  # 9: noexec not in force
    db = tmp_path / "ckptd.db"
    evaluated = query(db, "select status from evaluations")
    assert evaluated and {s for (s,) in evaluated} == {"done"}
    exports = query(db, "select status, verified from exports")
    assert exports and all(row == ("published", 1) for row in exports), exports


@pytest.mark.parametrize("unit", ["ckptd.service", "ckptd-worker.service"])
def test_units_command_lines_run(tmp_path: Path, unit: str) -> None:
    """The unit's ExecStartPre and ExecStart as written parse and run: the schema upgrade for
    real, the daemon's start as a one-shot backfill (``--once``), the worker's up to its help."""
    conf = write_config(tmp_path / "ckptd.toml", tmp_path / "runs", db=tmp_path / "ckptd.db")
    (tmp_path / "runs").mkdir()
    d = _unit_directives(DEPLOY / unit)
    env = {**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}

    def argv(line: str, *extra: str) -> list[str]:
        words = line.replace("%E/ckptd/ckptd.toml", str(conf)).split()
        assert words[:2] == ["/usr/bin/env", "ckptd"], line
        return [PY, "-m", "ckptd", *words[2:], *extra]

    ((pre,), (start,)) = d["Service.ExecStartPre"], d["Service.ExecStart"]
    done = subprocess.run(argv(pre), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert query(tmp_path / "ckptd.db", "select count(*) from alembic_version") == [(1,)]
    extra = ("--once",) if " run " in f"{start} " else ("--help",)
    done = subprocess.run(argv(start, *extra), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------- the worker's unit

WORKER_UNIT = DEPLOY / "ckptd-worker.service"


def test_worker_unit_runs_ckptd_worker_in_the_daemons_sandbox() -> None:
    worker, daemon = _unit_directives(WORKER_UNIT), _unit_directives()
    (start,) = worker["Service.ExecStart"]
    (pre,) = worker["Service.ExecStartPre"]
    assert re.search(r"\bckptd worker --config \S+/ckptd\.toml$", start), start
    # (`--config` before the subcommand: `db upgrade` takes none of its own)
    assert re.search(r"\bckptd --config \S+/ckptd\.toml db upgrade$", pre), pre
    # Every other directive is the daemon's: the same user, limits and hardening.
    differ = {k for k in set(worker) | set(daemon) if worker.get(k) != daemon.get(k)}
    assert differ <= {
        "Unit.Description",
        "Service.ExecStart",
        "Service.ExecStartPre",
        "Service.ExecReload",  # a worker has no config to reload
        "Service.TimeoutStartSec",
        "Service.Environment",  # (no CKPTD_START_TIMEOUT: it has no start-up scan)
    }, differ
    burst = int(worker["Unit.StartLimitBurst"][-1])
    per_start = _seconds(worker["Service.TimeoutStartSec"][-1]) + _seconds(
        worker["Service.RestartSec"][-1]
    )
    assert burst * per_start < _seconds(worker["Unit.StartLimitIntervalSec"][-1])


def test_worker_unit_verifies_and_is_as_hardened(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = tmp_path / WORKER_UNIT.name
    shutil.copyfile(WORKER_UNIT, unit)
    proc = _run(analyze, "verify", str(unit))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not [line for line in output.splitlines() if "ckptd" in line], output
    if "--offline" not in _run(analyze, "--help").stdout:
        pytest.skip("systemd-analyze has no --offline (needs systemd >= 250)")
    proc = _run(analyze, "security", "--no-pager", "--offline=true", str(unit))
    match = re.search(r"Overall exposure level for ckptd-worker\.service:\s*([0-9.]+)", proc.stdout)
    assert proc.returncode == 0 and match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
