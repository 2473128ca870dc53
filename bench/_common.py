"""Shared helpers for the ckptd benchmarks (stdlib only; never imports TensorFlow or ckptd).

Every benchmark runs the real ``ckptd`` CLI and a real TensorFlow anchor in subprocesses, so the
numbers include interpreter start-up and imports exactly as a user sees them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
# The project's virtualenv interpreter (has TensorFlow for the anchors and ckptd installed).
VENV_PY = REPO / ".venv" / "bin" / "python"
PY = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
ENV.pop("NOTIFY_SOCKET", None)  # the daemon must not talk to a real systemd
ENV.pop("CKPTD_CONFIG", None)
# Subprocesses run outside the checkout: `python -m ckptd` puts its cwd first on sys.path, so a
# cwd of REPO would shadow a PYTHONPATH pointing at another ckptd tree (e.g. a snapshot of HEAD).
RUN_CWD = "/"


def byte_compile(tree: Path = REPO / "ckptd") -> None:
    """Byte-compile ckptd as installing its wheel does. With PYTHONDONTWRITEBYTECODE set (as on
    this project's machines) an editable checkout never gets .pyc files, so every ckptd process
    would compile every module it imports (~80 ms a start) — a cost an installed ckptd, like the
    TensorFlow anchors in site-packages, never pays. Stale .pyc files are simply recompiled."""
    import compileall

    compileall.compile_dir(tree, quiet=1)


byte_compile()


# ------------------------------------------------------------------ config / processes


def write_config(
    path: Path,
    watch: Path,
    *,
    db: Path | str,
    runs: str | None = "*",
    observer: str = "auto",
    daemon: str = "",
    watch_extra: str = "",
) -> Path:
    """The TOML shape of tests/conftest.py's write_config, with the observer explicit
    (``db``: a SQLite file, or a database URL; ``watch_extra``: more keys of the [[watch]]
    table)."""
    runs_line = f'runs = "{runs}"' if runs else ""
    path.write_text(
        textwrap.dedent(
            f"""\
            [daemon]
            database = "{database_url(db)}"
            {daemon}

            [[watch]]
            path = "{watch}"
            {runs_line}
            observer = "{observer}"
            keras_template = "model.{{epoch:02d}}-{{val_loss:.2f}}.keras"
            {watch_extra}

            [watch.best]
            metric = "eval/accuracy"
            mode = "max"
            """
        )
    )
    return path


def ckptd_cmd(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "ckptd", "--config", str(config), *args]


class Daemon:
    """A real ``ckptd run`` subprocess (as tests/conftest.py's DaemonProcess)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Daemon:
        self._log = self.log_path.open("ab")
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            ckptd_cmd(self.config, "run"),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
            cwd=RUN_CWD,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_running(self, db: Path | str, timeout: float = 60) -> None:
        """Until the daemon's first heartbeat says "running" (backfill done, watchers started)."""

        def running() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"ckptd run exited early:\n{self.log()[-3000:]}")
            rows = query(db, "select status from daemons order by id desc limit 1")
            return bool(rows) and json.loads(rows[0][0]).get("state") == "running"

        wait_for(running, timeout=timeout, what="ckptd run to report running")

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop a subprocess started with start_new_session=True (only that one, by its pid)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train(kind: str, out: Path, *args: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Run the real TF trainer to completion; returns its "saved" records."""
    proc = subprocess.run(
        [PY, "-m", "ckptd.worker.train", kind, "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        cwd=RUN_CWD,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"trainer {kind} failed:\n{proc.stderr[-3000:]}")
    return saved_records(proc.stdout)


def saved_records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "saved":
                out.append(rec)
    return out


def timed_run(
    cmd: Sequence[str], *, timeout: float = 600
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of a whole subprocess, from just before spawn to exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, env=ENV, timeout=timeout, cwd=RUN_CWD
    )
    return time.perf_counter() - t0, proc


def children_cpu() -> float:
    """CPU seconds (user + system) of every subprocess this process has waited for so far,
    with theirs (a ``ckptd run --once`` with its observer processes, once it has exited)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )


# ------------------------------------------------------------------ database


def database_url(db: Path | str) -> str:
    """The URL of a database given as a SQLite file (a Path) or already as a URL (a str)."""
    return f"sqlite:///{db}" if isinstance(db, Path) else db


def is_postgres(db: Path | str) -> bool:
    return isinstance(db, str) and db.startswith("postgresql")


def libpq_url(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as psycopg itself takes it."""
    return "postgresql://" + url.split("://", 1)[1]


def query(db: Path | str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A read-only query (the daemon may be writing; WAL lets us read alongside) on a SQLite file
    or a PostgreSQL URL (``?`` placeholders on both)."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(libpq_url(str(db)), autocommit=True) as pg:
            return pg.execute(sql.replace("?", "%s"), params).fetchall()  # type: ignore[arg-type]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def execute(db: Path | str, sql: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run statements (``?`` placeholders on both) in one transaction on a SQLite file or a
    PostgreSQL URL."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(libpq_url(str(db))) as pg:
            for stmt, params in sql:
                if params:
                    pg.execute(stmt.replace("?", "%s"), params)  # type: ignore[arg-type]
                else:  # no placeholders: a % in it is the operator
                    pg.execute(stmt)  # type: ignore[arg-type]
        return
    con = sqlite3.connect(db)
    try:
        with con:
            for stmt, params in sql:
                con.execute(stmt, params)
    finally:
        con.close()


def db_epoch(value: str | datetime | None) -> float | None:
    """A naive-UTC DateTime as SQLAlchemy stores it (text in SQLite, a naive datetime from
    PostgreSQL) → Unix epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC).timestamp()


def db_time(epoch: float) -> str:
    """Unix epoch seconds → the naive-UTC text SQLAlchemy stores for a DateTime."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _pg_error() -> type[Exception]:
    try:
        import psycopg
    except ImportError:
        return sqlite3.Error
    return psycopg.Error


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (sqlite3.Error, _pg_error()):
            last = None
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")


# ------------------------------------------------------------------ statistics / output


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when undefined (missing, or b is not positive)."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}x"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def summary_row(
    metric: str,
    ckptd: float | None,
    anchor: float | None,
    *,
    unit: str,
    target: str,
    ok: bool | None,
    ratio_value: float | None = None,
    ratio_label: str = "",
) -> dict[str, Any]:
    """One line of the combined summary (bench/run_all.py prints these from every result)."""
    return {
        "metric": metric,
        "unit": unit,
        "ckptd": ckptd,
        "anchor": anchor,
        "ratio": ratio_value,
        "ratio_label": ratio_label,
        "target": target,
        "met": ok,
    }


_LOAD_AT_IMPORT = os.getloadavg()


def busy_others(exclude: Sequence[int] = ()) -> list[str]:
    """Other processes using CPU right now (a 0.5 s sample): they skew timings on 2 cores."""
    import psutil

    mine = {os.getpid(), *exclude}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid in mine:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(0.5)
    out = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 10:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            out.append(f"{pct:.0f}% pid {p.pid}: {cmd[:100]}")
    return out


def load_report() -> dict[str, Any]:
    """Load averages when the benchmark started and now; printed with every result."""
    end = os.getloadavg()
    report = {"loadavg_start": _LOAD_AT_IMPORT, "loadavg_end": end, "busy_others_end": []}
    print(
        f"machine: {os.cpu_count()} CPUs; 1-min load average at start {_LOAD_AT_IMPORT[0]:.2f}, "
        f"at end {end[0]:.2f}"
    )
    others = busy_others()
    report["busy_others_end"] = others
    if others:
        print("WARNING: other processes were busy at the end (timings may be skewed):")
        for line in others:
            print(f"  {line}")
    return report


def ckptd_source() -> dict[str, Any]:
    """Which ckptd the subprocesses import (the editable checkout, or PYTHONPATH's), and its git
    state: the numbers belong to that code."""
    proc = subprocess.run(
        [PY, "-c", "import ckptd, os; print(os.path.dirname(os.path.dirname(ckptd.__file__)))"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=RUN_CWD,
    )
    src = proc.stdout.strip()
    info: dict[str, Any] = {"path": src, "pythonpath": os.environ.get("PYTHONPATH", "")}
    git = subprocess.run(
        ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if git.returncode == 0 and src:
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "ckptd", "migrations"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        info["git_head"] = git.stdout.strip()
        info["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    return info


def host_info() -> dict[str, Any]:
    return {
        "ckptd": ckptd_source(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    info = {**host_info(), "load": load_report()}
    src = info["ckptd"]
    print(
        f"ckptd under test: {src['path']}"
        + (
            f" (git {src['git_head']}, {len(src['uncommitted'])} uncommitted file(s))"
            if "git_head" in src
            else " (not a git checkout)"
        )
    )
    path.write_text(json.dumps({"benchmark": name, **info, **data}, indent=2) + "\n")
    print(f"\nresult written to {path.relative_to(REPO)}")
    return path


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB from /proc/PID/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def num_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def inotify_watches(pid: int) -> int:
    """Inotify watches the process holds (lines "inotify wd:" in the fdinfo of its fds)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                n += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            continue
    return n
