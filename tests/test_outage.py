"""Storage that is away defers a job, it does not fail it: S3 that stops answering for longer than
the task's time limit, a local destination that is full, read-only or unmounted for a while. The
chunks run again until storage is back, and the job ends with every image masked once. Real
processes and services: redis-server, moto's S3 server behind a proxy that hangs and then cuts
every request, a tmpfs, ``clipmask`` workers.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import uuid

import boto3
import pytest
import redis

from tests.images import images_in, png
from tests.processes import REPO, assert_each_input_once, manifest_rows, submit, wait_for
from tests.services import FaultyProxy

#: Time limits that fit a test: the soft limit is 9 s; a task may wait on a hung request for the
#: whole outage (about 20 s), well within the visibility timeout; retries wait at most 3 s.
OUTAGE_SETTINGS = {"CLIPMASK_TASK_TIME_LIMIT": "10", "CLIPMASK_VISIBILITY_TIMEOUT": "60",
                   "CLIPMASK_RETRY_MAX_DELAY_S": "3", "CLIPMASK_HEAL_INTERVAL": "3",
                   "CLIPMASK_RESTORE_INTERVAL": "1", "CLIPMASK_RESTORE_THROTTLE": "1"}


def wait_for_log(worker, *texts: str, timeout: float = 120) -> str:
    """The worker's log once it holds every one of ``texts``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = worker.log()
        if all(text in log for text in texts):
            return log
        time.sleep(0.2)
    raise AssertionError(f"the worker never logged {texts}:\n{worker.log()}")


# --- S3 that stops answering ------------------------------------------------------------------


def test_an_s3_outage_longer_than_the_time_limit_defers_the_job_and_fails_no_image(
        s3_bucket, moto_server, redis_url, env_of, workers):
    s3 = boto3.client("s3")
    keys = [f"in/p{i:02d}.png" for i in range(32)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png(i))
    # Given a worker (two task slots) that reaches S3 through a proxy which, mid-job, stops
    # answering: every request held, never answered
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0, hang_after=60) as proxy:
        env = env_of(redis_url, **OUTAGE_SETTINGS, CLIPMASK_WORKER_TASKS="2")
        worker = workers({**env, "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        job_id = submit(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out/", env, "--chunk-size", "4")
        assert proxy.outage_started.wait(120), worker.log()
        # When the outage lasts longer than the soft time limit (9 s), then cuts every connection,
        wait_for_log(worker, "time limit reached with", timeout=60)
        time.sleep(3)
        proxy.set_outage("cut")
        time.sleep(3)
        # and S3 answers again
        proxy.set_outage(None)
        status = wait_for(job_id, env, worker=worker, timeout=180)
    # Then the job finishes with every image masked once, none failed
    log = worker.log()
    assert (status["state"], status["succeeded"], status["failed"]) == ("finished", 32, 0), log
    manifest = s3.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in manifest.splitlines()]
    assert_each_input_once(rows, {f"s3://{s3_bucket}/{key}" for key in keys})
    for key in keys:
        s3.head_object(Bucket=s3_bucket, Key=f"out/{key.removeprefix('in/')}.json")
    # And the chunks that ran out of time waiting on S3 said why, and ran again
    assert "storage did not answer within the time limit: s3://" in log, log
    assert "chunk runs again in" in log and "storage is away" in log, log
    assert proxy.held > 0 and proxy.cut > 0


def test_a_pipeline_past_its_deadline_while_s3_hangs_leaves_its_images_to_run_again(
        s3_bucket, moto_server, engine, monkeypatch, caplog):
    from storage import open_store
    from tasks.pipeline import Pipeline
    from worker.spec import MaskSpec

    s3 = boto3.client("s3")
    keys = [f"p{i}.png" for i in range(5)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=png(i))
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        source, dest = open_store(f"s3://{s3_bucket}/in/"), open_store(f"s3://{s3_bucket}/out/")
        # Given S3 that holds every request, never answering
        proxy.set_outage("hang")
        pipeline = Pipeline(engine, source, dest, MaskSpec.from_text("a cat"), context="job j chunk 1",
                            deadline=time.monotonic() + 2)
        # When a pipeline's deadline passes
        outcomes = list(pipeline.run(keys))
        proxy.set_outage("cut")
    # Then each image has one outcome, failed as transient (to run again), naming storage
    assert [outcome.key for outcome in outcomes] == keys
    for outcome in outcomes:
        assert (outcome.status, outcome.transient) == ("failed", True), outcome
        assert outcome.error.startswith(f"storage did not answer within the time limit: s3://{s3_bucket}/in/p")
    assert "[job j chunk 1] time limit reached with 5 image(s) unfinished: storage did not answer" in caplog.text


