"""The TensorFlow worker process.

    python -m ckptd.worker serve
        Reads one JSON request per line on stdin, answers each with one JSON line on stdout
        (see ckptd.worker.protocol), exits 0 at EOF. Stays warm between requests: graphs,
        sessions, models and data sets are cached (ckptd.worker.caches).

    python -m ckptd.worker once REQUEST.json RESULT.json
        Answers one request read from a file; the response is written atomically
        (RESULT.json.tmp, fsync, rename, fsync of the directory). Exit status 0 when the
        request succeeded, 1 when it failed (the response says why), 2 on usage errors.

Only the protocol ever reaches the real stdout: at start its file descriptor is duplicated for
the protocol and fd 1 / sys.stdout are pointed at stderr, so prints from TensorFlow, Keras
(`model.export` prints a summary) or user functions cannot corrupt it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, TextIO

from ckptd.worker import protocol
from ckptd.worker.logs import log
from ckptd.worker.protocol import WorkerFailure

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def claim_stdout() -> TextIO:
    """Keep the real stdout for the protocol; send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)  # C++ code writing to fd 1 lands on stderr too
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", newline="\n")


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one decoded request; never raises (except KeyboardInterrupt)."""
    request_id = request.get("id")
    op = request.get("op")
    start = time.perf_counter()
    try:
        from ckptd.worker import dispatch  # imports TensorFlow (cached after the first time)

        response = protocol.ok(request_id, dispatch.handle(request))
    except WorkerFailure as exc:
        response = protocol.failure(request_id, exc.kind, exc.message)
    except KeyboardInterrupt:
        raise
    except ImportError as exc:
        traceback.print_exc(file=sys.stderr)
        msg = f"{op}: cannot import the TensorFlow worker: {type(exc).__name__}: {exc}"
        response = protocol.failure(request_id, protocol.TF_ERROR, msg)
    except BaseException as exc:  # includes SystemExit from a user function: never die
        traceback.print_exc(file=sys.stderr)
        msg = f"{op}: unexpected {type(exc).__name__}: {exc}"
        response = protocol.failure(request_id, protocol.TF_ERROR, msg)
    status = "ok" if response["ok"] else f"{response['kind']}: {response['error']}"
    log(f"id={request_id!r} op={op} {time.perf_counter() - start:.3f}s {status}")
    return response


def encode_response(response: dict[str, Any]) -> str:
    """The response line; a result that cannot be serialized becomes a failure, not a crash."""
    try:
        return protocol.encode(response)
    except (TypeError, ValueError) as exc:
        msg = f"result of request {response.get('id')!r} is not JSON serializable: {exc}"
        return protocol.encode(protocol.failure(response.get("id"), protocol.TF_ERROR, msg))


def _exit_with_parent() -> None:
    """A worker whose daemon was SIGKILLed must not live on (a hung one would, forever)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                try:
                    log("the daemon that started this worker is gone; exiting")
                except OSError:  # its stderr pipe died with it (EPIPE): exit all the same
                    pass
                os._exit(3)

    threading.Thread(target=watch, name="ckptd-parent-watch", daemon=True).start()


def serve(out: TextIO) -> int:
    _exit_with_parent()
    try:
        from ckptd.worker import dispatch  # noqa: F401  (pay the TensorFlow import up front)
    except Exception:
        traceback.print_exc(file=sys.stderr)  # each request will report it
    log("serving")
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            log("stdin closed; exiting")
            return 0
        if not line.strip():
            continue
        try:
            request = protocol.decode(line)
        except WorkerFailure as exc:
            response = protocol.failure(None, exc.kind, exc.message)
        else:
            response = handle(request)
        try:
            out.write(encode_response(response) + "\n")
            out.flush()
        except BrokenPipeError:
            log("protocol pipe closed; exiting")
            return 0


def write_atomic(path: str, text: str) -> None:
    """Write `path` so that readers see the old file or the whole new one, even after a crash."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def once(request_path: str, result_path: str) -> int:
    try:
        with open(request_path, "rb") as f:
            request = protocol.decode(f.read())
    except FileNotFoundError:
        msg = f"request file {request_path} not found"
        response = protocol.failure(None, protocol.NOT_FOUND, msg)
    except OSError as exc:
        msg = f"cannot read request file {request_path}: {exc}"
        response = protocol.failure(None, protocol.BAD_REQUEST, msg)
    except WorkerFailure as exc:
        response = protocol.failure(None, exc.kind, f"request file {request_path}: {exc.message}")
    else:
        response = handle(request)
    write_atomic(result_path, encode_response(response) + "\n")
    return 0 if response["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptd.worker", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="answer JSON requests on stdin, one per line")
    p_once = sub.add_parser("once", help="answer one request from a file, atomically")
    p_once.add_argument("request", help="REQUEST.json")
    p_once.add_argument("result", help="RESULT.json (written via RESULT.json.tmp + rename)")
    args = parser.parse_args(argv)
    out = claim_stdout()
    try:
        if args.command == "serve":
            return serve(out)
        return once(args.request, args.result)
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass


if __name__ == "__main__":
    sys.exit(main())
