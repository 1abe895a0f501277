"""RabbitMQ as the broker: ``CELERY_BROKER_URL=amqp://...``, job records in Redis
(``CLIPMASK_REDIS_URL``). Real processes only: a private rabbitmq-server node, the session's
redis-server, ``clipmask`` subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from tests.images import images_in
from tests.processes import (
    FAST_HEALING,
    REPO,
    assert_each_input_once,
    clipmask,
    kill_mid_task,
    manifest_rows,
    submit,
    wait_for,
)
from tests.services import RabbitServer

#: Redis databases of this module's own: the other tests' workers, whose healing checks look at
#: every active job of their database, never see these jobs (nor these workers theirs).
RESULTS_DB, RECORDS_DB = 6, 7


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    """A private RabbitMQ node (about 5 s to start), for this module."""
    server = RabbitServer(workdir=str(tmp_path_factory.mktemp("rabbitmq")))
    with server.start():
        yield server


@pytest.fixture
def env(rabbit, redis_url, tiny_model):
    """A user's environment: tasks through RabbitMQ, results and job records in Redis."""
    base = redis_url.rsplit("/", 1)[0]
    env = {**os.environ, "CELERY_BROKER_URL": rabbit.url, "CELERY_RESULT_BACKEND": f"{base}/{RESULTS_DB}",
           "CLIPMASK_REDIS_URL": f"{base}/{RECORDS_DB}", "CLIPMASK_MODEL": tiny_model,
           "CLIPMASK_QUEUE": f"test-{uuid.uuid4().hex[:8]}", "HF_HUB_OFFLINE": "1"}
    yield env
    for db in (RESULTS_DB, RECORDS_DB):
        redis.Redis.from_url(f"{base}/{db}").flushdb()


def python(code: str, env: dict) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` (Celery reads its settings at import)."""
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def queued(env: dict) -> int:
    """What the healing check sees: ``tasks.jobs.queue.queued_messages()``."""
    return int(python("from tasks.jobs.queue import queued_messages; print(queued_messages())", env))


def test_a_job_runs_end_to_end_with_rabbitmq_as_broker(tmp_path, rabbit, env, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 6)
    # Given a job of 3 chunks submitted with RabbitMQ as broker: its messages wait there, not in Redis
    job_id = submit(src, out, env, "--chunk-size", "2")
    assert queued(env) == 3
    base = env["CLIPMASK_REDIS_URL"].rsplit("/", 1)[0]
    assert not any(redis.Redis.from_url(f"{base}/{db}").exists(env["CLIPMASK_QUEUE"]) for db in range(16))
    # When a worker runs it
    worker = workers(env)
    status = wait_for(job_id, env, worker=worker, timeout=180)
    # Then every image succeeded, and the manifest lists each input once
    assert (status["state"], status["succeeded"], status["failed"], status["total"]) == ("finished", 6, 0, 6), \
        worker.log()
    rows = manifest_rows(out, job_id)
    assert {row["status"] for row in rows} == {"succeeded"}
    assert_each_input_once(rows, {str(src / key) for key in keys})
    # And the worker took its tasks from RabbitMQ (password masked), the job's records are in
    # CLIPMASK_REDIS_URL's database, and the queue is empty
    assert f"amqp://guest:**@127.0.0.1:{rabbit.port}//" in worker.log()
    assert redis.Redis.from_url(env["CLIPMASK_REDIS_URL"]).exists(f"clipmask:job:{job_id}")
    assert queued(env) == 0
    # And status and cancel of an unknown job say the job is unknown, naming the Redis they asked
    for args in (["status", "nosuchjob"], ["cancel", "nosuchjob"]):
        result = clipmask(*args, env=env, timeout=60)
        assert result.returncode in (1, 2), (args, result.stdout, result.stderr)
        assert "no job 'nosuchjob' in Redis at redis://127.0.0.1:" in result.stderr, (args, result.stderr)
        assert "cannot reach" not in result.stderr, (args, result.stderr)


def test_killed_workers_lose_no_image_with_rabbitmq(tmp_path, env, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 8)
    job_id = submit(src, out, env, "--chunk-size", "1")
    # Given a job, and two workers each killed with SIGKILL in the middle of a task
    lost: set[str] = set()
    for _ in range(2):
        lost |= kill_mid_task(workers(env, "doomed"))
    # When a last worker comes up
    rescuer = workers(env, "rescuer")
    status = wait_for(job_id, env, worker=rescuer, timeout=180)
    # Then no image is lost and none is counted or listed twice
    assert (status["state"], status["succeeded"], status["total"]) == ("finished", 8, 8), rescuer.log()
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})
    # And the killed workers' very tasks ran again: RabbitMQ redelivered them as their connections
    # closed (the visibility timeout is the default two hours: the healing check sent nothing)
    assert lost <= rescuer.tasks("succeeded"), rescuer.log()
    assert not redis.Redis.from_url(env["CLIPMASK_REDIS_URL"]).hexists(f"clipmask:job:{job_id}", "healed_at")


def test_the_healing_check_counts_the_messages_waiting_in_rabbitmq(tmp_path, env):
    src, out = tmp_path / "in", tmp_path / "out"
    # Given a queue that does not exist yet: nothing waits (RabbitMQ answers 404, the probe 0)
    assert queued(env) == 0
    # When a job of 5 chunks is submitted while no worker runs
    images_in(src, 5)
    job_id = submit(src, out, env, "--chunk-size", "1")
    # Then its 5 messages wait in RabbitMQ, and the healing check leaves the quiet job alone
    assert queued(env) == 5
    heal = ("from tasks.jobs.healing import heal_jobs; from tasks.jobs.index import JobIndex; "
            "print(heal_jobs(JobIndex.from_env(), 0))")
    assert python(heal, env) == "[]"
    assert queued(env) == 5
    # And the workers of another queue leave it to its own
    other = {**env, "CLIPMASK_QUEUE": env["CLIPMASK_QUEUE"] + "-other"}
    assert python(heal, other) == "[]"
    # And once its messages are lost (the queue purged), the check sends its chunks again
    assert python("from worker.celery_app import app; print(app.control.purge())", env) == "5"
    assert queued(env) == 0
    assert python(heal, env) == repr([job_id])
    assert queued(env) == 5


def test_a_job_finishes_after_rabbitmq_is_killed_and_restarted(tmp_path, rabbit, env, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 40)
    env = {**env, **FAST_HEALING}
    # Given two workers in the middle of a job
    running = [workers(env), workers(env)]
    job_id = submit(src, out, env, "--chunk-size", "2")
    wait_for(job_id, env, done=10, worker=running[0])
    # When rabbitmq-server is killed (SIGKILL) and started again on the same data
    rabbit.stop(signal.SIGKILL)
    time.sleep(3)
    rabbit.start()
    # Then the job finishes without waiting for a heartbeat timeout (about 3 minutes) or the
    # healing check: nothing lost, nothing counted or listed twice
    status = wait_for(job_id, env, worker=running[0], timeout=100)
    logs = "\n".join(worker.log() for worker in running)
    assert (status["state"], status["succeeded"], status["total"]) == ("finished", 40, 40), logs
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})
    assert "Temporarily reducing the prefetch count" not in logs
