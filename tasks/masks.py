"""Celery tasks: small functions that call into ``Pipeline``, ``JobFiles`` and ``JobIndex``.

Delivery is at least once (``acks_late``), and the healing check may send a chunk again: every
task here may run twice for the same chunk, and must then leave the same files and the same
counts. Output keys and result files are deterministic, and a chunk is counted once, when its
bit in the job's bitmap goes from 0 to 1.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import lru_cache

import redis
from celery import signals
from celery.utils.log import get_task_logger
from kombu.exceptions import OperationalError

from storage import open_store
from tasks.errors import IncompleteJobError
from tasks.jobs import healing
from tasks.jobs.files import JobFiles, count_statuses
from tasks.jobs.index import JobIndex
from tasks.jobs.manifest import write_job_manifest, write_summary
from tasks.jobs.planning import send_claims
from tasks.jobs.queue import send_finish
from tasks.pipeline import Outcome, Pipeline
from tasks.redact import install_log_redaction
from worker import lifecycle, metrics
from worker.celery_app import app
from worker.errors import DeviceError, ModelUnavailableError
from worker.spec import MaskSpec

log = get_task_logger(__name__)

#: Errors after which the whole chunk runs again later (by any worker): storage or Redis away
#: after their own retries, or this worker cannot set up its model or device.
RETRY_ON = (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError, ModelUnavailableError,
            DeviceError)
#: Retries of a chunk, and the seconds before the first; the delay doubles up to ten minutes, so
#: the last retry comes about an hour after the first failure.
CHUNK_RETRIES = 8
RETRY_BACKOFF_S = 5

app.steps["worker"].add(healing.HealingStep)


@signals.worker_process_shutdown.connect
def _metrics_of_dead_process(pid=None, **_kwargs) -> None:
    metrics.mark_process_dead(pid)


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_logs(logger=None, **_kwargs) -> None:
    install_log_redaction(logger)


def _deadline(task) -> float | None:
    """When the task's soft time limit passes (``time.monotonic()``): the pipeline enforces it,
    as the threads pool (which lets a worker's tasks share device batches) does not."""
    limit = (task.request.timelimit or (None, None))[1] or app.conf.task_soft_time_limit
    return time.monotonic() + limit if limit else None


def _retry_delay(retries: int) -> int:
    return min(600, RETRY_BACKOFF_S * 2 ** retries)


@lru_cache(maxsize=64)
def _job_record(dest: str, job_id: str) -> dict:
    """The job's ``job.json`` (what was asked), read once per process and job."""
    return JobFiles(open_store(dest), job_id).read_job()


@app.task(name="clipmask.mask_chunk", bind=True, max_retries=CHUNK_RETRIES, ignore_result=True)
def mask_chunk(self, job_id: str, chunk: int, dest: str, size: int) -> dict:
    """Mask chunk ``chunk`` of job ``job_id`` (its keys are in the plan under ``dest``), write
    its results file, then count it in the job's index. Returns the chunk's counts."""
    context = f"job {job_id} chunk {chunk} task {self.request.id}"
    jobs, files = JobIndex.from_env(patient=True), JobFiles(open_store(dest), job_id)
    try:
        counts = _counts_of_chunk(self, jobs, files, chunk, size, context)
        code, claims = jobs.record_chunk(job_id, chunk, counts)
        _send_next(job_id, dest, claims, code == 2, context)
        if code == -1:
            log.warning("[%s] Redis does not know the job; its results are in storage: rebuild its "
                        "records with: clipmask resume %s --out %s", context, job_id, dest)
    except RETRY_ON as err:
        log.warning("[%s] transient failure, chunk retried in %ds: %s", context, _retry_delay(self.request.retries),
                    err)
        raise self.retry(exc=err, countdown=_retry_delay(self.request.retries))
    (log.warning if counts.get("failed") else log.info)("[%s] chunk done: %s", context, counts)
    return counts


def _send_next(job_id: str, dest: str, claims: list[tuple[int, int]], finish: bool, context: str) -> None:
    """Queue the job's next chunks (as this one leaves the window) or its finishing step. With the
    broker away this chunk still counts: what was not sent is sent again by the healing check."""
    try:
        send_claims(job_id, dest, claims)
        if finish:
            send_finish(job_id, dest)
    except OperationalError as err:
        log.warning("[%s] could not queue %s (broker away: %s); the healing check sends %s again",
                    context, "the finishing step" if finish else f"{len(claims)} next chunk(s)", err,
                    "it" if finish else "them")


def _counts_of_chunk(task, jobs: JobIndex, files: JobFiles, chunk: int, size: int, context: str) -> dict:
    """``_run_chunk``, or, when it cannot succeed, every input of the chunk failed with the reason:
    a job always finishes."""
    try:
        return _run_chunk(task, jobs, files, chunk, size, context)
    except RETRY_ON as err:
        if task.request.retries < task.max_retries:
            raise
        reason = f"gave up after {task.max_retries} retries: {type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - recorded for every input of the chunk
        log.exception("[%s] chunk failed", context)
        reason = f"{type(err).__name__}: {err}"
    source = open_store(_job_record(files.dest.url, files.job_id)["source"])
    rows = [Outcome(key, source.url_for(key), "failed", error=reason).row() for key in files.read_plan(chunk).keys]
    files.write_results(chunk, rows)
    return {"failed": len(rows)}


def _run_chunk(task, jobs: JobIndex, files: JobFiles, chunk: int, size: int, context: str) -> dict:
    """The chunk's counts, masking its images unless that was done or the job was cancelled."""
    job = jobs.get(files.job_id) or {}
    if jobs.is_done(files.job_id, chunk):
        log.info("[%s] already done (a redelivered or re-sent chunk)", context)
        return {}
    if job.get("cancelled") == "1":
        return {"skipped": size}  # the manifest lists its keys from the plan
    if files.has_results(chunk):  # done, but not counted: Redis lost it, or the worker died
        return count_statuses(files.read_results(chunk))
    record = _job_record(files.dest.url, files.job_id)
    keys = files.read_plan(chunk).keys
    pipeline = Pipeline(lifecycle.engine(), open_store(record["source"]), files.dest,
                        MaskSpec.from_dict(record["spec"]), record["skip_existing"], context, _deadline(task))
    outcomes = list(pipeline.run(keys))
    transient = [o for o in outcomes if o.transient]
    if transient and task.request.retries < task.max_retries:
        raise ConnectionError(f"{len(transient)} image(s) met a transient storage error, e.g. {transient[0].error}")
    files.write_results(chunk, [outcome.row() for outcome in outcomes])
    return dict(Counter(outcome.status for outcome in outcomes))


@app.task(name="clipmask.finish_job", bind=True, max_retries=CHUNK_RETRIES, ignore_result=True)
def finish_job(self, job_id: str, dest: str) -> dict | None:
    """Stream the job's manifest from its chunks' results, write its summary, close its index."""
    jobs, files = JobIndex.from_env(patient=True), JobFiles(open_store(dest), job_id)
    try:
        data = jobs.info(job_id)
        if data.get("manifest"):
            return None
        record, planned = files.read_job(), files.read_planned()
        if planned is None:
            raise IncompleteJobError(f"job {job_id}: planning is not over")
        cancelled = data.get("cancelled") == "1"
        counter = write_job_manifest(files, open_store(record["source"]), planned["chunks"], cancelled)
        summary = write_summary(files, record, counter.counts, "cancelled" if cancelled else "finished")
        jobs.mark_finished(job_id, counter.counts, counter.total, summary["manifest"])
    except IncompleteJobError as err:
        log.warning("[job %s] not finished: %s; the healing check sends the missing chunks again", job_id, err)
        return None
    except RETRY_ON as err:
        raise self.retry(exc=err, countdown=_retry_delay(self.request.retries))
    log.info("[job %s] finished: %s, manifest %s", job_id, counter.counts, summary["manifest"])
    return counter.counts


@app.task(name="clipmask.mask_image", bind=True, max_retries=CHUNK_RETRIES)
def mask_image(self, source: str, key: str, dest: str, spec: dict) -> dict:
    """Backend offload: mask one image, return its manifest row plus its metadata record."""
    try:
        pipeline = Pipeline(lifecycle.engine(), open_store(source), open_store(dest),
                            MaskSpec.from_dict(spec), context=f"task {self.request.id}", deadline=_deadline(self))
        outcome: Outcome = next(iter(pipeline.run([key])))
        if outcome.transient and self.request.retries < self.max_retries:
            raise ConnectionError(outcome.error)
    except RETRY_ON as err:
        raise self.retry(exc=err, countdown=_retry_delay(self.request.retries))
    return {**outcome.row(), "metadata": outcome.metadata}


@app.task(name="clipmask.scheduled_scan")
def scheduled_scan(source: str, dest: str, prompt: str, negative: str | None = None, **options) -> str | None:
    """For ``celery beat``: submit a job over ``source`` that skips already-masked images."""
    from tasks.errors import NoImagesError
    from tasks.jobs.planning import submit_job

    try:
        return submit_job(source, dest, MaskSpec.from_text(prompt, negative, **options), skip_existing=True)
    except NoImagesError as err:
        log.info("scheduled scan: %s", err)
        return None
