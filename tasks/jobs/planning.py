"""Planning a job: list the source, write each chunk's keys to storage, queue the chunk.

Listing streams page by page and each chunk is written and sent as it fills, so a prefix of
millions of keys never sits in memory. The plan in storage comes first, then the Redis index,
then the message: whatever is interrupted, ``resume_job`` (``clipmask resume``) can complete it.
"""

from __future__ import annotations

import logging
import time
from itertools import chain
from typing import Callable, Iterable, Iterator

from storage import ObjectStore, open_store
from tasks import settings
from tasks.errors import NothingNewError, PlanningBusyError, UsageError
from tasks.jobs.files import JobFiles, PlanChunk, shard_set
from tasks.jobs.incremental import Scan, ShardScan, shard_keys
from tasks.jobs.index import JobIndex, new_job_id, now_iso, planning_interrupted
from tasks.jobs.listing import chunked, image_keys, no_images
from tasks.jobs.preflight import check_writable, shard_source
from tasks.jobs.queue import check_broker, default_queue, producer, send_chunk, send_finish
from tasks.jobs.readahead import ordered_map
from tasks.shards.names import ShardSet, check_image_column
from worker.spec import MaskSpec

log = logging.getLogger(__name__)

#: Plan files written at once: an S3 PUT takes milliseconds, a planner writes thousands.
PLAN_WRITERS = 8
#: Seconds between the planner's updates of the index (chunks planned, heartbeat, cancelled?):
#: one Redis round trip per chunk would cost more than writing the chunk's plan.
INDEX_EVERY_S = 0.05


def submit_job(source_url: str, dest_url: str, spec: MaskSpec, *, chunk_size: int = settings.DEFAULT_CHUNK_SIZE,
               skip_existing: bool = False, image_column: str | None = None, jobs: JobIndex | None = None,
               on_named: Callable[[str], None] | None = None,
               on_chunk: Callable[[int], None] | None = None) -> str:
    """Record a job, plan and queue its chunks, and return its id.

    ``on_named(job_id)`` is called before anything is listed; ``on_chunk(n)`` as each chunk of
    ``n`` keys is queued. A SRC that names WebDataset shards (``tasks.shards.names``) plans one
    chunk per shard, whatever ``chunk_size``; ``image_column`` names Parquet shards' image column
    (``clipmask run``'s ``--image-column``). Raises ``NoImagesError`` before recording anything if the source has
    no images, ``UsageError`` for a bad chunk size, ``ValueError`` for a bad URL.
    """
    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, got {chunk_size}")
    shards = shard_source(source_url)
    check_image_column(shards, image_column, source_url)
    source, dest = shards.store if shards else open_store(source_url), open_store(dest_url)
    check_broker()  # before the probe under DST: nothing written for a job that cannot be queued
    check_writable(dest)
    job_id = new_job_id()
    if on_named:
        on_named(job_id)
    scan, keys = _keys_to_plan(source, shards, dest, skip_existing)
    first = next(keys, None)
    if first is None:
        if scan and scan.up_to_date:
            what = "shards have output shards" if shards else "images have records"
            raise NothingNewError(f"nothing new under {source.url}: all {scan.up_to_date:,} {what} in "
                                  f"{dest.url} newer than them; no job was created", scan.up_to_date)
        raise no_images(source)
    record = {"job_id": job_id, "source": source.url, "dest": dest.url, "spec": spec.to_dict(),
              "skip_existing": skip_existing, "chunk_size": 1 if shards else chunk_size, "created_at": now_iso(),
              "window": settings.JOB_WINDOW.get(), "queue": default_queue()}
    if shards:  # a shard is a chunk: its plan holds the shard's key, its results a row per sample
        record["shards"] = {"pattern": shards.pattern, "suffix": shards.suffix, "image_column": image_column}
    if scan:  # the plan holds only what is new or changed: workers mask every key of it
        record["planned_new"] = True
    files = JobFiles(dest, job_id)
    files.write_job(record)
    jobs = jobs or JobIndex.from_env()
    jobs.create(job_id, record)
    plan_chunks(jobs, files, record, chain([first], keys), on_chunk=on_chunk, scan=scan)
    log.info("job %s: %s -> %s planned%s", job_id, source.url, dest.url,
             f" ({scan.new:,} new, {scan.changed:,} changed, {scan.up_to_date:,} up to date)" if scan else "")
    return job_id


