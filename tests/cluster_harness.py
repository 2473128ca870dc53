"""Many ckptd processes on one database, real TensorFlow writers, and the cluster's audit.

A :class:`Cluster` is one watched root (the "shared NFS path" shape: every daemon watches all of
it), one database, and the real processes acting on them: ``ckptd run`` daemons started by
:meth:`Cluster.start` (and, by the same call with ``command="worker"``, remote workers), and
:class:`Writers`, a few real TensorFlow processes saving checkpoints into many runs on command.
:meth:`Cluster.check` is the audit: the fault suite's (``tests/audit.py``: disk vs database vs
state files) plus what several processes could get wrong together (a checkpoint recorded,
evaluated or pruned twice, an evaluation left ``running`` by nobody).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.audit import DATABASE_ERRORS, Database, audit, fetch
from tests.conftest import ENV, PY, REPO

# Every process runs under this wrapper: `ckptd` as ever, plus one dormant fault. When the file
# named by CKPTD_TEST_PAUSE exists, the next write of a run under a lease stops the process
# (SIGSTOP) where the file says: "before" (after taking the lease, before writing: the one place
# where nothing but the database's check of the epoch can refuse the write when it resumes),
# "inside" (in the write's transaction, after that check) or "prune" (a prune has deleted files
# and not yet recorded that it did; a failure to record them is logged, "[test] prune results
# not recorded").
PAUSABLE = textwrap.dedent(
    """
    import os, signal, sys, threading
    from ckptd.store import pruning, recording

    trigger = os.environ["CKPTD_TEST_PAUSE"]

    def pause_at(point):
        try:
            with open(trigger) as fh:
                if fh.read().strip() != point:
                    return
            os.unlink(trigger)
        except OSError:
            return
        # To this thread, which stops at once (a stop sent to the process goes to its main
        # thread first, and this one could write before the stop reached it).
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    real_apply, real_write = recording.apply, recording._apply

    def apply(store, state, changes, hold=None):
        if hold is not None:
            pause_at("before")
        return real_apply(store, state, changes, hold)

    def write(session, state, changes):
        pause_at("inside")
        return real_write(session, state, changes)

    real_results = pruning.record_results

    def record_results(*args, **kwargs):
        pause_at("prune")
        try:
            return real_results(*args, **kwargs)
        except Exception as exc:  # what the prune case waits for
            print(f"[test] prune results not recorded: {exc!r}", file=sys.stderr, flush=True)
            raise

    recording.apply, recording._apply = apply, write
    pruning.record_results = record_results
    from ckptd.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)

# The `command` evaluator: logs each evaluation it really ran (one line, the prefix), then
# scores it by step. No TensorFlow worker per daemon: three of them would not fit this machine.
EVALUATOR = """#!/bin/sh
echo "$1" >> "$0.log"
echo "{\\"eval/score\\": $2}"
"""


