"""A worker that stops running its tasks exits and is replaced; jobs that make no progress say so.

The watchdog's decisions on their own, then a real ``clipmask worker`` made to hold a delivery it
never starts (a fault injected into Celery's threads pool, ``tests/faults``), and the healing
check's escalation on a job whose chunks stay missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import redis

from tests.images import images_in
from tests.metrics import scrape, total
from tests.processes import FAST_HEALING, REPO, clipmask, job_status, wait_for
from tests.services import free_port
from worker.watchdog import EXIT_CODE, Watchdog


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watchdog(ready: int | Exception = 0) -> tuple[Watchdog, Clock]:
    clock = Clock()

    def ready_messages() -> int:
        if isinstance(ready, Exception):
            raise ready
        return ready

    return Watchdog(held_s=60, idle_s=300, ready_messages=ready_messages, clock=clock), clock


def test_a_message_held_unstarted_while_slots_are_free_is_a_reason_to_exit():
    dog, clock = watchdog()
    # Given a worker of 8 slots running 2 tasks and holding one message it has not started
    assert dog.check(8, 2, {"a"}, started=5) is None
    clock.now += 59
    assert dog.check(8, 2, {"a"}, started=6) is None
    # When the message is still not started past the bound
    clock.now += 2
    reason = dog.check(8, 2, {"a"}, started=7)
    # Then the watchdog says why it must exit
    assert reason.startswith("held: 1 message(s) received and not started for 61s while 6 of 8 task slots are free")


def test_held_messages_are_normal_while_every_slot_is_busy_or_when_they_start():
    dog, clock = watchdog()
    dog.check(8, 8, {"a", "b"}, started=8)
    clock.now += 600
    # Every slot busy: the held messages wait their turn
    assert dog.check(8, 8, {"a", "b"}, started=8) is None
    # A message that started is forgotten; a new one is timed from when it was first seen
    assert dog.check(8, 7, {"c"}, started=9) is None
    clock.now += 30
    assert dog.check(8, 7, {"c"}, started=9) is None


def test_an_idle_worker_with_ready_messages_in_its_queue_is_a_reason_to_exit():
    dog, clock = watchdog(ready=3)
    assert dog.check(8, 0, set(), started=10) is None
    clock.now += 301
    assert dog.check(8, 0, set(), started=10).startswith(
        "idle: no task started for 301s while 8 of 8 task slots are free and its queue has 3 message(s) ready")


@pytest.mark.parametrize("ready", [0, ConnectionError("broker away")])
def test_an_idle_worker_with_nothing_to_do_or_no_broker_stays(ready):
    dog, clock = watchdog(ready=ready)
    dog.check(8, 0, set(), started=10)
    clock.now += 3600
    assert dog.check(8, 0, set(), started=10) is None


def test_a_worker_that_starts_tasks_or_has_no_free_slot_is_not_idle():
    dog, clock = watchdog(ready=3)
    dog.check(8, 0, set(), started=10)
    for started in range(11, 20):
        clock.now += 100
        assert dog.check(8, 1, set(), started=started) is None
    for _ in range(10):
        clock.now += 100
        assert dog.check(8, 8, set(), started=19) is None


#: A Redis database of this module's own for job records: other tests' workers never heal these
#: jobs, and the stuck-jobs metric counts only them.
RECORDS_DB = 8


@pytest.fixture
def env(redis_url, tiny_model):
    base = redis_url.rsplit("/", 1)[0]
    yield {**os.environ, "CELERY_BROKER_URL": f"{base}/0", "CELERY_RESULT_BACKEND": f"{base}/1",
           "CLIPMASK_REDIS_URL": f"{base}/{RECORDS_DB}", "CLIPMASK_MODEL": tiny_model,
           "CLIPMASK_QUEUE": f"test-{uuid.uuid4().hex[:8]}", "HF_HUB_OFFLINE": "1", **FAST_HEALING}
    redis.Redis.from_url(f"{base}/{RECORDS_DB}").flushdb()


def submit(src, out, env: dict) -> str:
    submitted = clipmask("submit", str(src), "--out", str(out), "--prompt", "a cat", "--chunk-size", "2", env=env)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().splitlines()[-1]


def test_a_worker_holding_a_delivery_it_never_starts_is_replaced(tmp_path, env, workers):
    src, out, port = tmp_path / "in", tmp_path / "out", free_port()
    keys = images_in(src, 6)
    env = {**env, "CLIPMASK_WATCHDOG_HELD_S": "3", "CLIPMASK_METRICS_PORT": str(port),
           "PYTHONPATH": str(REPO / "tests" / "faults"), "CLIPMASK_TEST_SWALLOW_ONCE": str(tmp_path / "swallowed")}
    # Given a worker whose threads pool never starts the first task it is handed
    worker = workers(env)
    job_id = submit(src, out, env)
    # When the job runs
    status = wait_for(job_id, env, worker=worker, timeout=180)
    # Then the watchdog ended that worker process, saying why, and the supervisor started another
    log = worker.log()
    assert (tmp_path / "swallowed").exists()
    assert "watchdog: held: 1 message(s) received and not started for" in log, log
    assert f"exited with {EXIT_CODE}; starting it again" in log, log
    # And the held chunk ran elsewhere: every image masked once
    assert (status["state"], status["succeeded"], status["total"]) == ("finished", 6, 6), log
    assert sorted(row["source"] for row in manifest_rows(out, job_id)) == sorted(str(src / key) for key in keys)
    # And the exit is counted in the worker's metrics
    assert total(scrape(port), "clipmask_watchdog_exits_total", reason="held") == 1


def manifest_rows(out, job_id: str) -> list[dict]:
    return [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with ``env`` (Celery reads its settings at import)."""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def heal(env: dict, times: int = 1, queue_empty: bool = True) -> str:
    """The healing check, ``times`` in a row, every job taken as quiet; returns its log."""
    queued = ", queued=lambda: 0" if queue_empty else ""
    return python("from tasks.jobs.healing import heal_jobs; from tasks.jobs.index import JobIndex; jobs = JobIndex.from_env(); "
                  f"[heal_jobs(jobs, 0{queued}) for _ in range({times})]", env).stderr


