"""``clipmask worker``: one child ``clipmask worker --device D`` per device (or
``--processes-per-device`` of them), kept running.

Each child is a whole Celery worker with its own engine and device loop (a CUDA context per
process, made after its own start, never inherited). The parent forwards SIGTERM, SIGINT and
SIGQUIT to every child (a warm shutdown: running tasks finish), and starts again a child that
exited on its own, after a pause, as Celery's prefork pool replaces a dead pool process. That
covers a worker that gives up: Celery's consumer can stop with an "Unrecoverable error" when the
Redis broker goes away while its threads acknowledge tasks; its unacknowledged tasks are then
redelivered (visibility timeout, healing) and its replacement waits for the broker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from worker import settings

log = logging.getLogger("clipmask.worker")

#: Set in each child's environment: that ``clipmask worker`` serves its one device itself.
CHILD_ENV = "CLIPMASK_WORKER_CHILD"
#: Seconds between a child's unexpected death and its replacement.
RESTART_DELAY_S = 5


def child_command(device: str, args: argparse.Namespace, extra: list[str], tag: str | None = "") -> list[str]:
    """The ``clipmask worker`` line of the child for ``device``. With a ``tag`` (by default the
    device's, ``cuda1``; ``child_tags`` for several children), a node name given with ``-n`` gets
    it (``w@%h`` becomes ``w-cuda1@%h``), else the name is ``clipmask-cuda1@%h``; with ``None``,
    the name is left to ``extra`` and Celery."""
    extra = list(extra)
    if tag is None:
        return _worker_line(device, args, extra)
    tag = tag or device.replace(":", "")
    for flag in ("-n", "--hostname"):
        if flag in extra[:-1]:
            at = extra.index(flag) + 1
            name, _, host = extra[at].partition("@")
            extra[at] = f"{name}-{tag}@{host or '%h'}"
            break
    else:
        extra += ["-n", f"clipmask-{tag}@%h"]
    return _worker_line(device, args, extra)


def child_tags(devices: list[str]) -> list[str | None]:
    """The node-name tag of each child (``child_command``): ``None`` for a lone child, the device
    (``cuda1``) for one child per device, and the device with the child's number among that
    device's (``cuda1-0``, ``cuda1-1``) where a device has several, so that every name differs."""
    if len(devices) == 1:
        return [None]
    counts, seen, tags = Counter(devices), Counter(), []
    for device in devices:
        tag = device.replace(":", "")
        if counts[device] > 1:
            tag, seen[device] = f"{tag}-{seen[device]}", seen[device] + 1
        tags.append(tag)
    return tags


def child_env(devices: list[str]) -> dict[str, str]:
    """Environment additions of every child: where there are several, each gets its share of the
    machine's cores as torch threads (``OMP_NUM_THREADS``; torch would give each all of them),
    unless that is set already. On a GPU the threads only serve host-side tensor work."""
    if len(devices) == 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // len(devices)))}


def _worker_line(device: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", "worker", "--device", device, "--tasks", str(args.tasks),
            "--precision", args.precision, "--loglevel", args.loglevel, *extra]


def supervise_workers(devices: list[str], args: argparse.Namespace, extra: list[str]) -> int:
    """Run one child worker per entry of ``devices`` (a device listed twice gets two) until a
    shutdown signal; returns the worst exit code."""
    commands = [child_command(device, args, extra, tag) for device, tag in zip(devices, child_tags(devices))]
    # The parent serves the metrics; children only write their samples (PROMETHEUS_MULTIPROC_DIR).
    env = {**os.environ, settings.METRICS_PORT.name: "0", CHILD_ENV: "1", **child_env(devices)}
    start = lambda slot: subprocess.Popen(commands[slot], env=env)  # noqa: E731
    children = [start(slot) for slot in range(len(devices))]
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    while not stopping:
        for slot, child in enumerate(children):
            code = child.poll()
            if code is not None and not stopping:
                log.error("worker on %s exited with %s; starting it again in %ds", devices[slot], code,
                          RESTART_DELAY_S)
                time.sleep(RESTART_DELAY_S)
                if not stopping:
                    children[slot] = start(slot)
        time.sleep(0.5)
    return max((child.wait() for child in children), default=0)
