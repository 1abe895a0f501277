"""A worker process that stops running tasks exits, so that a fresh one takes its place.

A worker can look alive and do nothing: connected, its threads waiting, while the job it was
given waits for ever. Two shapes of it are watched for:

- **held**: it holds messages it received and has not started, for longer than
  ``CLIPMASK_WATCHDOG_HELD_S`` (default 120 s), while some of its task slots are free (a
  received message normally starts within milliseconds);
- **idle**: it has started nothing for ``CLIPMASK_WATCHDOG_IDLE_S`` (default the visibility
  timeout) while task slots are free and its queue has messages ready for it (its consumer no
  longer takes deliveries).

A thread of the worker process looks every few seconds (``WatchdogStep``). When one of these
holds, it logs why (``watchdog: ...``), counts it (``clipmask_watchdog_exits_total{reason}``) and
ends the process at once: tasks are acknowledged late, so the broker hands everything it held
to other workers (RabbitMQ as its connection closes, Redis after the visibility timeout), and
``clipmask worker``'s supervisor starts a fresh process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from celery import bootsteps
from celery.worker import state

from worker import settings
from worker.celery_app import ready_messages, visibility_timeout

log = logging.getLogger("clipmask.watchdog")

#: Exit status of a process the watchdog ends (the supervisor restarts it like any other).
EXIT_CODE = 75


class Watchdog:
    """Decides, from what the worker holds and runs, whether it is stuck; no I/O of its own but
    ``ready_messages``, asked only when the worker has been idle too long.

    ``check`` is called every few seconds with the task slots, the ids of the tasks running, the
    ids received and not started, and how many tasks the process has started so far; it returns
    the reason to exit, or None.
    """

    def __init__(self, held_s: float, idle_s: float, ready_messages: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic):
        self.held_s, self.idle_s, self.ready_messages, self.clock = held_s, idle_s, ready_messages, clock
        self._waiting_since: dict[str, float] = {}
        self._started, self._idle_since = -1, clock()

    def check(self, slots: int, running: int, waiting: set[str], started: int) -> str | None:
        now = self.clock()
        free = slots - running
        self._waiting_since = {task: self._waiting_since.get(task, now) for task in waiting}
        if free > 0 and self._waiting_since:
            held = now - min(self._waiting_since.values())
            if held > self.held_s:
                return (f"held: {len(waiting)} message(s) received and not started for {held:.0f}s while "
                        f"{free} of {slots} task slots are free")
        if started != self._started or free <= 0:
            self._started, self._idle_since = started, now
            return None
        idle = now - self._idle_since
        if idle > self.idle_s:
            try:
                ready = self.ready_messages()
            except Exception as err:  # noqa: BLE001 - the broker away: nothing to decide on
                log.info("watchdog: cannot count the queue's ready messages: %s", err)
                return None
            if ready:
                return (f"idle: no task started for {idle:.0f}s while {free} of {slots} task slots are free "
                        f"and its queue has {ready} message(s) ready")
        return None


class WatchdogStep(bootsteps.StartStopStep):
    """A worker bootstep: runs the ``Watchdog`` in a daemon thread of the worker process."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()

    def start(self, worker) -> None:
        queue = worker.app.conf.task_default_queue
        held = settings.WATCHDOG_HELD_S.get()
        idle = settings.WATCHDOG_IDLE_S.get() or visibility_timeout()
        watchdog = Watchdog(held, idle, lambda: ready_messages(queue))
        interval = max(1.0, min(30.0, min(held, idle) / 4))
        threading.Thread(target=self._loop, args=(watchdog, worker, interval), name="clipmask-watchdog",
                         daemon=True).start()

    def stop(self, worker) -> None:
        self._stop.set()

    def _loop(self, watchdog: Watchdog, worker, interval: float) -> None:
        while not self._stop.wait(interval):
            running = {request.id for request in list(state.active_requests)}
            waiting = {request.id for request in list(state.reserved_requests)} - running
            reason = watchdog.check(worker.concurrency, len(running), waiting, state.all_total_count[0])
            if reason and not self._stop.is_set():
                exit_stuck(reason)


def exit_stuck(reason: str) -> None:
    """Log and count why, then end this process without cleaning up (its consumer may be wedged)."""
    log.error("watchdog: %s; exiting, so that the broker hands its messages to other workers and a "
              "fresh worker process takes its place", reason)
    from prometheus_client import Counter  # here: the process's metrics mode is set by then

    Counter("clipmask_watchdog_exits", "Worker processes ended by the watchdog, by reason",
            ("reason",)).labels(reason=reason.split(":", 1)[0]).inc()
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os._exit(EXIT_CODE)
