"""Celery tasks: small functions that call into ``Pipeline``, ``JobFiles`` and ``JobIndex``.

Delivery is at least once (``acks_late``), and the healing check may send a chunk again: every
task here may run twice for the same chunk, and must then leave the same files and the same
counts. Output keys and result files are deterministic, and a chunk is counted once, when its
bit in the job's bitmap goes from 0 to 1.

A chunk that cannot finish now (storage away, an image's request failing, Redis away) runs again
later with what its attempts learnt (``tasks/jobs/retries.py``: which images are done, and the
budgets: hours while storage is away, 8 retries otherwise); past them, the images it left are
recorded failed with the reason. A job over WebDataset shards has a shard per chunk: the same
task masks it into its output shard (``tasks/pipeline/shard_chunk.py``), and runs it again whole
when storage failed it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import redis
from celery import signals
from celery.utils.log import get_task_logger
from kombu.exceptions import OperationalError

from storage import ObjectStore, open_store
from storage.availability import StorageUnavailableError, check_marker, is_unavailable, missing_marker
from tasks import webhooks
from tasks.errors import IncompleteJobError, UsageError
from tasks.jobs import healing, scans
from tasks.jobs.files import JobFiles, count_statuses
from tasks.jobs.index import JobIndex
from tasks.jobs.manifest import write_job_manifest, write_summary
from tasks.jobs.planning import send_claims
from tasks.jobs.queue import send_finish
from tasks.jobs.retries import (
    CHUNK_RETRIES,
    SKIPPED,
    SUCCEEDED,
    TODO,
    Decision,
    RetryState,
    backoff,
    decide,
    storage_answers,
)
from tasks.pipeline import Outcome, Pipeline, kept_outcome
from tasks.pipeline.shard_chunk import mask_shard_chunk
from tasks.redact import install_log_redaction
from worker import lifecycle, metrics
from worker.celery_app import app
from worker.errors import DeviceError, ModelUnavailableError
from worker.spec import MaskSpec

log = get_task_logger(__name__)

#: Errors after which the whole chunk runs again later (by any worker): storage or Redis away
#: after their own retries, or this worker cannot set up its model or device; and a local
#: folder that says it is away (``storage.availability``: a full disk, a share gone).
RETRY_ON = (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError, ModelUnavailableError,
            DeviceError)
#: The marks of ``RetryState.kept`` by status, and back.
_MARKS = {"succeeded": SUCCEEDED, "skipped": SKIPPED}
_STATUSES = {SUCCEEDED: "succeeded", SKIPPED: "skipped"}

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


def _worth_retrying(err: BaseException) -> bool:
    return isinstance(err, RETRY_ON) or is_unavailable(err)


class _RunAgain(Exception):
    """The chunk runs again later, as ``decision`` says; ``reason`` is why it did not finish,
    ``away`` why storage counts as away (None: it answers; empty: ``reason`` says so)."""

    def __init__(self, decision: Decision, reason: str, away: str | None):
        super().__init__(reason)
        self.decision, self.reason, self.away = decision, reason, away


@lru_cache(maxsize=64)
def _job_record(dest: str, job_id: str) -> dict:
    """The job's ``job.json`` (what was asked), read once per process and job."""
    return JobFiles(open_store(dest), job_id).read_job()


@app.task(name="clipmask.mask_chunk", bind=True, max_retries=None, ignore_result=True)
def mask_chunk(self, job_id: str, chunk: int, dest: str, size: int, **retry) -> dict:
    """Mask chunk ``chunk`` of job ``job_id`` (its keys are in the plan under ``dest``), write
    its results file, then count it in the job's index. Returns the chunk's counts. ``retry``:
    what earlier attempts learnt (``RetryState``), in the messages of its retries; ``max_retries``
    is None because ``tasks.jobs.retries.decide`` keeps the budgets."""
    context = f"job {job_id} chunk {chunk} task {self.request.id}"
    jobs, files = JobIndex.from_env(patient=True), JobFiles(open_store(dest), job_id)
    state = RetryState.from_kwargs(retry)
    try:
        counts = _counts_of_chunk(self, jobs, files, chunk, size, context, state)
        code, claims = jobs.record_chunk(job_id, chunk, counts)
        _send_next(job_id, dest, claims, code == 2, context)
        if code == -1:
            log.warning("[%s] Redis does not know the job; its results are in storage: rebuild its "
                        "records with: clipmask resume %s --out %s", context, job_id, dest)
    except _RunAgain as again:
        _run_again(self, jobs, job_id, chunk, again, context)
    except RETRY_ON as err:  # counting it: its results are written, the next attempt counts them
        decision = decide(state, state.kept, False, time.time())
        if decision.state is None:
            raise
        _run_again(self, jobs, job_id, chunk, _RunAgain(decision, f"{type(err).__name__}: {err}", None), context)
    (log.warning if counts.get("failed") else log.info)("[%s] chunk done: %s", context, counts)
    return counts


