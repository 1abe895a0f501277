"""Jobs that finish by themselves through the faults of real deployments: an interrupted submit,
a Redis restart, a flaky S3, killed workers; and no credential in anything a user or an operator
can read. Real processes only: redis-server, moto's S3 server, ``clipmask`` subprocesses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

import boto3
import pytest
import redis

from tests.images import images_in, png
from tests.processes import (
    CLIPMASK,
    FAST_HEALING,
    REPO,
    assert_each_input_once,
    clipmask,
    job_status,
    kill_mid_task,
    manifest_rows,
    named_job,
    submit,
    wait_for,
)
from tests.services import FaultyProxy, RedisServer


def redis_contents(client: redis.Redis) -> list[str]:
    """Every key and value of one Redis database, as text (task messages, job records, results)."""
    read = {"string": client.get, "list": lambda k: client.lrange(k, 0, -1), "hash": client.hgetall,
            "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}
    return [f"{key!r} {read.get(client.type(key).decode(), lambda k: b'')(key)!r}" for key in client.keys("*")]


def test_an_interrupted_submit_is_completed_by_resume(tmp_path, redis_url, env_of, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = [f"d{i // 500:02d}/e{i:05d}.jpg" for i in range(3000)]  # not really JPEGs: they fail fast
    for key in keys:
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(b"")
    env = env_of(redis_url)
    # Given a submit killed with SIGKILL while it plans (no worker runs yet)
    submit_proc = subprocess.Popen([*CLIPMASK, "submit", str(src), "--out", str(out), "--prompt", "cat",
                                    "--chunk-size", "10"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    job_id = named_job(submit_proc)
    plan = out / "_jobs" / job_id / "plan"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(plan.glob("*.json"))) < 5:
        time.sleep(0.001)
    submit_proc.send_signal(signal.SIGSTOP)
    submit_proc.kill()
    submit_proc.wait()
    planned_before = len(list(plan.glob("*.json")))
    assert 5 <= planned_before < 300, "the kill should land halfway through planning"
    # Then status says planning was interrupted and names the command that completes it
    report = clipmask("status", job_id, env=env)
    assert report.returncode == 0 and f"clipmask resume {job_id}" in report.stdout, report.stdout
    assert job_status(job_id, env)["planning_interrupted"]
    # When the user resumes it, and a worker runs
    resumed = clipmask("resume", job_id, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert len(list(plan.glob("*.json"))) == 300  # (a killed writer may leave a temporary file)
    worker = workers(env)
    status = wait_for(job_id, env, worker=worker, timeout=300)
    # Then the manifest lists every input exactly once
    assert (status["state"], status["total"], status["failed"]) == ("finished", 3000, 3000)
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})
    # And resuming a finished job does nothing
    again = clipmask("resume", job_id, env=env)
    assert again.returncode == 0 and "0 more image(s) planned, 0 chunk(s)" in again.stdout


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_job_finishes_by_itself_after_redis_restarts(tmp_path, env_of, workers, how):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 40)
    with RedisServer(workdir=str(tmp_path), appendonly=True).start() as server:
        env = env_of(server.url, **FAST_HEALING)
        # Given a worker in the middle of a job
        worker = workers(env)
        job_id = submit(src, out, env, "--chunk-size", "2")
        wait_for(job_id, env, done=8, worker=worker)
        # When redis-server goes away mid-job (with its append-only file on) and comes back
        server.stop(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        time.sleep(2)
        server.start()
        # Then the job finishes on its own, every image with one outcome, no row twice
        status = wait_for(job_id, env, worker=worker, timeout=150)
        assert (status["state"], status["succeeded"], status["total"]) == ("finished", 40, 40), worker.log()
        assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})


def test_a_flaky_s3_fails_no_image(s3_bucket, s3_env, moto_server, redis_url, env_of, workers):
    s3 = boto3.client("s3")
    keys = [f"in/p{i:02d}.png" for i in range(24)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png(i))
    with FaultyProxy(moto_server.endpoint, slowdown=0.2, drop=0.05, seed=11) as proxy:
        # Given an S3 that answers 20% of requests with 503 SlowDown and cuts 5% of responses
        env = env_of(redis_url, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        worker = workers(env)
        # When a job runs through it
        job_id = submit(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out/", env, "--chunk-size", "4")
        status = wait_for(job_id, env, worker=worker, timeout=240)
        # Then every image is masked, though faults really happened
        assert (status["succeeded"], status["failed"]) == (24, 0), worker.log()
        assert proxy.slowdowns > 0 and proxy.drops > 0
    manifest = s3.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    assert_each_input_once([json.loads(line) for line in manifest.splitlines()],
                           {f"s3://{s3_bucket}/{key}" for key in keys})


def test_three_killed_workers_lose_no_image(tmp_path, redis_url, env_of, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 12)
    env = env_of(redis_url, **{**FAST_HEALING, "CLIPMASK_VISIBILITY_TIMEOUT": "4"})
    job_id = submit(src, out, env, "--chunk-size", "1")
    # Given a job, and three workers each killed with SIGKILL in the middle of a task
    for _ in range(3):
        kill_mid_task(workers(env, "doomed"))
    # When a last worker comes up
    rescuer = workers(env, "rescuer")
    status = wait_for(job_id, env, worker=rescuer, timeout=180)
    # Then no image is lost and none is counted or listed twice
    assert (status["succeeded"], status["total"]) == (12, 12), rescuer.log()
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})


def test_no_password_or_secret_key_appears_anywhere(tmp_path, env_of, workers):
    password, secret = "hunter2-" + uuid.uuid4().hex[:8], "SECRET-" + uuid.uuid4().hex
    src, out = tmp_path / "in", tmp_path / "out"
    images_in(src, 4)
    with RedisServer(workdir=str(tmp_path), password=password).start() as server:
        assert f":{password}@" in server.url
        env = env_of(server.url, AWS_SECRET_ACCESS_KEY=secret)
        # Given a Redis with a password and a secret AWS key in the environment
        worker = workers(env)
        # When a user runs the commands, including ones that fail
        outputs = []
        for args in (["status", "nosuchjob"], ["status", "nosuchjob", "--json"], ["cancel", "nosuchjob"],
                     ["resume", "nosuchjob"]):
            result = clipmask(*args, env=env)
            assert result.returncode in (1, 2) and "nosuchjob" in result.stderr
            outputs += [result.stdout, result.stderr]
        assert "redis://:***@127.0.0.1" in outputs[1], "the error names the Redis it asked, password masked"
        submitted = clipmask("submit", str(src), "--out", str(out), "--prompt", "cat", "--chunk-size", "1", env=env)
        job_id = submitted.stdout.strip().splitlines()[-1]
        outputs += [submitted.stdout, submitted.stderr]
        status = wait_for(job_id, env, worker=worker)
        outputs.append(clipmask("status", job_id, env=env).stdout)
        assert status["succeeded"] == 4
        worker.terminate()
        # Then neither the password nor the secret is in any output, log, record or message
        outputs.append(worker.log())
        outputs += [path.read_text() for path in out.rglob("*.json*")]
        for url in (env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]):
            outputs += redis_contents(redis.Redis.from_url(url))
        text = "\n".join(outputs)
        assert "manifest" in text and job_id in text
        assert password not in text and secret not in text


def test_a_job_whose_redis_records_were_lost_is_rebuilt_from_storage(tmp_path, redis_url, env_of, workers):
    src, out = tmp_path / "in", tmp_path / "out"
    keys = images_in(src, 12)
    env = env_of(redis_url)
    # Given a worker in the middle of a job
    worker = workers(env)
    job_id = submit(src, out, env, "--chunk-size", "2")
    wait_for(job_id, env, done=4, worker=worker)
    # When Redis loses everything (a restart without persistence): records, queue, counters
    for db in (0, 1):
        redis.Redis.from_url(env["CELERY_BROKER_URL"].rsplit("/", 1)[0] + f"/{db}").flushdb()
    assert clipmask("status", job_id, env=env).returncode == 1
    # Then `clipmask resume JOB --out DST` rebuilds the job from its files and it finishes
    resumed = clipmask("resume", job_id, "--out", str(out), env=env)
    assert resumed.returncode == 0, resumed.stderr
    status = wait_for(job_id, env, worker=worker, timeout=180)
    assert (status["state"], status["succeeded"], status["total"]) == ("finished", 12, 12), worker.log()
    assert_each_input_once(manifest_rows(out, job_id), {str(src / key) for key in keys})