# --- a local destination that is away -------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs mounted for the test (skipped where this process may not mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=False,
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def fill(disk) -> None:
    """Write to a file on ``disk`` until it is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def mount(*args) -> None:
    done = subprocess.run(["mount", *map(str, args)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("away", ["full", "read-only", "unmounted"])
def test_a_local_destination_that_is_away_for_a_while_defers_the_job(tmp_path, tmpfs, redis_url, env_of, workers,
                                                                     away):
    src, out = tmp_path / "in", tmpfs / "out"
    keys = images_in(src, 12)
    env = env_of(redis_url, CLIPMASK_RETRY_MAX_DELAY_S="1")
    if away == "unmounted":  # DST is a share mounted under a folder: a bind mount of another tmpfs folder
        share = tmpfs / "share"
        share.mkdir()
        out.mkdir()
        mount("--bind", share, out)
    job_id = submit(src, out, env, "--chunk-size", "3")
    # Given a job whose destination, once planned, is full / read-only / unmounted
    if away == "full":
        fill(tmpfs)
        why = "No space left on device"
    elif away == "read-only":
        mount("-o", "remount,ro", tmpfs)
        why = "Read-only file system"
    else:
        subprocess.run(["umount", "-l", str(out)], check=True)
        why = "the job's files are"
    # When a worker runs it, and then the destination comes back
    worker = workers(env)
    log = wait_for_log(worker, why, "chunk runs again in")
    if away == "unmounted":
        assert not list(out.iterdir()), "nothing is written under the bare mount point"
        mount("--bind", share, out)
    elif away == "full":
        (tmpfs / "filler").unlink()
    else:
        mount("-o", "remount,rw", tmpfs)
    status = wait_for(job_id, env, worker=worker, timeout=120)
    # Then the job finishes with every image masked once, none failed, the outage logged
    log = worker.log()
    assert (status["state"], status["succeeded"], status["failed"]) == ("finished", 12, 0), log
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})
    assert all((out / f"{key}.json").is_file() for key in keys)
    assert "storage is away" in log, log
    if away == "unmounted":
        subprocess.run(["umount", "-l", str(out)], check=False, capture_output=True)


# --- the retries' budgets, and healing -----------------------------------------------------------------


def test_storage_away_is_waited_out_for_hours_and_other_failures_eight_times(monkeypatch):
    from tasks.jobs.retries import CHUNK_RETRIES, RetryState, decide

    monkeypatch.setenv("CLIPMASK_STORAGE_RETRY_S", "3600")
    for name in ("CLIPMASK_RETRY_MAX_DELAY_S", "CLIPMASK_VISIBILITY_TIMEOUT", "CLIPMASK_TASK_TIME_LIMIT"):
        monkeypatch.delenv(name, raising=False)  # the defaults: waits of at most 10 min
    now, state = 1_000_000.0, RetryState()
    # Storage away: retried, the wait doubling up to its cap, until an hour has passed
    delays = []
    for minute in range(60):
        decision = decide(state, "..", True, now + 60 * minute)
        assert decision.state is not None, minute
        state = decision.state
        delays.append(decision.delay)
    assert delays[:4] == [5, 10, 20, 40] and max(delays) == 600
    gave_up = decide(state, "..", True, now + 3600)
    assert gave_up.state is None and "storage was away for 60 min (CLIPMASK_STORAGE_RETRY_S)" in gave_up.reason
    # An image failing while storage answers: eight retries, as before
    state = RetryState()
    for _ in range(CHUNK_RETRIES):
        state = decide(state, "..", False, now).state
    assert decide(state, "..", False, now).reason == "gave up after 8 retries"
    # Progress (an image done) starts the budgets afresh, and the first wait is short again
    progressed = decide(state, "s.", False, now)
    assert (progressed.state.strikes, progressed.state.kept, progressed.delay) == (1, "s.", 5)


def test_the_healing_check_leaves_a_chunk_waiting_to_run_again_to_its_retry(redis_url):
    from tasks.jobs.index import JobIndex, new_job_id, now_iso

    base, queue = redis_url.rsplit("/", 1)[0], f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CELERY_BROKER_URL": f"{base}/0", "CLIPMASK_REDIS_URL": f"{base}/2", "CLIPMASK_QUEUE": queue}
    jobs = JobIndex(redis.Redis.from_url(f"{base}/2", decode_responses=True))
    job_id = new_job_id()
    jobs.create(job_id, {"source": "s3://b/in/", "dest": "s3://b/out/", "spec": {"prompts": ["dog"]},
                         "created_at": now_iso(), "chunk_size": 2, "window": 10, "queue": queue})
    jobs.plan_chunk(job_id, 2, 4)
    jobs.finish_planning(job_id, 2, 4)
    # Given a job whose chunk 1 waits to run again in a minute (storage away), the queue empty
    jobs.note_retry(job_id, 1, time.time() + 60, "storage did not answer within the time limit: s3://b/in/x.png")
    heal = ("from tasks.jobs.healing import heal_jobs; from tasks.jobs.index import JobIndex; "
            "print(heal_jobs(JobIndex.from_env(), 0, queued=lambda: 0))")

    def healed() -> str:
        done = subprocess.run([sys.executable, "-c", heal], check=False, env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # When the healing check takes every job as quiet, it leaves this one to its retry
    assert healed() == "[]"
    report = jobs.status(job_id)
    assert report["heals"] == 0 and report["retrying"]["chunk"] == 1 and report["retrying"]["due_in_s"] > 0
    assert "storage did not answer" in report["retrying"]["reason"]
    # But once that retry is overdue (its message lost), the job is healed
    jobs.redis.hset(f"clipmask:job:{job_id}", "retry_due", time.time() - 1)
    assert healed() == f"[{job_id!r}]"
    assert jobs.status(job_id)["resent"] == [0, 1]
