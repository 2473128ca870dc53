"""A fault-injecting HTTP proxy in front of a test object store server.

Clients are pointed at the proxy (``endpoint_url=proxy.endpoint``); it forwards each request
unchanged (the Host header too, so S3 signatures still verify) and returns the server's answer,
unless a fault is queued for it:

- ``"503"``: HTTP 503 with the store's throttling error (S3 ``SlowDown``, a GCS JSON error),
  without reaching the server;
- ``"403"``: HTTP 403 with the store's access denied error (the GCS emulator has no
  authentication: this is how a refusal from GCS is tested);
- ``"hang"``: no answer at all until the proxy stops (a server that accepts and stalls);
- ``"drop"``: the connection is closed without an answer;
- ``"truncate"``: the server's answer with its body cut in half and Content-Length saying so
  (a short but well-formed response: only the reader can tell);
- ``"cut"``: the server's headers, then half the body, then the connection is closed.

``proxy.requests`` records every request seen (method, path), faulted or not.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("503", "403", "hang", "drop", "truncate", "cut")
_ERRORS = {
    ("s3", 503): ("SlowDown", "Please reduce your request rate."),
    ("s3", 403): ("AccessDenied", "Access Denied"),
    ("gs", 503): ("", "Backend Error"),
    ("gs", 403): ("", "ckptd-test does not have storage.objects.list access"),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class _Server(ThreadingHTTPServer):
    """Remembers its open connections, so stopping it ends every handler thread."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class _Fault:
    kind: str
    match: Callable[[str, str], bool]  # (method, path) -> whether this request gets it


@dataclass
class FaultProxy:
    upstream: str  # http://127.0.0.1:PORT of the real server
    scheme: str = "s3"  # whose error body a 503 carries
    requests: list[tuple[str, str]] = field(default_factory=list)
    _faults: deque[_Fault] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(
        self, kind: str, times: int = 1, match: Callable[[str, str], bool] | None = None
    ) -> None:
        """The next ``times`` requests that ``match`` (all, by default) get fault ``kind``."""
        assert kind in FAULTS, kind
        with self._lock:
            for _ in range(times):
                self._faults.append(_Fault(kind, match or (lambda m, p: True)))

    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def _take(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self._faults:
                if fault.match(method, path):
                    self._faults.remove(fault)
                    return fault.kind
        return None

    def start(self) -> FaultProxy:
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.command, self.path)
                if fault == "hang":
                    proxy._stopping.wait(60)
                    fault = "drop"
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault in ("503", "403"):
                    self._error(int(fault))
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read() if self.command != "HEAD" else b""
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    status = resp.status
                finally:
                    conn.close()
                declared = len(data)
                if fault in ("truncate", "cut"):
                    data = data[: len(data) // 2]
                    if fault == "truncate":
                        declared = len(data)
                self.send_response(status)
                for k, v in out:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command == "HEAD":
                    length_header = dict((k.lower(), v) for k, v in out).get("content-length")
                    self.send_header("Content-Length", length_header or "0")
                else:
                    self.send_header("Content-Length", str(declared))
                if fault == "cut":
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                if fault == "cut":
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

            def _error(self, status: int) -> None:
                code, message = _ERRORS[proxy.scheme, status]
                if proxy.scheme == "s3":
                    body = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    kind = "application/xml"
                else:
                    body = f'{{"error": {{"code": {status}, "message": "{message}"}}}}'.encode()
                    kind = "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="objfaults-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()  # clients' idle keep-alive connections too
            self._server.server_close()  # joins every handler thread
        if self._thread is not None:
            self._thread.join(10)


@contextmanager
def fault_proxy(upstream: str, scheme: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, scheme).start()
    try:
        yield proxy
    finally:
        proxy.stop()
