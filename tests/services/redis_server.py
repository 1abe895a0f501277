"""A private redis-server for the tests, restartable on the same port."""

from __future__ import annotations

import shutil
import socket

from tests.services.base import _Subprocess, free_port


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