def plan_chunks(jobs: JobIndex, files: JobFiles, record: dict, keys: Iterable[str], chunk: int = 0,
                total: int = 0, on_chunk: Callable[[int], None] | None = None, scan: Scan | None = None,
                up_to_date: int = 0) -> int:
    """Plan ``keys`` as chunks ``chunk``, ``chunk + 1``, ... after ``total`` keys planned before,
    queueing those that fit the job's window; stop early if the job is cancelled. Returns the
    job's total. Plan files are written a few at a time (``ordered_map``), each before the index
    counts it, so that no chunk is queued before its plan is in storage. ``scan``, where the keys
    come from one, counts the images found up to date, after ``up_to_date`` found before."""
    job_id, dest = files.job_id, record["dest"]

    def found_up_to_date() -> int | None:
        return up_to_date + scan.up_to_date if scan else None

    def numbered(number: int, first: int) -> Iterator[PlanChunk]:
        for keys_of_chunk in chunked(keys, record["chunk_size"]):
            yield PlanChunk(number, first, keys_of_chunk)
            number, first = number + 1, first + len(keys_of_chunk)

    def write(plan: PlanChunk) -> PlanChunk:
        files.write_plan(plan)
        return plan

    with producer() as prod:
        indexed_at = 0.0
        plans = numbered(chunk, total)  # on a local disk a write is a CPU step: threads would only add switches
        for plan in ordered_map(write, plans, window=PLAN_WRITERS) if files.dest.networked else map(write, plans):
            chunk, total = plan.chunk + 1, plan.end
            if on_chunk:
                on_chunk(len(plan.keys))
            if time.monotonic() - indexed_at < INDEX_EVERY_S:
                continue  # the index learns of this chunk with a later one, or at the end
            indexed_at = time.monotonic()
            cancelled, claims = jobs.plan_chunk(job_id, chunk, total, found_up_to_date())
            send_claims(job_id, dest, claims, prod)
            if cancelled:
                log.info("job %s cancelled while planning: %d keys planned", job_id, total)
                break
        files.write_planned(chunk, total, found_up_to_date())
        complete, claims = jobs.finish_planning(job_id, chunk, total, found_up_to_date())
        send_claims(job_id, dest, claims, prod)
    if complete:
        send_finish(job_id, dest)
    return total


def send_claims(job_id: str, dest: str, claims: list[tuple[int, int]], prod=None, queue: str | None = None) -> None:
    """Queue the chunks the index handed out: (chunk number, keys in it) pairs."""
    for chunk, size in claims:
        send_chunk(job_id, chunk, dest, size, prod, queue)


def requeue_missing(jobs: JobIndex, job_id: str, data: dict) -> list[int]:
    """Send again every queued chunk without a result, then what fits the window (the chain of
    claims may have broken with a lost message), or the finishing step if the job is complete;
    returns the chunks sent. Duplicates are harmless: a done chunk returns at once."""
    missing = [(n, chunk_size_of(data, n)) for n in jobs.missing_chunks(job_id, int(data.get("sent", 0)))]
    claims = missing + jobs.feed(job_id)
    with producer() as prod:
        send_claims(job_id, data["dest"], claims, prod, data.get("queue"))
    if not claims and data.get("planned") == "1":
        send_finish(job_id, data["dest"], data.get("queue"))
    sent = [chunk for chunk, _ in claims]
    jobs.note_healed(job_id, sent)
    return sent


