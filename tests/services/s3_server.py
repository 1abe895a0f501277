"""S3 for the tests: moto's server over HTTP, and a proxy in front of it that injects faults."""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import sys
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from tests.services.base import _Subprocess, free_port


def s3_test_env(endpoint: str) -> dict[str, str]:
    """Return the AWS_* variables that point boto3 at a test S3 ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


class MotoServer(_Subprocess):
    """moto's S3-compatible HTTP server (``python -m moto.server``).

    ``env`` adds variables for the server process, e.g.
    {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} to make it check credentials.
    """

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None,
                 workdir: str | None = None) -> None:
        super().__init__("moto-server", workdir)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._env = env

    def start(self) -> "MotoServer":
        """Start the server; RuntimeError if it does not answer HTTP in time."""
        if not self.running:
            self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                         "-p", str(self.port)], env=self._env)
            self._wait_ready(self.answers_http)
        return self

    def answers_http(self) -> bool:
        """Return True if the server answers an HTTP request (any status)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()


SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
# Headers that describe one connection, not the message: never forwarded either way.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length",
})


class FaultyProxy:
    """An HTTP proxy in front of an S3 endpoint that injects faults at random.

    Runs in a daemon thread of this process, on 127.0.0.1 at ``endpoint``, and
    serves any process pointed at it (AWS_ENDPOINT_URL_S3). Each request whose
    method is in ``methods`` (every request when None) takes one draw of
    ``random.Random(seed)``, so a client sending requests one at a time meets
    the same faults on every run:

    - with probability ``slowdown``: answered 503 SlowDown, not forwarded;
    - with probability ``drop``: forwarded, then the upstream status and
      headers (with the full Content-Length) and half of the body are sent
      and the connection is closed. A response without a body (HEAD, an
      empty PUT reply) goes through whole and is not counted;
    - otherwise forwarded as it is.

    ``delay_s`` holds every request that long before forwarding it: a round trip
    as real S3 has. ``in_flight`` lists the paths of the requests being served,
    and ``overlaps(a, b)`` says whether a request for a path ending in ``a`` and
    one for the same path ending in ``b`` instead were ever served at once.

    ``slowdowns`` and ``drops`` count the faults injected, ``requests`` all
    requests, ``max_in_flight`` the most served at once. HTTP/1.1 keep-alive,
    ``Expect: 100-continue`` and chunked request bodies are handled; every
    response with a body has a Content-Length.

    An outage, whatever the draws: ``set_outage("hang")`` holds every request
    (read, never answered) until the mode changes; ``set_outage("cut")`` closes
    every client connection, the held ones included, and each new one as its
    request arrives; ``set_outage(None)`` serves again (held requests still
    open then are forwarded). With ``hang_after=N`` the proxy starts hanging
    by itself as request N + 1 arrives (``outage_started`` is then set).
    ``held`` and ``cut`` count the requests each mode met.
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.2, drop: float = 0.05, seed: int = 0,
                 methods: Iterable[str] | None = None, port: int | None = None, delay_s: float = 0.0,
                 hang_after: int | None = None) -> None:
        """``upstream`` is the endpoint URL to forward to ("http://127.0.0.1:PORT")."""
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.slowdown, self.drop = slowdown, drop
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests = self.slowdowns = self.drops = self.max_in_flight = 0
        #: (method, path with its query) of every request served, in arrival order.
        self.seen: list[tuple[str, str]] = []
        self.delay_s = delay_s
        self.in_flight: list[str] = []
        self._together: set[tuple[str, str]] = set()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.outage: str | None = None
        self.hang_after, self.arrived, self.held, self.cut = hang_after, 0, 0, 0
        self.outage_started = threading.Event()
        self._outage_changed = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "FaultyProxy":
        """Start serving (idempotent); OSError if the port cannot be bound."""
        if self._server is None:
            self._server = _Server(("127.0.0.1", self.port), _ProxyHandler)
            self._server.proxy = self
            self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open client connections (idempotent)."""
        if self._server is None:
            return
        if self.outage == "hang":  # let the held requests go (their connections close below)
            self.set_outage("cut")
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None
        with self._lock:
            for sock in self._connections:
                _shutdown_quietly(sock)

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def set_outage(self, mode: str | None) -> None:
        """Start ("hang" or "cut") or end (None) an outage; see the class's doc."""
        assert mode in (None, "hang", "cut"), mode
        with self._outage_changed:
            self.outage = mode
            if mode:
                self.outage_started.set()
            self._outage_changed.notify_all()
            cut = list(self._connections) if mode == "cut" else []
        for sock in cut:
            _shutdown_quietly(sock)

    def admit(self) -> bool:
        """Whether to serve a request that has arrived (False: close its connection unanswered);
        holds it while the proxy hangs."""
        with self._outage_changed:
            self.arrived += 1
            if self.hang_after is not None and self.arrived > self.hang_after and not self.outage_started.is_set():
                self.outage = "hang"
                self.outage_started.set()
            if self.outage == "hang":
                self.held += 1
                self._outage_changed.wait_for(lambda: self.outage != "hang")
            if self.outage == "cut":
                self.cut += 1
                return False
            return True

    def draw(self, method: str) -> str | None:
        """Return the fault for the next request: "slowdown", "drop" or None."""
        with self._lock:
            self.requests += 1
            if self.methods is not None and method not in self.methods:
                return None
            value = self._random.random()
            if value < self.slowdown:
                self.slowdowns += 1
                return "slowdown"
        return "drop" if value < self.slowdown + self.drop else None

    def enter(self, path: str, method: str = "GET") -> None:
        """A request for ``path`` is being served: remember it (``seen``) and what it overlaps."""
        with self._lock:
            self.seen.append((method, path))
            self._together.update((path, other) for other in self.in_flight)
            self._together.update((other, path) for other in self.in_flight)
            self.in_flight.append(path)
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    def leave(self, path: str) -> None:
        with self._lock:
            self.in_flight.remove(path)

    def overlaps(self, end_a: str, end_b: str) -> bool:
        """Were requests for ``X + end_a`` and ``X + end_b`` (the same X) ever served at once?"""
        with self._lock:
            return any(a.endswith(end_a) and b == a[:-len(end_a)] + end_b for a, b in self._together)

    def count_drop(self) -> None:
        with self._lock:
            self.drops += 1

    def track(self, sock: socket.socket, open_: bool) -> None:
        """Remember (or forget) a client connection, to close it on stop()."""
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(sock)

    def forward(self, method: str, path: str, headers: list[tuple[str, str]],
                body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request upstream on a new connection; return (status, headers, body).

        Raises OSError (http.client.HTTPException) if the upstream fails.
        """
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection of a FaultyProxy (``self.server.proxy``)."""

    protocol_version = "HTTP/1.1"  # keep-alive; 100-continue answered by the base class
    timeout = 60  # an idle keep-alive connection ends after this

    def setup(self) -> None:
        super().setup()
        self.server.proxy.track(self.connection, True)

    def finish(self) -> None:
        self.server.proxy.track(self.connection, False)
        super().finish()

    def handle_request(self) -> None:
        """Read the request, then answer it as the proxy's draw says."""
        proxy = self.server.proxy
        body = self._read_body()
        if not proxy.admit():
            self.close_connection = True
            _shutdown_quietly(self.connection)
            return
        proxy.enter(self.path, self.command)
        self._served = False
        try:
            if proxy.delay_s:
                time.sleep(proxy.delay_s)
            self._answer(proxy, body)
        finally:
            self._leave(proxy)

    def _leave(self, proxy: "FaultyProxy") -> None:
        """The request is no longer in flight: called once, before its answer is sent, so that a
        request the client sends once it has the answer can never seem to overlap it."""
        if not self._served:
            self._served = True
            proxy.leave(self.path)

    def _answer(self, proxy: "FaultyProxy", body: bytes) -> None:
        fault = proxy.draw(self.command)
        if fault == "slowdown":
            return self._respond(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        try:
            status, headers, content = proxy.forward(self.command, self.path, headers, body)
        except (OSError, http.client.HTTPException) as err:
            return self._respond(502, [("Content-Type", "text/plain")], f"upstream failed: {err}".encode())
        if fault == "drop" and content and self.command != "HEAD":
            proxy.count_drop()
            return self._respond(status, headers, content, cut=True)
        self._respond(status, headers, content)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_request

    def _read_body(self) -> bytes:
        """Return the request body (Content-Length or chunked; b"" if none)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        """Return a chunked request body, its trailers read and dropped."""
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after the chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)

    def _respond(self, status: int, headers: list[tuple[str, str]], content: bytes, cut: bool = False) -> None:
        """Send a response with ``content`` (its first half and a close when ``cut``).

        A HEAD, 204 or 304 response keeps the upstream's Content-Length and has no body.
        """
        bodyless = self.command == "HEAD" or status in (204, 304)
        self._leave(self.server.proxy)
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP or (bodyless and name.lower() == "content-length"):
                self.send_header(name, value)
        if not bodyless:
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if not bodyless:
            self.wfile.write(content[:len(content) // 2] if cut else content)
        if cut:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        """Quiet: the proxy's counters say what happened."""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Quiet about connections the proxy cut itself (an outage); anything else is printed."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _shutdown_quietly(sock: socket.socket) -> None:
    """Shut a socket down both ways, ignoring errors (it may be closed already)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
