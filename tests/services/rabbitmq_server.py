"""A private RabbitMQ node for the tests, restartable on the same ports."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

from tests.services.base import _Subprocess, free_port

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