def _run_again(task, jobs: JobIndex, job_id: str, chunk: int, again: _RunAgain, context: str):
    """Log why, note the retry in the job's index (the healing check leaves the chunk to it, and
    ``clipmask status`` shows it), and send the retry: a Celery retry with a countdown."""
    delay = again.decision.delay
    away = "" if again.away is None else f"; storage is away{f' ({again.away})' if again.away else ''}"
    log.warning("[%s] chunk runs again in %d s%s; %s", context, delay, away, again.reason)
    try:
        jobs.note_retry(job_id, chunk, time.time() + delay, f"{again.reason}{away}")
    except redis.RedisError as err:  # the retry is what matters
        log.warning("[%s] could not note the retry in Redis: %s", context, err)
    raise task.retry(exc=ConnectionError(again.reason), countdown=delay, kwargs=again.decision.state.kwargs())


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


def _counts_of_chunk(task, jobs: JobIndex, files: JobFiles, chunk: int, size: int, context: str,
                     state: RetryState) -> dict:
    """``_run_chunk``. When it fails on something worth retrying: ``_RunAgain``, or past the
    budgets every input it left failed with the reason; when it cannot succeed at all (a spec no
    worker accepts): every input failed with the reason. A job always finishes."""
    try:
        return _run_chunk(task, jobs, files, chunk, size, context, state)
    except _RunAgain:
        raise
    except Exception as err:  # run again later, or recorded for every input left
        reason = f"{type(err).__name__}: {err}"
        if not _worth_retrying(err):
            log.exception("[%s] chunk failed", context)
            return _record_failed(files, chunk, state, reason)
        from_storage = isinstance(err, (ConnectionError, TimeoutError)) or is_unavailable(err)
        away = ("" if is_unavailable(err) else _storage_away(files, _source_if_known(files))) if from_storage else None
        decision = decide(state, state.kept, away is not None, time.time())
        if decision.state is not None:
            raise _RunAgain(decision, reason, away) from err
        return _record_failed(files, chunk, state, f"{decision.reason}: {reason}")


def _run_chunk(task, jobs: JobIndex, files: JobFiles, chunk: int, size: int, context: str, state: RetryState) -> dict:
    """The chunk's counts, masking its images unless that was done or the job was cancelled; the
    images an earlier attempt brought to an end (``state.kept``) are not masked again."""
    job = jobs.get(files.job_id) or {}
    if jobs.is_done(files.job_id, chunk):
        log.info("[%s] already done (a redelivered or re-sent chunk)", context)
        return {}
    if job.get("cancelled") == "1":
        return {"skipped": size}  # the manifest lists its keys from the plan
    if files.has_results(chunk):  # done, but not counted: Redis lost it, or the worker died
        return count_statuses(files.read_results(chunk))
    try:
        record = _job_record(files.dest.url, files.job_id)
        keys = files.read_plan(chunk).keys
    except FileNotFoundError as err:  # both written before the chunk was queued: DST is not what it was
        raise StorageUnavailableError(f"{missing_marker(files.dest, files.keys['job'])}: {err}") from err
    if record.get("shards"):
        return _run_shard_chunk(files, chunk, record, keys[0], context, state, _deadline(task))
    kept = state.kept_for(len(keys))
    source, spec = open_store(record["source"]), MaskSpec.from_dict(record["spec"])
    marker = None if files.dest.networked else files.keys["job"]  # a local DST: still the job's folder?
    skip_existing = record["skip_existing"] and not record.get("planned_new")  # else its plan holds what is new
    pipeline = Pipeline(lifecycle.engine(), source, files.dest, spec, skip_existing, context, _deadline(task),
                        dest_marker=marker)
    fresh = pipeline.run([key for key, mark in zip(keys, kept) if mark == TODO])
    outcomes = [next(fresh) if mark == TODO else kept_outcome(source, files.dest, spec, key, _STATUSES[mark])
                for key, mark in zip(keys, kept)]
    transient = [o for o in outcomes if o.transient]
    if transient:
        marks = "".join(_MARKS.get(o.status, TODO) for o in outcomes)
        said = [o for o in transient if o.away]  # a failure that says the store is away: no probe
        away = "" if said else _storage_away(files, source)
        decision = decide(state, marks, away is not None, time.time())
        reason = f"{len(transient)} image(s) not done, e.g. {(said or transient)[0].error}"
        if decision.state is not None:
            raise _RunAgain(decision, reason, away)
        outcomes = [replace(o, error=f"{decision.reason}: {o.error}") if o.transient else o for o in outcomes]
    _write_results(files, chunk, outcomes)
    return dict(Counter(outcome.status for outcome in outcomes))


