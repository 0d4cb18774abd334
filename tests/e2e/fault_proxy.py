"""A fault-injecting HTTP proxy in front of the real kube-apiserver, for testing the client.

Clients talk plain HTTP to the proxy; it forwards to the API server over HTTPS (the test
cluster's CA, the client's own Authorization header) and streams the answer back, watches
included. Rules pick requests (method, a regex on the path and query, how many times) and say
what happens to them instead:

* ``status``: answer with that status (and ``Retry-After`` if given) without forwarding,
  as an overloaded API server does (a 429 from priority and fairness, a 503, a 500);
* ``drop``: close the connection without an answer and without forwarding (the server never
  saw the request);
* ``drop-after``: forward, let the API server carry it out, then close the connection without
  passing the answer on (the client cannot know whether it happened);
* ``delay``: forward after ``delay`` seconds (a slow API server).

``cut_watches()`` closes every watch stream open at that moment, mid-stream.

Every request is logged with when it arrived, what was done and when the answer left, so tests
can check retries and their timing from the proxy's side.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "content-length", "host"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client dropping its connection (as the faults make them do) is expected."""


@dataclass
class Rule:
    method: str
    path: str  # regex, searched in the path with its query
    action: str  # "status", "drop" or "drop-after"
    status: int = 0
    retry_after: str | None = None
    times: int = 1  # how many matching requests it takes; then it passes them through
    used: int = 0
    delay: float = 0.0  # "delay": seconds before forwarding

    def matches(self, method: str, path: str) -> bool:
        return self.used < self.times and method == self.method and bool(
            re.search(self.path, path))


@dataclass
class Entry:
    method: str
    path: str
    arrived: float  # time.monotonic()
    action: str  # "forward" or the rule's action
    status: int | None = None  # what the client got (None: the connection was dropped)
    answered: float | None = None  # when the answer (or the drop) left


@dataclass
class FaultProxy:
    upstream: str  # https://127.0.0.1:PORT
    ca_file: str | None
    port: int = 0
    rules: list[Rule] = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: set[socket.socket] = set()
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=16, ca_certs=self.ca_file,
                                         cert_reqs="CERT_REQUIRED" if self.ca_file else
                                         "CERT_NONE")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._server = _QuietServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def add(self, method: str, path: str, action: str, status: int = 0,
            retry_after: str | None = None, times: int = 1, delay: float = 0.0) -> Rule:
        rule = Rule(method, path, action, status, retry_after, times, delay=delay)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def cut_watches(self) -> int:
        """Close every open watch stream (how many there were)."""
        with self._lock:
            open_ = list(self._watches)
        for conn in open_:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return len(open_)

    def requests(self, method: str | None = None, path: str = "") -> list[Entry]:
        with self._lock:
            return [e for e in self.log if (method is None or e.method == method)
                    and re.search(path, e.path)]

    # -- serving -----------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        entry = Entry(h.command, h.path, time.monotonic(), "forward")
        with self._lock:
            rule = next((r for r in self.rules if r.matches(h.command, h.path)), None)
            if rule is not None:
                rule.used += 1
                entry.action = rule.action
            self.log.append(entry)
        if rule is not None and rule.action == "drop":
            self._drop(h, entry)
            return
        if rule is not None and rule.action == "status":
            self._answer_status(h, entry, rule)
            return
        if rule is not None and rule.action == "delay":
            time.sleep(rule.delay)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        resp = self._pool.request(h.command, self.upstream + h.path, body=body, headers=headers,
                                  preload_content=False, retries=False, redirect=False,
                                  timeout=urllib3.Timeout(connect=5, read=120))
        try:
            if rule is not None and rule.action == "drop-after":
                resp.read()  # the API server has done it; the client never hears so
                self._drop(h, entry)
                return
            h.send_response(resp.status)
            for k, v in resp.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    h.send_header(k, v)
            if "watch=" in h.path:  # stream it, chunked
                h.send_header("Transfer-Encoding", "chunked")
                entry.status, entry.answered = resp.status, time.monotonic()
                h.end_headers()
                with self._lock:
                    self._watches.add(h.connection)
                try:
                    for chunk in resp.stream(65536):
                        h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        h.wfile.flush()
                    h.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                finally:
                    with self._lock:
                        self._watches.discard(h.connection)
                return
            data = resp.read()
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            # Logged before it leaves: a test that reads the log once the client has its
            # answer finds it there.
            entry.status, entry.answered = resp.status, time.monotonic()
            h.wfile.write(data)
        finally:
            resp.release_conn()

    def _answer_status(self, h: BaseHTTPRequestHandler, entry: Entry, rule: Rule) -> None:
        reason = {429: "TooManyRequests", 500: "InternalError", 502: "BadGateway",
                  503: "ServiceUnavailable", 504: "Timeout"}.get(rule.status, "Injected")
        data = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": f"injected by the test proxy: {rule.status}",
                           "reason": reason, "code": rule.status}).encode()
        h.send_response(rule.status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if rule.retry_after is not None:
            h.send_header("Retry-After", rule.retry_after)
        h.end_headers()
        entry.status, entry.answered = rule.status, time.monotonic()
        h.wfile.write(data)
        h.wfile.flush()

    def _drop(self, h: BaseHTTPRequestHandler, entry: Entry) -> None:
        h.close_connection = True
        entry.answered = time.monotonic()
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)
