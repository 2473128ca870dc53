"""Object stores for the benchmarks: SeaweedFS from the test suite's fixtures (tests/objservers.py,
loaded from its file so there is one copy of it), and a counting proxy in front of it.

The proxy counts requests on the wire, by kind (LIST, GET, HEAD, PUT, DELETE): what a bucket's
owner is billed for, whatever client made them — ckptd, or the TensorBoard-style and
TF-Serving-style anchors — so every figure is measured the same way, none computed.
S3 requests are signed with the Host header, which the proxy forwards unchanged.
"""

from __future__ import annotations

import http.client
import importlib.util
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import REPO


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"ckptd_tests_{name}", REPO / "tests" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _servers() -> Any:
    if "ckptd_tests_objservers" not in sys.modules:
        _load("objservers")
    return sys.modules["ckptd_tests_objservers"]


def unavailable() -> str | None:
    """Why no SeaweedFS can be started here, or None."""
    try:
        _servers().weed_binary()
    except Exception as exc:
        return str(exc)
    return None


@contextmanager
def seaweedfs(root: Path) -> Iterator[Any]:
    """A started SeaweedFS S3 server (tests/objservers.py's ``ObjServer``)."""
    server = _servers().seaweedfs(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def kind_of(method: str, target: str) -> str:
    """LIST for a bucket listing (a GET of the bucket with list parameters), else the method."""
    parts = urlsplit(target)
    if method == "GET" and (
        "list-type=" in parts.query
        or "delimiter=" in parts.query
        or "prefix=" in parts.query
        or parts.path.strip("/").count("/") == 0
    ):
        return "LIST"
    return method


class CountingProxy:
    """An HTTP proxy on loopback forwarding to ``upstream``, counting requests by kind."""

    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.counts[kind_of(self.command, self.path)] += 1
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                try:
                    conn.request(self.command, self.path, body, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    local.conn = None
                    conn.close()
                    self.send_error(502)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client killed mid-request (an anchor stopped): nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def object_config(
    path: Path, url: str, *, db: Path, endpoint: str, interval: str, runs: str | None = "*"
) -> Path:
    """A ckptd config watching the object store URL ``url`` through ``endpoint``."""
    runs_line = f'runs = "{runs}"' if runs else ""
    path.write_text(
        f"""[daemon]
database = "sqlite:///{db}"

[[watch]]
path = "{url}"
{runs_line}
endpoint_url = "{endpoint}"
poll_interval = "{interval}"
"""
    )
    return path


def golden_run() -> Path:
    """Real TensorFlow output checked in with the tests (tests/golden/tf2)."""
    return REPO / "tests" / "golden" / "tf2"