def _run_shard_chunk(files: JobFiles, chunk: int, record: dict, key: str, context: str, state: RetryState,
                     deadline: float | None) -> dict:
    """A chunk that is one WebDataset shard: masked into the output shard of the same key
    (``mask_shard``), its samples' rows the chunk's results. A shard that failed because storage
    did (away, not answering, a request that failed) runs again whole, within the budgets of any
    chunk (its output shard was not written); one that is not a whole tar, or that the task's
    time limit (``deadline``) ended, is recorded, its samples failed with the reason."""
    source, spec = open_store(record["source"]), MaskSpec.from_dict(record["spec"])
    result, errors = mask_shard_chunk(lifecycle.engine(), spec, source, key, files.dest, context,
                                      image_column=record["shards"].get("image_column"), deadline=deadline)
    rows = list(result.rows())
    transient = [err for err in errors if _worth_retrying(err)]
    if transient:
        said = any(is_unavailable(err) for err in transient)  # a failure that says the store is away: no probe
        away = "" if said else _storage_away(files, source)
        decision = decide(state, TODO, away is not None, time.time())
        if decision.state is not None:
            raise _RunAgain(decision, f"shard {result.shard} not done: {result.error}", away)
        rows = [{**row, "error": f"{decision.reason}: {row['error']}"} for row in rows]
    _write_rows(files, chunk, rows)
    return dict(Counter(row["status"] for row in rows))


def _write_results(files: JobFiles, chunk: int, outcomes: list[Outcome]) -> None:
    _write_rows(files, chunk, [outcome.row() for outcome in outcomes])


def _write_rows(files: JobFiles, chunk: int, rows: list[dict]) -> None:
    """The chunk's results file, once a local DST is known to be the job's folder still: written to
    the bare mount point of an unmounted share, it would be hidden once the share is back, and
    the job could never write its manifest."""
    if not files.dest.networked:
        check_marker(files.dest, files.keys["job"])
    files.write_results(chunk, rows)


def _storage_away(files: JobFiles, source: ObjectStore | None) -> str | None:
    """Why storage counts as away after failed or stalled requests, or None: DST does not
    answer a probe of the job's ``job.json`` (or no longer has it), or the source one of its own."""
    return storage_answers(files.dest, files.keys["job"], must_exist=True) or (
        storage_answers(source) if source is not None else None)


def _source_if_known(files: JobFiles) -> ObjectStore | None:
    try:
        return open_store(_job_record(files.dest.url, files.job_id)["source"])
    except Exception:  # noqa: BLE001 - DST away too: the probe of DST says so
        return None


def _record_failed(files: JobFiles, chunk: int, state: RetryState, reason: str) -> dict:
    """Every input of the chunk failed with ``reason``, but those an earlier attempt brought to an
    end (``state.kept``); returns the counts."""
    record = _job_record(files.dest.url, files.job_id)
    source, keys = open_store(record["source"]), files.read_plan(chunk).keys
    if record.get("shards"):  # the shard was not read: one row for it, without a key
        url = source.url_for(keys[0])
        _write_rows(files, chunk, [{"source": url, "status": "failed", "error": reason, "shard": url, "key": None}])
        return {"failed": 1}
    kept = state.kept_for(len(keys))
    spec = MaskSpec.from_dict(record["spec"]) if kept.strip(TODO) else None  # (a spec no worker takes: none kept)
    outcomes = [Outcome(key, source.url_for(key), "failed", error=reason) if mark == TODO
                else kept_outcome(source, files.dest, spec, key, _STATUSES[mark]) for key, mark in zip(keys, kept)]
    _write_results(files, chunk, outcomes)
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
        counter = write_job_manifest(files, open_store(record["source"]), planned["chunks"], cancelled,
                                     shards=bool(record.get("shards")))
        summary = write_summary(files, record, counter.counts, "cancelled" if cancelled else "finished",
                                up_to_date=planned.get("up_to_date", 0))
        _job_callback(files, job_id, summary)
        jobs.mark_finished(job_id, counter.counts, counter.total, summary["manifest"])
    except IncompleteJobError as err:
        log.warning("[job %s] not finished: %s; the healing check sends the missing chunks again", job_id, err)
        return None
    except RETRY_ON as err:
        raise self.retry(exc=err, countdown=backoff(self.request.retries))
    log.info("[job %s] finished: %s, manifest %s", job_id, counter.counts, summary["manifest"])
    return counter.counts