def test_a_job_whose_chunks_stay_missing_is_reported_stuck(tmp_path, env):
    src, out = tmp_path / "in", tmp_path / "out"
    images_in(src, 4)
    # Given a job of two chunks that no worker ever runs
    job_id = submit(src, out, env)
    assert job_status(job_id, env)["heals"] == 0
    # When the healing check sends its chunks again, twice, then a third time
    heal(env, times=2)
    status = job_status(job_id, env)
    assert (status["heals"], status["resent"], status["resent_count"], status["stuck"]) == (2, [0, 1], 2, False)
    log = heal(env)
    # Then the job is reported stuck: in the log, as an error saying what it waits for, and by status
    assert f"job {job_id} is stuck: no progress for" in log and "chunks 0, 1 sent again 3 times" in log, log
    assert "waiting for 2 chunk(s) of 2 to report their results" in log
    status = job_status(job_id, env)
    assert (status["heals"], status["stuck"]) == (3, True)
    text = clipmask("status", job_id, env=env).stdout
    assert "stuck: no progress for" in text and "chunks 0, 1 sent again 3 times" in text, text
    # And the workers' metrics count it
    shown = python("from tasks.jobs.progress import JobProgress; print([s.value for f in JobProgress().collect() "
                   "if f.name == 'clipmask_jobs_stuck' for s in f.samples])", env)
    assert shown.stdout.strip() == "[1.0]", shown.stderr


def test_a_job_whose_finishing_step_was_lost_is_finished_though_the_queue_is_busy(tmp_path, env, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 4)
    worker = workers(env)
    job_id = submit(src, out, env)
    wait_for(job_id, env, worker=worker)
    worker.terminate()
    # Given a job whose chunks all have their results, but whose finishing step was lost (its
    # manifest never written), while another job's chunks wait in the queue
    records = redis.Redis.from_url(env["CLIPMASK_REDIS_URL"])
    records.hdel(f"clipmask:job:{job_id}", "manifest", "finished_at")
    records.sadd("clipmask:jobs:active", job_id)
    for name in ("manifest.jsonl", "summary.json"):
        (out / "_jobs" / job_id / name).unlink()
    submit(src, tmp_path / "other", env)
    assert python("from tasks.jobs.queue import queued_messages; print(queued_messages())", env).stdout.strip() == "2"
    # When the healing check looks at it
    log = heal(env, queue_empty=False)
    # Then its finishing step is sent again at once, and a worker writes its manifest
    assert f"job {job_id}: no progress for" in log and "its finishing step sent again once" in log, log
    status = wait_for(job_id, env, worker=workers(env))
    assert (status["state"], status["succeeded"]) == ("finished", 4)
    assert sorted(row["source"] for row in manifest_rows(out, job_id)) == sorted(str(src / key) for key in keys)
