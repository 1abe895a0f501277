"""Real services for the tests: a private redis-server and a moto S3 server.

Each runs as a subprocess on a free port on 127.0.0.1. Nothing here touches
a Redis on the default port 6379.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

__all__ = ["MotoServer", "RedisServer", "free_port", "s3_test_env"]

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

    def stop(self) -> None:
        """Terminate the server (kill after 5 s) and wait for it to exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
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
    """A throwaway redis-server (no persistence); restartable on the same port."""

    def __init__(self, port: int | None = None, workdir: str | None = None) -> None:
        super().__init__("redis-server", workdir)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start (or restart) the server; RuntimeError if it cannot start."""
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "redis-server is not on PATH; run the tests with the test command "
                "from the README, which installs it")
        if not self.running:
            self._spawn([executable, "--port", str(self.port), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--dir", self.workdir])
            self._wait_ready(self.ping)
        return self

    def ping(self) -> bool:
        """Return True if the server answers PING with PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
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
