"""Jobs heal themselves: chunks lost with a Redis restart, a dropped message or a dead worker
are sent again, without a human.

Every worker runs ``heal_jobs`` every ``heal_interval()`` seconds in a thread of its main process;
a lock in Redis lets one worker per interval do it. A job is healed when none of its chunks has
finished for a visibility timeout (``CLIPMASK_VISIBILITY_TIMEOUT``, longer than any task) and
clipmask's queue is empty: then every queued chunk without a result is sent again (a duplicate of
a chunk that was not lost returns at once), the window is filled again, or, if the job is
complete, the finishing step is sent (that one whatever the queue holds). A chunk waiting to run
again (storage away: ``tasks/jobs/retries.py``) is held by a worker until its countdown ends, not
queued, so it would look lost: each retry notes when it is due (``retry_due``), and the quiet
period of its job counts from then, so the job is healed only if the retry neither ran nor was
sent again a visibility timeout after it was due (its message lost). A job whose planning
was interrupted is healed as far as it was planned; ``clipmask resume`` plans the rest. Workers
heal only the jobs of their own queue (``CLIPMASK_QUEUE``), and messages go to the job's queue.

Healing escalates: each heal without progress in between is counted in the job's index; from
``STUCK_AFTER_HEALS`` on, the job is logged as an error with what it waits for, counted in the
``clipmask_jobs_stuck`` metric, and ``clipmask status`` says "no progress for 6 min; chunk 17
sent again 5 times".
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from celery import bootsteps

from tasks import settings
from tasks.jobs.index import JobIndex, healing_state, is_complete, waiting_note
from tasks.jobs.planning import requeue_missing
from tasks.jobs.queue import default_queue, queued_messages
from worker.celery_app import visibility_timeout

log = logging.getLogger(__name__)


def heal_interval() -> int:
    """Seconds between checks: ``CLIPMASK_HEAL_INTERVAL``, else a quarter of the visibility
    timeout, between 5 s and a minute."""
    return settings.HEAL_INTERVAL.get() or min(60, max(5, visibility_timeout() // 4))


def heal_jobs(jobs: JobIndex, quiet_s: float, queued: Callable[[], int] = queued_messages) -> list[str]:
    """Send again what the quiet, unfinished jobs miss; returns the ids of the jobs healed."""
    healed, waiting = [], None
    for job_id in jobs.active():
        data = jobs.get(job_id)
        if not data or data.get("manifest"):
            jobs.forget(job_id)
            continue
        if data.get("queue", default_queue()) != default_queue():
            continue  # another pool's job: its own workers heal it
        last = max(float(data.get(name) or 0) for name in ("created_ts", "last_progress", "healed_at", "retry_due"))
        if time.time() - last < quiet_s:
            continue
        if not is_complete(data):  # a lost finishing step is sent again whatever the queue holds
            waiting = queued() if waiting is None else waiting
            if waiting:
                continue  # lost chunks are sent again once the queue has drained
        sent = requeue_missing(jobs, job_id, data)
        report = healing_state(jobs.get(job_id) or data)
        if report["stuck"]:
            log.error("job %s is stuck: %s; waiting for %s", job_id, waiting_note(report), _waiting_for(data, sent))
        else:
            log.warning("job %s: %s", job_id, waiting_note(report))
        healed.append(job_id)
    return healed


def _waiting_for(data: dict, sent: list[int]) -> str:
    if not sent:
        return "the finishing step to write the manifest (every chunk has its results)"
    return (f"{len(sent)} chunk(s) of {data.get('chunks')} to report their results: is a worker consuming queue "
            f"{data.get('queue', default_queue())!r}? (clipmask_watchdog_exits_total, the workers' logs)")


class HealingStep(bootsteps.StartStopStep):
    """A worker bootstep: runs ``heal_jobs`` in a daemon thread while the worker runs."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker) -> None:
        self._thread = threading.Thread(target=self._loop, name="clipmask-healing", daemon=True)
        self._thread.start()

    def stop(self, worker) -> None:
        self._stop.set()

    def _loop(self) -> None:
        interval, quiet = heal_interval(), visibility_timeout()
        jobs = None
        while not self._stop.wait(interval):
            try:
                jobs = jobs or JobIndex.from_env()
                if jobs.take_turn("heal", interval * 0.9):
                    heal_jobs(jobs, quiet)
            except Exception as err:  # noqa: BLE001 - Redis or the broker away: try next time
                log.warning("healing check skipped: %s", err)
