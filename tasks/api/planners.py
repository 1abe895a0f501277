"""Planning a job submitted over HTTP, in a thread of the API process.

``POST /v1/jobs`` answers once the job is named, before anything is listed, as ``clipmask
submit`` prints the id first; the listing and planning (``tasks.jobs.planning.submit_job``) go
on in a thread of the server that took the request, which is the job's planner (its host and pid
in the job's index, its heartbeat). A plan that this server does not finish (it was killed, or
it stopped with the plan still listing after ``GRACE_S``) is interrupted as a killed ``clipmask
submit`` is: ``clipmask status`` says so, and ``POST /v1/jobs/{id}/resume`` or ``clipmask
resume`` completes it. Planning runs here rather than as a task on the workers so that it never
waits behind the chunks in the queue, and never competes with them for a worker's task slots.

At most ``LIMIT`` plans run at once in one server; past that a submit is a ``503`` to retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Plans one server runs at once.
LIMIT = 8
#: Seconds a stopping server waits for the plans it started.
GRACE_S = 30.0


@dataclass
class Plan:
    """One plan in its thread: ``job_id`` once named, then ``result`` or ``error`` once done.
    ``settled`` is set when it is named or done, whichever comes first."""

    job_id: str | None = None
    result: Any = None
    error: BaseException | None = None
    settled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def name(self, job_id: str) -> None:
        self.job_id = job_id
        self.settled.set()

    def outcome(self) -> Any:
        """The result, once done; raises the error the plan raised."""
        if self.error is not None:
            raise self.error
        return self.result


class Full(RuntimeError):
    """Raised when ``LIMIT`` plans already run in this server."""


class Planners:
    """The plans this server runs, each in a thread of its own."""

    def __init__(self, limit: int = LIMIT):
        self._free = threading.BoundedSemaphore(limit)
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.limit = limit

    def start(self, work: Callable[[Plan], Any], what: str) -> Plan:
        """Run ``work(plan)`` in a thread of its own; raises ``Full`` when ``LIMIT`` plans run."""
        if not self._free.acquire(blocking=False):
            raise Full(f"{self.limit} jobs are being planned by this server; submit again in a few seconds")
        plan = Plan()

        def run() -> None:
            try:
                plan.result = work(plan)
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the plan
                plan.error = err
                (log.warning if plan.job_id else log.info)("%s: %s: %s", what, type(err).__name__, err)
            finally:
                plan.done.set()
                plan.settled.set()
                with self._lock:
                    self._running.discard(threading.current_thread())
                self._free.release()

        thread = threading.Thread(target=run, name=f"clipmask-planner-{what}", daemon=True)
        with self._lock:
            self._running.add(thread)
        thread.start()
        return plan

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def join(self, timeout: float = GRACE_S) -> int:
        """Wait up to ``timeout`` seconds for the running plans; returns how many are left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._running)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = self.running()
        if left:
            log.warning("%d job(s) still planning as the server stops; complete them with: clipmask resume JOB", left)
        return left