def chunk_size_of(data: dict, chunk: int) -> int:
    """Keys in ``chunk``, from the index: every chunk is full but the last."""
    size, chunks, total = int(data["chunk_size"]), int(data["chunks"]), int(data["total"])
    return total - chunk * size if chunk == chunks - 1 else size


def resume_job(job_id: str, dest_url: str | None = None, jobs: JobIndex | None = None,
               on_chunk: Callable[[int], None] | None = None) -> dict:
    """Complete an interrupted plan and re-queue every chunk without a result; idempotent.

    Where Redis lost the job, ``dest_url`` (the job's ``--out``) rebuilds its index from the
    files. Returns ``{"planned": keys newly planned, "requeued": chunks sent}``. Raises
    ``JobNotFoundError``, ``FileNotFoundError`` or ``PlanningBusyError`` (its planner is alive).
    """
    jobs = jobs or JobIndex.from_env()
    data = jobs.get(job_id)
    if data is None and dest_url is None:
        jobs.info(job_id)  # raises JobNotFoundError, naming --out
    files = JobFiles(open_store(dest_url or data["dest"]), job_id)
    record = files.read_job()
    if data is None:
        data = _rebuild(jobs, files, record)
    if data.get("manifest"):
        return {"planned": 0, "requeued": 0}
    planned = 0
    if data.get("planned") != "1":
        planned = _continue_plan(jobs, files, record, data, on_chunk)
        data = jobs.info(job_id)
    return {"planned": planned, "requeued": len(requeue_missing(jobs, job_id, data))}


def _keys_to_plan(source: ObjectStore, shards: ShardSet | None, dest: ObjectStore, new_only: bool,
                  after: str | None = None) -> tuple[Scan | ShardScan | None, Iterator[str]]:
    """The keys of a job's plan after ``after``, listed as they are taken: its shards, or its
    images; with ``new_only`` only those new or changed since DST's outputs, and the scan that
    finds them (whose counts the plan keeps)."""
    if new_only:
        scan = ShardScan(shards, dest, after) if shards else Scan(source, dest, after)
        return scan, scan.keys()
    return None, shard_keys(shards, after) if shards else image_keys(source, start_after=after)


def _rebuild(jobs: JobIndex, files: JobFiles, record: dict) -> dict:
    """Index a job that Redis lost, from its files; its chunks recount from their results."""
    last, planned = files.last_plan(), files.read_planned()
    chunks, total = (planned["chunks"], planned["total"]) if planned else (last.chunk + 1, last.end) if last else (0, 0)
    jobs.rebuild(files.job_id, record, chunks, total, planned is not None, files.is_cancelled())
    log.warning("job %s: rebuilt its Redis index from %s (%d chunks)", files.job_id, files.dest.url, chunks)
    return jobs.info(files.job_id)


def _continue_plan(jobs: JobIndex, files: JobFiles, record: dict, data: dict,
                   on_chunk: Callable[[int], None] | None) -> int:
    """List the source after the last planned key and plan the rest; returns keys planned."""
    if not planning_interrupted(data):
        raise PlanningBusyError(
            f"job {files.job_id} is still being planned by {data.get('planner')}; wait for it to end, "
            "or stop that `clipmask submit` and run `clipmask resume` again")
    last = files.last_plan()
    chunk, total, after = (last.chunk + 1, last.end, last.keys[-1]) if last else (0, 0, None)
    jobs.claim_planning(files.job_id, chunk, total)
    cancelled = data.get("cancelled") == "1"  # then only the plan's end is written
    scan, keys = _keys_to_plan(open_store(record["source"]), shard_set(record), files.dest,
                               bool(record.get("planned_new")), after)
    keys = () if cancelled else keys
    up_to_date = int(data.get("up_to_date") or 0)
    return plan_chunks(jobs, files, record, keys, chunk, total, on_chunk, scan, up_to_date) - total
