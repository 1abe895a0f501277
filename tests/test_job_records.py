"""Job records in a real Redis: counts that survive redelivery, and when a job is finished."""

from __future__ import annotations

import pytest
import redis

from tasks.jobs import FINISHED_TTL_S, JobNotFoundError, JobStore, new_job_id


@pytest.fixture
def jobs(redis_url):
    return JobStore(redis.Redis.from_url(redis_url, decode_responses=True))


@pytest.fixture
def job(jobs):
    job_id = new_job_id()
    jobs.create(job_id, "s3://b/in/", "s3://b/out/", {"prompts": ["dog"]}, skip_existing=False)
    return job_id


def row(status: str, key: str) -> dict:
    return {"source": f"s3://b/in/{key}", "status": status}


def test_a_redelivered_outcome_is_counted_once(jobs, job):
    jobs.add_planned(job, 2)
    jobs.finish_planning(job)
    jobs.record(job, "a.jpg", row("succeeded", "a.jpg"))
    jobs.record(job, "a.jpg", row("succeeded", "a.jpg"))  # the same task, delivered again
    status = jobs.status(job)
    assert (status["succeeded"], status["done"], status["state"]) == (1, 1, "running")


def test_a_later_outcome_replaces_an_earlier_one(jobs, job):
    jobs.add_planned(job, 1)
    jobs.record(job, "a.jpg", row("failed", "a.jpg"))
    jobs.record(job, "a.jpg", row("succeeded", "a.jpg"))
    status = jobs.status(job)
    assert (status["failed"], status["succeeded"]) == (0, 1)
    assert dict(jobs.outcomes(job))["a.jpg"]["status"] == "succeeded"


def test_finished_needs_planning_over_and_every_input_with_an_outcome(jobs, job):
    jobs.add_planned(job, 2)
    assert jobs.status(job)["state"] == "queued"
    jobs.record(job, "a.jpg", row("succeeded", "a.jpg"))
    jobs.record(job, "b.jpg", row("failed", "b.jpg"))
    assert jobs.status(job)["state"] == "running"  # all planned so far are done, but planning goes on
    jobs.finish_planning(job)
    assert jobs.status(job)["state"] == "finished" and jobs.is_complete(job)


def test_finished_records_expire_but_not_before(jobs, job):
    jobs.add_planned(job, 1)
    jobs.finish_planning(job)
    jobs.record(job, "a.jpg", row("skipped", "a.jpg"))
    assert jobs.redis.ttl(f"clipmask:job:{job}") == -1
    jobs.mark_finished(job)
    assert 0 < jobs.redis.ttl(f"clipmask:job:{job}:outcomes") <= FINISHED_TTL_S
    assert jobs.status(job)["finished_at"]


def test_cancel_shows_and_unknown_jobs_are_named(jobs, job):
    jobs.cancel(job)
    assert jobs.is_cancelled(job) and jobs.status(job)["state"] == "cancelled"
    with pytest.raises(JobNotFoundError, match="no job 'missing'"):
        jobs.cancel("missing")