class Node:
    """One real ``ckptd`` process (``run``, or ``worker``) in its own session."""

    def __init__(self, name: str, config: Path, command: str, log: Path, pause: Path) -> None:
        self.name, self.config, self.log_path, self.pause_trigger = name, config, log, pause
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [PY, "-c", PAUSABLE, "--config", str(config), command],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**ENV, "CKPTD_TEST_PAUSE": str(pause)},
            cwd=REPO,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause_at(self, point: str) -> None:
        """Stop at its next write under a lease, ``before`` it or ``inside`` its transaction, or
        at its next ``prune`` between deleting files and recording it."""
        self.pause_trigger.write_text(point)

    def paused(self) -> bool:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.pid).status() == psutil.STATUS_STOPPED
        return False

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would (and whatever it started with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def log(self, since: int = 0) -> str:
        """Its log from byte ``since`` on (see :meth:`log_size`)."""
        with self.log_path.open("rb") as fh:
            fh.seek(since)
            return fh.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size


class Writers:
    """``processes`` real TF trainers (tests/cluster_writer.py) writing ``runs`` runs between
    them, ``r00`` … under ``root``; :meth:`go` starts saves, :meth:`stop` ends them."""

    def __init__(self, root: Path, logs: Path, runs: int, processes: int) -> None:
        self.root = root
        self.names = [f"r{i:02d}" for i in range(runs)]
        self.saves: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._events: list[list[str]] = []
        self.procs: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []
        for i in range(processes):
            names = self.names[i::processes]
            with (logs / f"writer{i}.log").open("wb") as stderr:
                proc = subprocess.Popen(
                    [PY, str(REPO / "tests" / "cluster_writer.py"), str(root), *names],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    env=ENV,
                    cwd=REPO,
                )
            events: list[str] = []
            thread = threading.Thread(target=self._read, args=(proc, events), daemon=True)
            thread.start()
            self.procs.append(proc)
            self._events.append(events)
            self._threads.append(thread)

    @property
    def runs(self) -> list[Path]:
        return [self.root / n for n in self.names]

    def _read(self, proc: subprocess.Popen[str], events: list[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue  # not the protocol (a library printing)
            rec = json.loads(line)
            with self._lock:
                if rec["event"] == "saved":
                    self.saves.append(rec)
                else:
                    events.append(rec["event"])

    def _send(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None and proc.poll() is None, "a writer exited"
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def _wait(self, event: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(e.count(event) < count for e in self._events):
            assert time.monotonic() < deadline, f"writers did not say {event!r} in {timeout} s"
            assert all(p.poll() is None for p in self.procs), "a writer exited"
            time.sleep(0.1)

    def ready(self, timeout: float = 180) -> None:
        """Until every writer has imported TensorFlow and set up its runs."""
        self._wait("ready", 1, timeout)

    def go(self, interval: float) -> None:
        """Each writer saves one checkpoint of each of its runs every ``interval`` seconds."""
        self._send(f"go {interval}")

    def stop(self) -> list[dict[str, Any]]:
        """No more saves (once those under way are on disk); every save so far."""
        stops = min(e.count("stopped") for e in self._events) + 1
        self._send("stop")
        self._wait("stopped", stops, 60)
        return self.all_saves()

    def all_saves(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.saves)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=10)


class Cluster:
    """Daemons (and workers) of one database watching one root, with retention and an
    evaluator, leases of ``ttl`` seconds and a rescan every ``rescan`` seconds."""

    def __init__(
        self, tmp: Path, database: str, *, ttl: float, rescan: float, keep_last: int = 3
    ) -> None:
        self.tmp, self.database, self.ttl, self.rescan = tmp, database, ttl, rescan
        self.keep_last = keep_last
        self.root = tmp / "runs"
        self.root.mkdir()
        self.evaluator = tmp / "evaluate.sh"
        self.evaluator.write_text(EVALUATOR)
        self.evaluator.chmod(0o755)
        self.nodes: dict[str, Node] = {}
        self._started = 0
        self.writers: Writers | None = None

    def config(
        self, name: str, extra: str = "", evaluator: Path | None = None, daemon_extra: str = ""
    ) -> Path:
        """Each host's config: its name, the shared database, the shared root (and its own
        evaluator command, when given; ``daemon_extra`` goes into its ``[daemon]`` table)."""
        path = self.tmp / f"{name}.toml"
        path.write_text(
            textwrap.dedent(
                f"""\
                [daemon]
                database = "{self.database}"
                name = "{name}"
                lease_ttl = "{self.ttl:g}s"
                rescan_interval = "{self.rescan:g}s"
                heartbeat_interval = "1s"
                {daemon_extra}
                [[watch]]
                path = "{self.root}"
                runs = "*"

                [watch.retain]
                keep_last = {self.keep_last}
                min_age = "0s"
                every = "1s"

                [watch.evaluate]
                evaluator = "command"
                command = ["{evaluator or self.evaluator}", "{{checkpoint}}", "{{step}}"]
                order = "newest"
                every = "2s"
                timeout = "60s"
                retry_backoff = "1s"
                """
            )
            + extra
        )
        return path

    def start(
        self,
        name: str,
        command: str = "run",
        extra: str = "",
        evaluator: Path | None = None,
        daemon_extra: str = "",
    ) -> Node:
        """A real ``ckptd COMMAND`` named ``name`` (replacing a stopped one of that name)."""
        self._started += 1
        node = Node(
            name,
            self.config(name, extra, evaluator, daemon_extra),
            command,
            self.tmp / f"{name}.{self._started}.log",
            self.tmp / f"pause-{name}",
        )
        self.nodes[name] = node
        return node

    def start_writers(self, runs: int, processes: int) -> Writers:
        logs = self.tmp / "writers"
        logs.mkdir(exist_ok=True)
        self.writers = Writers(self.root, logs, runs, processes)
        return self.writers

    # ------------------------------------------------------------ what the database says

    def fetch(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return fetch(self.database, sql, **params)

    def held(self) -> dict[str, set[str]]:
        """Each daemon's live leases, by run name (the database's clock decides)."""
        rows = self.fetch(
            "select l.owner, r.name from run_leases l join runs r on r.id = l.run_id "
            "where l.expires_at > (now() at time zone 'utc')"
        )
        out: dict[str, set[str]] = {}
        for owner, run in rows:
            out.setdefault(owner, set()).add(run)
        return out

    def recorded(self) -> set[str]:
        """The prefixes recorded complete or pruned."""
        rows = self.fetch("select prefix from checkpoints where state in ('complete', 'pruned')")
        return {p for (p,) in rows}

    def registered(self, node: Node) -> bool:
        rows = self.fetch(
            "select count(*) from daemons where name = :name and pid = :pid and stopped_at is null",
            name=node.name,
            pid=node.pid,
        )
        return node.alive() and rows[0][0] == 1

    def events(self, kind: str) -> list[tuple[Any, ...]]:
        """Audit rows of ``kind``: (at, run id, checkpoint id, subject, reason, detail)."""
        return self.fetch(
            "select at, run_id, checkpoint_id, subject, reason, detail from actions "
            "where kind = :kind order by id",
            kind=kind,
        )

    # ------------------------------------------------------------ the audit

    def twice(self) -> list[str]:
        """Checkpoints recorded, evaluated or pruned more than once; evaluations left running."""
        problems = [
            f"{n} rows for {prefix}"
            for prefix, n in self.fetch(
                "select prefix, count(*) from checkpoints group by prefix having count(*) > 1"
            )
        ]
        evaluated: dict[int, int] = {}
        for _, _, checkpoint_id, *_ in self.events("evaluated"):
            evaluated[checkpoint_id] = evaluated.get(checkpoint_id, 0) + 1
        problems += [f"checkpoint {c} evaluated {n} times" for c, n in evaluated.items() if n > 1]
        pruned: dict[int, int] = {}
        for *_, detail in self.events("pruned"):
            for entry in _detail(detail)["checkpoints"]:
                pruned[entry["checkpoint_id"]] = pruned.get(entry["checkpoint_id"], 0) + 1
        problems += [f"checkpoint {c} pruned {n} times" for c, n in pruned.items() if n > 1]
        problems += [
            f"evaluation of {prefix} left running by {by}"
            for prefix, by in self.fetch(
                "select c.prefix, e.claimed_by from evaluations e join checkpoints c "
                "on c.id = e.checkpoint_id where e.status = 'running'"
            )
        ]
        return problems

    def overkept(self) -> list[str]:
        """Runs keeping more complete checkpoints than ``keep_last`` (once writers are quiet)."""
        rows = self.fetch(
            "select r.name, count(*) from checkpoints c join runs r on r.id = c.run_id "
            "where c.state = 'complete' group by r.name having count(*) > :n",
            n=self.keep_last,
        )
        return [
            f"run {run} keeps {n} checkpoints (keep_last = {self.keep_last})" for run, n in rows
        ]

    def check(self, saves: list[dict[str, Any]], *, live: bool = False) -> list[str]:
        """Every disagreement (empty: all agree): :func:`tests.audit.audit` and :meth:`twice`."""
        assert self.writers is not None
        db: Database = self.database
        try:
            problems = audit(db, self.writers.runs, saves, live=live) + self.twice()
            return problems if live else problems + self.overkept()
        except DATABASE_ERRORS as exc:
            return [f"cannot read the database: {exc}"]

    def close(self) -> None:
        for node in self.nodes.values():
            if node.alive():
                node.kill()
        if self.writers is not None:
            self.writers.close()


def _detail(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else dict(json.loads(value))


def until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy (a database error counts as not yet); bounded."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except DATABASE_ERRORS as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")
