"""The Redis index of jobs, against a real Redis: counts that survive redelivery, the window of
queued chunks, when a job is finished, and when planning counts as interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from tasks.errors import JobNotFoundError
from tasks.jobs.index import FINISHED_TTL_S, JobIndex, new_job_id, now_iso


@pytest.fixture
def jobs(redis_url):
    return JobIndex(redis.Redis.from_url(redis_url, decode_responses=True))


def new_job(jobs, chunk_size: int = 2, window: int = 1000) -> str:
    job_id = new_job_id()
    jobs.create(job_id, {"source": "s3://b/in/", "dest": "s3://b/out/", "spec": {"prompts": ["dog"]},
                         "created_at": now_iso(), "chunk_size": chunk_size, "window": window})
    return job_id


@pytest.fixture
def job(jobs):
    return new_job(jobs)


def test_a_redelivered_chunk_is_counted_once(jobs, job):
    assert jobs.plan_chunk(job, 1, 2) == (False, [(0, 2)])
    assert jobs.plan_chunk(job, 2, 4) == (False, [(1, 2)])
    jobs.finish_planning(job, 2, 4)
    assert jobs.record_chunk(job, 0, {"succeeded": 1, "failed": 1})[0] == 1
    assert jobs.record_chunk(job, 0, {"succeeded": 2})[0] == 0  # the same chunk, delivered again
    status = jobs.status(job)
    assert (status["succeeded"], status["failed"], status["done"], status["state"]) == (1, 1, 2, "running")
    assert jobs.missing_chunks(job, 2) == [1]


def test_a_job_queues_no_more_chunks_than_its_window(jobs):
    job = new_job(jobs, chunk_size=10, window=3)
    # Given a planner that plans five chunks, the last one short
    claimed = [jobs.plan_chunk(job, n, min(10 * n, 45))[1] for n in range(1, 6)]
    assert claimed == [[(0, 10)], [(1, 10)], [(2, 10)], [], []]  # three queued, the rest wait
    complete, more = jobs.finish_planning(job, 5, 45)
    assert (complete, more) == (False, [])
    # When a chunk finishes, the next one takes its place, with its own size
    assert jobs.record_chunk(job, 0, {"succeeded": 10}) == (1, [(3, 10)])
    assert jobs.record_chunk(job, 1, {"succeeded": 10}) == (1, [(4, 5)])
    assert jobs.status(job)["chunks_queued"] == 3
    for chunk in (2, 3):
        assert jobs.record_chunk(job, chunk, {"succeeded": 10}) == (1, [])
    # And the last one completes the job
    assert jobs.record_chunk(job, 4, {"failed": 5}) == (2, [])
    assert jobs.status(job)["state"] == "finished"


def test_a_cancelled_job_queues_nothing_more_and_completes_when_its_queue_drains(jobs):
    job = new_job(jobs, chunk_size=1, window=2)
    for n in range(1, 5):
        jobs.plan_chunk(job, n, n)
    jobs.finish_planning(job, 4, 4)
    _, idle = jobs.cancel(job)
    assert not idle  # chunks 0 and 1 are still queued
    assert jobs.record_chunk(job, 0, {"skipped": 1}) == (1, [])  # nothing new is queued
    assert jobs.feed(job) == []
    assert jobs.record_chunk(job, 1, {"skipped": 1})[0] == 2  # the last in flight: finish it
    assert jobs.status(job)["state"] == "cancelled"
    # And once its manifest is written, every chunk counts as done (those never sent as skipped)
    jobs.mark_finished(job, {"succeeded": 0, "failed": 0, "skipped": 4}, 4, "s3://b/out/_jobs/x/manifest.jsonl")
    status = jobs.status(job)
    assert (status["state"], status["chunks_done"], status["chunks"], status["chunks_queued"]) == ("cancelled", 4, 4, 0)


def test_the_chunk_that_completes_a_planned_job_is_told_so(jobs, job):
    jobs.plan_chunk(job, 1, 2)
    assert jobs.record_chunk(job, 0, {"succeeded": 2})[0] == 1  # planning not over: not complete
    assert jobs.status(job)["state"] == "running"
    assert jobs.finish_planning(job, 1, 2) == (True, [])  # every chunk done: the planner finishes it
    assert jobs.status(job)["state"] == "finished"


def test_missing_chunks_reads_the_bitmap_past_its_end(jobs, job):
    for chunk in (0, 3, 9, 17):
        jobs.record_chunk(job, chunk, {"skipped": 1})
    assert jobs.missing_chunks(job, 20) == [n for n in range(20) if n not in (0, 3, 9, 17)]


def test_finished_records_expire_and_carry_the_manifest_counts(jobs, job):
    jobs.plan_chunk(job, 1, 2)
    jobs.finish_planning(job, 1, 2)
    jobs.record_chunk(job, 0, {"succeeded": 2})
    assert jobs.redis.ttl(f"clipmask:job:{job}") == -1 and job in jobs.active()
    jobs.mark_finished(job, {"succeeded": 1, "failed": 1, "skipped": 0}, 2, "s3://b/out/_jobs/x/manifest.jsonl")
    assert 0 < jobs.redis.ttl(f"clipmask:job:{job}:done") <= FINISHED_TTL_S
    status = jobs.status(job)
    assert (status["succeeded"], status["failed"], status["manifest"]) == (1, 1, "s3://b/out/_jobs/x/manifest.jsonl")
    assert status["finished_at"] and job not in jobs.active()


def test_unknown_jobs_are_named_with_the_way_to_rebuild_them(jobs):
    with pytest.raises(JobNotFoundError, match="no job 'missing'.*clipmask resume JOB --out DST"):
        jobs.cancel("missing")


def test_planning_counts_as_interrupted_once_its_planner_is_dead(jobs, job):
    assert not jobs.status(job)["planning_interrupted"]  # this process plans it, and lives
    planner = subprocess.Popen([sys.executable, "-c", "pass"])
    planner.wait()
    jobs.redis.hset(f"clipmask:job:{job}", "planner", f"{os.uname().nodename}:{planner.pid}")
    assert jobs.status(job)["planning_interrupted"]
    jobs.redis.hset(f"clipmask:job:{job}", mapping={"planner": "elsewhere:1", "planner_beat": time.time() - 3600})
    assert jobs.status(job)["planning_interrupted"]  # another host's planner, silent for an hour
    jobs.finish_planning(job, 0, 0)
    assert not jobs.status(job)["planning_interrupted"]
