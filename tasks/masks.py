"""Celery tasks: small functions that call into ``Pipeline`` and ``JobStore``.

Delivery is at least once (``acks_late``): every task here may run twice for the same input, and
must then leave the same outputs and the same counts. Output keys are deterministic and progress
is counted with sets, so it does.
"""

from __future__ import annotations

import logging
from collections import Counter

import redis
from celery.utils.log import get_task_logger

from storage import open_store
from worker import lifecycle
from worker.celery_app import app
from worker.errors import DeviceError, ModelUnavailableError
from worker.spec import MaskSpec

from .jobs import JobStore
from .manifest import write_job_records
from .pipeline import Outcome, Pipeline

log = get_task_logger(__name__)

#: Errors after which the whole chunk is retried later (by any worker) rather than its images
#: failed: the storage or Redis is away, or this worker cannot set up its model or device.
RETRY_ON = (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError, ModelUnavailableError,
            DeviceError)
#: Seconds before the first retry; doubles with each retry up to ten minutes.
RETRY_BACKOFF_S = 5


def _retry_delay(retries: int) -> int:
    return min(600, RETRY_BACKOFF_S * 2 ** retries)


@app.task(name="clipmask.mask_chunk", bind=True, max_retries=12)
def mask_chunk(self, job_id: str, source: str, dest: str, keys: list[str], spec: dict,
               skip_existing: bool = False) -> dict:
    """Mask ``keys`` (relative to ``source``) into ``dest``; record each outcome in the job."""
    context = f"job {job_id} task {self.request.id}"
    jobs = JobStore.from_env()
    source_store, dest_store = open_store(source), open_store(dest)
    counts: Counter = Counter()
    try:
        if jobs.is_cancelled(job_id):
            _record_all(jobs, job_id, source_store, keys, counts, "skipped", "job cancelled")
        else:
            pipeline = Pipeline(lifecycle.engine(), source_store, dest_store,
                                MaskSpec.from_dict(spec), skip_existing, context)
            for outcome in pipeline.run(keys):
                jobs.record(job_id, outcome.key, outcome.row())
                counts[outcome.status] += 1
        write_job_records(jobs, job_id, dest_store)
    except RETRY_ON as err:
        if self.request.retries < self.max_retries:
            log.warning("[%s] transient failure, retrying chunk of %d: %s", context, len(keys), err)
            raise self.retry(exc=err, countdown=_retry_delay(self.request.retries))
        _give_up(jobs, job_id, source_store, dest_store, keys, counts, f"gave up after retries: {err}")
        raise
    except Exception as err:
        log.exception("[%s] chunk failed", context)
        _give_up(jobs, job_id, source_store, dest_store, keys, counts, f"{type(err).__name__}: {err}")
        raise
    log.info("[%s] chunk done: %s", context, dict(counts))
    return dict(counts)


def _give_up(jobs: JobStore, job_id: str, source, dest, keys: list[str], counts: Counter, reason: str) -> None:
    """Fail the chunk's inputs that have no outcome: otherwise the job would never finish."""
    _record_all(jobs, job_id, source, keys, counts, "failed", reason)
    write_job_records(jobs, job_id, dest)


def _record_all(jobs: JobStore, job_id: str, source, keys: list[str], counts: Counter, status: str,
                reason: str) -> None:
    """Give every input of the chunk that has no outcome yet the outcome ``status``."""
    for key in keys:
        if not jobs.has_outcome(job_id, key):
            jobs.record(job_id, key, Outcome(key, source.url_for(key), status, error=reason).row())
            counts[status] += 1


@app.task(name="clipmask.mask_image", bind=True, max_retries=12)
def mask_image(self, source: str, key: str, dest: str, spec: dict) -> dict:
    """Backend offload: mask one image, return its manifest row plus its metadata record."""
    try:
        pipeline = Pipeline(lifecycle.engine(), open_store(source), open_store(dest),
                            MaskSpec.from_dict(spec), context=f"task {self.request.id}")
        outcome = next(iter(pipeline.run([key])))
    except RETRY_ON as err:
        raise self.retry(exc=err, countdown=_retry_delay(self.request.retries))
    return {**outcome.row(), "metadata": outcome.metadata}


@app.task(name="clipmask.scheduled_scan")
def scheduled_scan(source: str, dest: str, prompt: str, negative: str | None = None, **options) -> str | None:
    """For ``celery beat``: submit a job over ``source`` that skips already-masked images."""
    from .planning import NoImagesError, submit_job

    try:
        return submit_job(source, dest, MaskSpec.from_text(prompt, negative, **options), skip_existing=True)
    except NoImagesError as err:
        log.info("scheduled scan: %s", err)
        return None