@app.task(name="clipmask.mask_image", bind=True, max_retries=CHUNK_RETRIES)
def mask_image(self, source: str, key: str, dest: str, spec: dict, callback_url: str | None = None) -> dict:
    """Backend offload: mask one image, return its manifest row plus its metadata record; with
    ``callback_url``, also POST it there (``tasks/webhooks.py``), a failure after the last retry too."""
    try:
        pipeline = Pipeline(lifecycle.engine(), open_store(source), open_store(dest),
                            MaskSpec.from_dict(spec), context=f"task {self.request.id}", deadline=_deadline(self))
        outcome: Outcome = next(iter(pipeline.run([key])))
        if outcome.transient and self.request.retries < self.max_retries:
            raise ConnectionError(outcome.error)
        result = {**outcome.row(), "metadata": outcome.metadata}
        if callback_url:
            _callback(callback_url, f"mask_{self.request.id}", "mask.finished",
                      webhooks.mask_result(self.request.id, result))
    except RETRY_ON as err:
        if callback_url and self.request.retries >= self.max_retries:  # the last attempt: the caller hears of it
            failed = {"source": open_store(source).url_for(key), "status": "failed",
                      "error": f"{type(err).__name__}: {err}"}
            try:
                _callback(callback_url, f"mask_{self.request.id}", "mask.finished",
                          webhooks.mask_result(self.request.id, failed))
            except ConnectionError as lost:
                log.error("[task %s] callback to %s not queued: %s", self.request.id, callback_url, lost)
        raise self.retry(exc=err, countdown=backoff(self.request.retries))
    return result


def _callback(url: str, msg_id: str, event_type: str, data: dict) -> None:
    """Queue a callback's delivery; the broker away is a ``ConnectionError`` (the task runs again)."""
    try:
        webhooks.send(url, msg_id, event_type, data)
    except OperationalError as err:
        raise ConnectionError(f"could not queue the callback to {url}: {err}") from err


def _job_callback(files: JobFiles, job_id: str, summary: dict) -> None:
    """The job's callback, when it was submitted with one (``DST/_jobs/<id>/callback.json``)."""
    try:
        url = json.loads(files.dest.read_bytes(webhooks.job_callback_key(job_id)))["url"]
    except FileNotFoundError:
        return
    _callback(url, f"job_{job_id}", "job.finished", {"job_id": job_id, **summary})


@app.task(name=webhooks.DELIVER, bind=True, max_retries=None, ignore_result=True)
def deliver_webhook(self, url: str, msg_id: str, event_type: str, data: dict, first_try: float | None = None) -> None:
    """POST one callback, signed (``tasks/webhooks.py``); tried again with back-off for an hour."""
    first_try = first_try or time.time()
    try:
        status = webhooks.deliver(url, msg_id, webhooks.message(event_type, data), webhooks.secret_key())
    except UsageError as err:  # no secret on this worker: trying again changes nothing
        log.error("callback %s to %s not sent: %s", msg_id, url, err)
        return
    except webhooks.DeliveryError as err:
        delay = webhooks.retry_delay(self.request.retries, first_try)
        if delay is None:
            log.error("callback %s to %s given up after %d s: %s", msg_id, url, webhooks.RETRY_FOR_S, err)
            return
        log.warning("callback %s: %s; tried again in %.0f s", msg_id, err, delay)
        raise self.retry(countdown=delay, kwargs={"first_try": first_try}) from None
    log.info("callback %s delivered to %s (%d)", msg_id, url, status)


@app.task(name="clipmask.scheduled_scan")
def scheduled_scan(source: str, dest: str, prompt: str, negative: str | None = None, **options) -> str | None:
    """For ``celery beat``: submit a job over ``source`` that skips already-masked images, unless
    the entry's last job has not finished or nothing is new; returns the job's id, or None
    (``tasks/jobs/scans.py``)."""
    return scans.run_scan(source, dest, prompt, negative, **options)
