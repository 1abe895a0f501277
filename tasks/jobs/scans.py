"""A scheduled scan: one job of a schedule entry at a time, and none when nothing is new.

Each run of ``clipmask.scheduled_scan`` (sent by beat, ``tasks/jobs/schedule.py``) does, holding
the entry's lock in Redis (``tasks/jobs/lease.py``; two beats firing the same entry meet there):

1. read the entry's last job: ``DST/_jobs/schedule-<entry>.json`` (durable), else its copy in Redis;
2. if that job has not finished (no manifest in Redis, no ``summary.json`` in storage), submit
   nothing and log why; a job whose planning was interrupted, or whose records Redis lost, is
   resumed (as ``clipmask resume``), so that it finishes and the schedule goes on;
3. else submit a job with ``skip_existing``, recording its id as the entry's last job as soon as
   it is named, before anything is listed. A source without images, or whose images all have
   up-to-date records (``NothingNewError``), creates no job; the last job stays what it was.

Every run is counted in ``clipmask_scans_total{entry, result}``: submitted, nothing_new, busy,
no_images or failed.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

from storage import ObjectStore, open_store
from storage.layout import JOBS_PREFIX, job_keys
from tasks import settings
from tasks.errors import NoImagesError, NothingNewError, PlanningBusyError
from tasks.jobs.index import JobIndex, job_status, now_iso, planning_interrupted
from tasks.jobs.lease import Lease
from tasks.jobs.planning import resume_job, submit_job
from tasks.jobs.schedule import entry_id
from worker.spec import MaskSpec

log = logging.getLogger(__name__)

RESULTS = ("submitted", "nothing_new", "busy", "no_images", "failed")
LOCK = "clipmask:lock:scan:"
#: Redis's copy of an entry's last job (storage holds the record).
LAST_JOB = "clipmask:scan:"


def last_job_key(entry: str) -> str:
    """Where DST records the entry's last job: ``_jobs/schedule-<entry>.json``."""
    return f"{JOBS_PREFIX}schedule-{entry}.json"


@lru_cache(maxsize=1)
def scans_counter():
    from prometheus_client import Counter  # here: a worker process's metrics mode is set by then

    return Counter("clipmask_scans", "Scheduled scans by result: submitted, nothing_new, busy, no_images, failed",
                   ("entry", "result"))


def run_scan(source: str, dest: str, prompt: str, negative: str | None = None, **options) -> str | None:
    """One scheduled scan of ``source`` into ``dest`` (options: ``chunk_size`` and the mask
    options); returns the id of the job it submitted, or None."""
    entry = entry_id({"source": source, "dest": dest, "prompt": prompt, "negative": negative, **options})
    context = f"scheduled scan {entry} ({source} -> {dest})"
    result = "failed"
    try:
        job_id, result = _scan(entry, context, source, dest, prompt, negative, options)
        return job_id
    finally:
        scans_counter().labels(entry=entry, result=result).inc()


def _scan(entry: str, context: str, source: str, dest: str, prompt: str, negative: str | None,
          options: dict) -> tuple[str | None, str]:
    jobs, store = JobIndex.from_env(), open_store(dest)
    last = LastJob(jobs, store, entry)
    with Lease(jobs.redis, LOCK + entry) as lease:
        previous = last.read()
        if not lease.held:
            log.info("%s: nothing submitted: another scan of this entry is running (%s; last job %s)", context,
                     lease.holder, previous["job_id"] if previous else "none")
            return None, "busy"
        if previous and (why := unfinished(jobs, store, previous["job_id"])):
            log.info("%s: nothing submitted: job %s has not finished (%s)", context, previous["job_id"], why)
            return None, "busy"
        options = dict(options)
        chunk_size = options.pop("chunk_size", settings.DEFAULT_CHUNK_SIZE)
        spec = MaskSpec.from_text(prompt, negative, **options)
        named: list[str] = []

        def record(job_id: str) -> None:  # before anything is listed: a scan that dies planning leaves it
            last.write({"entry": entry, "job_id": job_id, "source": source, "dest": dest, "submitted_at": now_iso()})
            named.append(job_id)

        try:
            job_id = submit_job(source, dest, spec, chunk_size=chunk_size, skip_existing=True, jobs=jobs,
                                on_named=record)
        except (NothingNewError, NoImagesError) as err:
            if named:  # no job was created: the last job is still the one before
                last.write(previous)
            if isinstance(err, NoImagesError):
                log.info("%s: no job: %s", context, err)
                return None, "no_images"
            log.info("%s: nothing new: %d image(s) up to date, no job created", context, err.up_to_date)
            return None, "nothing_new"
    log.info("%s: submitted job %s", context, job_id)
    return job_id, "submitted"


def unfinished(jobs: JobIndex, store: ObjectStore, job_id: str) -> str | None:
    """Why job ``job_id`` under ``store`` has not finished, or None when it has (or was never
    created: its submit found nothing, or died before writing ``job.json``). A job that cannot
    finish by itself (its planning interrupted, its records lost by Redis) is resumed first."""
    data = jobs.get(job_id)
    keys = job_keys(job_id)
    if data is not None:
        if data.get("manifest"):
            return None
        if not planning_interrupted(data):
            status = job_status(job_id, data)
            planned = "" if status["planned"] else " planned so far"
            return f"{status['state']}: {status['done']} of {status['total']} image(s){planned} done"
        return _resumed(jobs, store, job_id, "its planning was interrupted")
    if store.exists(keys["summary"]) or not store.exists(keys["job"]):
        return None
    return _resumed(jobs, store, job_id, "Redis had lost its records")


def _resumed(jobs: JobIndex, store: ObjectStore, job_id: str, why: str) -> str:
    try:
        done = resume_job(job_id, store.url, jobs=jobs)
    except PlanningBusyError as err:
        return str(err)
    log.warning("job %s: %s; resumed it as `clipmask resume %s --out %s` would: %d key(s) planned, %d chunk(s) "
                "sent again", job_id, why, job_id, store.url, done["planned"], done["requeued"])
    return f"{why}; resumed"


class LastJob:
    """An entry's last job: ``{"entry", "job_id", "source", "dest", "submitted_at"}`` in DST (the
    record), with a copy in Redis that serves when DST has none."""

    def __init__(self, jobs: JobIndex, store: ObjectStore, entry: str):
        self.redis, self.store, self.entry = jobs.redis, store, entry
        self.key = last_job_key(entry)

    def read(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(self.key))
        except FileNotFoundError:
            copy = self.redis.get(LAST_JOB + self.entry)
            return json.loads(copy) if copy else None

    def write(self, record: dict | None) -> None:
        """Record ``record``; None: the entry has no last job."""
        if record is None:
            self.store.delete(self.key)
            self.redis.delete(LAST_JOB + self.entry)
            return
        data = json.dumps(record, sort_keys=True)
        self.store.write_bytes(self.key, data.encode(), "application/json")
        self.redis.set(LAST_JOB + self.entry, data)
