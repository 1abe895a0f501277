"""Real services for the tests: a private redis-server, a moto S3 server, a faulty proxy.

Redis and moto run as subprocesses on a free port on 127.0.0.1; the
fault-injecting proxy runs in a thread of the test process, also on a free
port, and serves other processes too. Nothing here touches a Redis on the
default port 6379.
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["FaultyProxy", "MotoServer", "RedisServer", "free_port", "s3_test_env"]

_RESERVED_PORTS = {6379}
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def s3_test_env(endpoint: str) -> dict[str, str]:
    """Return the AWS_* variables that point boto3 at a test S3 ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


class _Subprocess:
    """A server subprocess with its output in a log file; stop() is idempotent."""

    def __init__(self, name: str, workdir: str | None) -> None:
        self.name = name
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"clipmask-{name}-")
        self.log_path = os.path.join(self.workdir, f"{name}.log")
        self._proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv`` with stdout and stderr appended to the log file."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env={**os.environ, **(env or {})},
            )

    def _wait_ready(self, is_ready) -> None:
        """Poll ``is_ready()`` until True; RuntimeError if the process dies or times out."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"exited with status {self._proc.returncode}")
            if is_ready():
                return
            time.sleep(0.05)
        self.stop()
        self._fail(f"did not answer within {START_TIMEOUT_S:.0f}s")

    def _fail(self, what: str) -> None:
        """Raise RuntimeError quoting the end of the server's log."""
        with open(self.log_path, errors="replace") as log:
            tail = log.read()[-2000:]
        raise RuntimeError(f"{self.name} {what}; log {self.log_path}:\n{tail}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """Send ``how`` (SIGTERM: a clean stop; SIGKILL: a crash), kill after 5 s, wait for the exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(how)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class RedisServer(_Subprocess):
    """A throwaway redis-server, restartable on the same port.

    No persistence by default; ``appendonly=True`` keeps an append-only file with
    ``appendfsync always`` in ``workdir`` (what survives a restart), ``password`` sets
    ``requirepass`` (``url`` then carries it).
    """

    def __init__(self, port: int | None = None, workdir: str | None = None, *, appendonly: bool = False,
                 password: str | None = None) -> None:
        super().__init__("redis-server", workdir)
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self._options = ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
        if password:
            self._options += ["--requirepass", password]

    def start(self) -> "RedisServer":
        """Start (or restart) the server; RuntimeError if it cannot start."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "redis-server is not on PATH; run the tests with the test command "
                "from the README, which installs it")
        if not self.running:
            self._spawn([executable, "--port", str(self.port), "--bind", "127.0.0.1",
                         "--save", "", *self._options, "--dir", self.workdir])
            self._wait_ready(self.ping)
        return self

    def ping(self) -> bool:
        """Return True if the server answers PING with PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                sock.sendall(auth + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < (2 if auth else 1) and len(reply) < 256:
                    reply += sock.recv(64) or b"\r\n\r\n"  # closed: stop reading
                return b"+PONG" in reply
        except OSError:
            return False


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

    ``slowdowns`` and ``drops`` count the faults injected, ``requests`` all
    requests. HTTP/1.1 keep-alive, ``Expect: 100-continue`` and chunked
    request bodies are handled; every response with a body has a Content-Length.
    """

    def __init__(self, upstream: str, *, slowdown: float = 0.2, drop: float = 0.05, seed: int = 0,
                 methods: Iterable[str] | None = None, port: int | None = None) -> None:
        """``upstream`` is the endpoint URL to forward to ("http://127.0.0.1:PORT")."""
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.slowdown, self.drop = slowdown, drop
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.requests = self.slowdowns = self.drops = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "FaultyProxy":
        """Start serving (idempotent); OSError if the port cannot be bound."""
        if self._server is None:
            self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _ProxyHandler)
            self._server.proxy = self
            self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open client connections (idempotent)."""
        if self._server is None:
            return
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


def _shutdown_quietly(sock: socket.socket) -> None:
    """Shut a socket down both ways, ignoring errors (it may be closed already)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --- RabbitMQ --------------------------------------------------------------

__all__ += ["RabbitServer"]

#: Seconds a RabbitMQ node may take to boot (3 to 5 s on 2 busy cores; more under heavy load).
RABBIT_START_TIMEOUT_S = 120.0
#: Seconds a RabbitMQ node may take to stop after SIGTERM (about 1 s) before it is killed.
RABBIT_STOP_TIMEOUT_S = 30.0
#: Debian's (and the RPM's) real start script. ``/usr/sbin/rabbitmq-server`` is a wrapper that,
#: run as root, re-runs it as the ``rabbitmq`` user with that user's HOME (its Erlang cookie) and
#: output files: no use for a private node.
_RABBITMQ_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _rabbitmq_server_script() -> str | None:
    """The ``rabbitmq-server`` start script to run as this user, or None if none is installed."""
    if os.access(_RABBITMQ_SCRIPT, os.X_OK):
        return _RABBITMQ_SCRIPT
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which("rabbitmq-server", path=search)  # e.g. Homebrew's or the generic tarball's


class RabbitServer(_Subprocess):
    """A throwaway RabbitMQ node of its own, restartable on the same ports.

    Everything it reads or writes is in ``workdir``: its config (``rabbitmq.conf``; the system's
    ``/etc/rabbitmq`` files are not read), an empty plugin list (no management plugin), its
    database, and its Erlang cookie (in a HOME of its own, so neither the system's cookie nor its
    node is touched). It listens on 127.0.0.1 only, AMQP on ``port`` and Erlang distribution on
    ``dist_port``, as node ``rabbit-<port>@localhost``; a system RabbitMQ on 5672 is left alone.
    Its log goes to ``rabbitmq-server.log`` in ``workdir``. Queues and persistent messages survive
    a restart (``stop()`` then ``start()``).

    The node registers with epmd, Erlang's shared name daemon on port 4369, which it starts if
    none runs; that epmd is the standard one and stays, as it does after any Erlang node.
    """

    def __init__(self, port: int | None = None, workdir: str | None = None) -> None:
        super().__init__("rabbitmq-server", workdir)
        self.port = port or free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.nodename = f"rabbit-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> "RabbitServer":
        """Start (or restart) the node and wait until it accepts AMQP logins; RuntimeError if not."""
        script = _rabbitmq_server_script()
        if script is None:
            raise RuntimeError(
                "rabbitmq-server is not installed; run the tests with the test command "
                "from the README, which installs it")
        if not self.running:
            self._spawn([script], env=self._environment())
            deadline = time.monotonic() + RABBIT_START_TIMEOUT_S
            while not self.accepts_amqp():
                if self._proc.poll() is not None:
                    self._fail(f"exited with status {self._proc.returncode}")
                if time.monotonic() > deadline:
                    self.stop()
                    self._fail(f"did not accept AMQP within {RABBIT_START_TIMEOUT_S:.0f}s")
                time.sleep(0.2)
        return self

    def _environment(self) -> dict[str, str]:
        """The node's variables (rabbitmq-env's names), and its files written into ``workdir``."""
        home = os.path.join(self.workdir, "home")
        os.makedirs(home, exist_ok=True)
        cookie = os.path.join(home, ".erlang.cookie")
        if not os.path.exists(cookie):  # Erlang wants it readable by its owner only
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as file:
                file.write(f"clipmask-test-{random.SystemRandom().getrandbits(128):032x}")
        files = {
            "rabbitmq-env.conf": "",  # instead of /etc/rabbitmq/rabbitmq-env.conf (NODENAME, ports...)
            "enabled_plugins": "[].\n",
            "rabbitmq.conf": "# a private test node: see tests/services.py (RabbitServer)\n"
                             "loopback_users.guest = true\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.workdir, name), "w") as file:
                file.write(text)

        def path(name: str) -> str:
            return os.path.join(self.workdir, name)

        return {
            "HOME": home,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": path("rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": path("rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": path("advanced.config"),  # absent: none
            "RABBITMQ_ENABLED_PLUGINS_FILE": path("enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": path("mnesia"),
            "RABBITMQ_LOG_BASE": path("log"),
            "RABBITMQ_LOGS": "-",  # to stdout: the log file
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # an epmd this node starts listens on loopback only
        }

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """As _Subprocess._spawn, in a process group of its own: the start script, the Erlang
        VM and its helpers (epmd, a daemon, leaves it) go together."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env={**os.environ, **(env or {})}, start_new_session=True,
            )

    def accepts_amqp(self) -> bool:
        """Return True if the node completes an AMQP login as guest."""
        import amqp  # kombu's AMQP client, installed with Celery

        conn = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest",
                               connect_timeout=1, read_timeout=5, write_timeout=5)
        try:
            conn.connect()
            return True
        except Exception:  # noqa: BLE001 - refused, reset, handshake or login not ready yet
            return False
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: the start script stops the node cleanly (about 1 s), killed after
        RABBIT_STOP_TIMEOUT_S; SIGKILL: the whole group at once, a crash. Waits for the exit."""
        if self._proc is None:
            return
        group = self._proc.pid
        if self._proc.poll() is None:
            if how == signal.SIGKILL:
                _kill_group(group)
            else:
                self._proc.send_signal(how)
            try:
                self._proc.wait(timeout=RABBIT_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(group)  # whatever is left: a VM that would not stop, erl_child_setup, ...
        self._proc.wait()
        self._proc = None


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of a process group; nothing if there is none left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
