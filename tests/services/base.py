"""What the test servers share: a free port, and a server subprocess with its log in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

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
