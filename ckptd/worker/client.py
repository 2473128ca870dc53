"""Starting, feeding, timing out and killing TensorFlow worker processes (no TensorFlow here).

A worker is ``python -m ckptd.worker serve`` in its own session (so the whole process group can
be killed), with ``NOTIFY_SOCKET`` removed (only the daemon talks to systemd). Requests and
results are JSON lines. A worker that exceeds its timeout gets SIGTERM, then SIGKILL, to its
process group; a worker that dies fails the one request it was on. Workers are recycled after
``max_jobs`` requests or any failure, so a leak or a wedged TensorFlow runtime cannot accumulate.

Requests, results, framing and the one error type (WorkerFailure) are ckptd.worker.protocol's.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, cast

from ckptd.worker import protocol
from ckptd.worker.protocol import (
    CRASHED,
    HARMLESS,
    STOPPING,
    TIMEOUT,
    EvaluateResult,
    ExportResult,
    VerifyResult,
    WorkerFailure,
)
from ckptd.worker.requests import EvaluateRequest, ExportRequest, Request, VerifyRequest

log = logging.getLogger(__name__)

KILL_GRACE = 5.0

# The name this error had before it was shared with the worker; use protocol.WorkerFailure.
WorkerError = WorkerFailure


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerClient:
    """One warm worker process at a time; thread-safe (requests are serialised)."""

    def __init__(self, *, max_jobs: int = 200, python: str | None = None) -> None:
        self.max_jobs = max_jobs
        self.python = python or sys.executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._jobs = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stderr_tail: deque[str] = deque(maxlen=30)
        self._buffer = b""
        self.started = 0  # how many processes were spawned (for tests and metrics)
        self._stopping = False  # set by terminate(): no new worker, no new request

    # ------------------------------------------------------------ lifecycle

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [self.python, "-m", "ckptd.worker", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
            # `python -m` puts the working directory first on sys.path: started from a writable
            # run directory (`ckptd evaluate` there), a planted numpy.py would be imported.
            cwd="/",
            start_new_session=True,  # its own process group: killable as a whole
            close_fds=True,
        )
        self.started += 1
        self._jobs = 0
        self._buffer = b""
        self._stderr_tail.clear()
        threading.Thread(
            target=self._drain_stderr, args=(proc,), daemon=True, name="ckptd-worker-stderr"
        ).start()
        log.debug("started TensorFlow worker pid %d", proc.pid)
        return proc

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                log.debug("worker %d: %s", proc.pid, line)

    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def terminate(self) -> None:
        """Stop now, even mid-request (daemon shutdown): the waiting caller sees a crash, and
        later calls fail with kind ``stopping``. The flag is set before ``_proc`` is read and
        ``call`` checks it again after spawning, so a worker started concurrently is stopped too.
        """
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            terminate_group(proc, grace=2.0)
        self.close()

    def _stop(self, *, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if not kill and proc.stdin:
                try:
                    proc.stdin.close()  # EOF: a clean exit
                    proc.wait(timeout=KILL_GRACE)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if proc.poll() is None:
                terminate_group(proc)
        for stream in (proc.stdout, proc.stdin):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass

    # ------------------------------------------------------------ requests

    def evaluate(self, request: EvaluateRequest, timeout: float) -> EvaluateResult:
        return cast(EvaluateResult, self.call(request.to_wire(), timeout))

    def export(self, request: ExportRequest, timeout: float) -> ExportResult:
        return cast(ExportResult, self.call(request.to_wire(), timeout))

    def verify(self, request: VerifyRequest, timeout: float) -> VerifyResult:
        return cast(VerifyResult, self.call(request.to_wire(), timeout))

    def call(self, request: Request | dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request (typed, or as its wire dict); return its result or raise
        :class:`~ckptd.worker.protocol.WorkerFailure`."""
        with self._lock:
            if self._stopping:
                raise WorkerFailure(STOPPING, "the daemon is stopping")
            if self._proc is None or self._proc.poll() is not None or self._jobs >= self.max_jobs:
                self._stop()
                self._proc = self._spawn()
                if self._stopping:  # terminate() ran while the worker was being started
                    self._stop(kill=True)
                    raise WorkerFailure(STOPPING, "the daemon is stopping")
            proc = self._proc
            rid = next(self._ids)
            self._jobs += 1
            try:
                assert proc.stdin is not None
                proc.stdin.write(protocol.request_line(rid, request))
                proc.stdin.flush()
            except OSError:
                self._stop(kill=True)
                raise WorkerFailure(
                    CRASHED, f"worker died before taking the request ({self._tail()})"
                ) from None
            try:
                return protocol.read_response(self._read_line(proc, timeout), rid)
            except WorkerFailure as exc:
                if exc.kind in (CRASHED, TIMEOUT):
                    self._stop(kill=True)
                    if self._stopping:  # killed by terminate(), not a crash of the job
                        raise WorkerFailure(STOPPING, "the daemon is stopping") from None
                elif exc.kind not in HARMLESS:
                    self._stop()  # recycle after a TensorFlow error: state may be wedged
                raise

    def _read_line(self, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerFailure(
                        TIMEOUT, f"worker did not answer within {timeout:g} s; killed it"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = proc.wait(timeout=KILL_GRACE)
                    how = (
                        f"signal {signal.Signals(-code).name}"
                        if code < 0
                        else f"exit status {code}"
                    )
                    raise WorkerFailure(CRASHED, f"worker died ({how}): {self._tail()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _tail(self) -> str:
        lines = [ln for ln in self._stderr_tail if ln.strip()]
        return " | ".join(lines[-3:]) or "no output"


def terminate_group(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            if pgid is not None:
                os.killpg(pgid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)  # stragglers the worker itself started
        except ProcessLookupError:
            pass
