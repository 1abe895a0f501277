"""A job from S3 through a real Celery worker and back, as a user runs it from the shell.

Real parts only: the redis-server and the moto S3 server started by conftest, ``clipmask worker``
and ``clipmask submit`` / ``status`` as subprocesses, the tiny random CLIPSeg.
"""

from __future__ import annotations

import io
import json
import re
import time

import boto3
import numpy as np
import pytest
from PIL import Image

from tests.images import encoded, noise_image, sample_inputs, write_tree
from tests.processes import FAST_REDELIVERY, clipmask, job_status, kill_mid_task, wait_for
from tests.services import FaultyProxy
from worker.spec import MaskSpec

PROMPT, NEGATIVE = "a cat|dog", "tree"


@pytest.fixture
def bucket_with_inputs(s3_bucket):
    s3 = boto3.client("s3")
    for key, data in sample_inputs().items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=data)
    return s3_bucket


@pytest.fixture
def backend_app(job_env, monkeypatch):
    """This process as a web backend would be: the environment of ``job_env`` and the Celery app
    configured from it (restored afterwards)."""
    from worker.celery_app import app

    for name, value in job_env.items():
        monkeypatch.setenv(name, value)
    settings = {"broker_url": job_env["CELERY_BROKER_URL"], "result_backend": job_env["CELERY_RESULT_BACKEND"],
                "task_default_queue": job_env["CLIPMASK_QUEUE"]}
    saved = {name: app.conf[name] for name in settings}
    app.conf.update(settings)
    yield app
    app.conf.update(saved)


def read_object(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def submit(bucket: str, env: dict, *extra: str) -> str:
    result = clipmask("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                      "--prompt", PROMPT, "--negative", NEGATIVE, *extra, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_job_masks_every_image_and_reports_the_corrupt_one(bucket_with_inputs, job_env, start_worker, engine):
    bucket = bucket_with_inputs
    # Given a running worker
    worker = start_worker()
    # When a job is submitted from the shell and followed with status --json
    job_id = submit(bucket, job_env, "--chunk-size", "2")
    status = wait_for(job_id, job_env, worker=worker)
    # Then every input has an outcome: the corrupt image failed, the others succeeded
    assert status["state"] == "finished"
    assert (status["total"], status["succeeded"], status["failed"], status["skipped"]) == (5, 4, 1, 0)
    assert status["manifest"] == f"s3://{bucket}/out/_jobs/{job_id}/manifest.jsonl"

    manifest = [json.loads(line) for line in read_object(bucket, f"out/_jobs/{job_id}/manifest.jsonl").splitlines()]
    by_source = {row["source"]: row for row in manifest}
    assert set(by_source) == {f"s3://{bucket}/in/{key}" for key in sample_inputs() if key != "notes.txt"}
    broken = by_source[f"s3://{bucket}/in/photos/broken.jpg"]
    assert broken["status"] == "failed" and "ImageDecodeError" in broken["error"]
    summary = json.loads(read_object(bucket, f"out/_jobs/{job_id}/summary.json"))
    assert (summary["succeeded"], summary["failed"]) == (4, 1)

    # And each mask is what the engine computes in-process for the same image and options
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    for key, data in sample_inputs().items():
        if key in ("photos/broken.jpg", "notes.txt"):
            continue
        from worker.codecs import decode_image

        image = decode_image(data)
        expected = engine.predict([image], spec)[0]
        mask = np.asarray(Image.open(io.BytesIO(read_object(bucket, f"out/{key}.mask.png"))))
        raw = np.asarray(Image.open(io.BytesIO(read_object(bucket, f"out/{key}.raw.png"))))
        meta = json.loads(read_object(bucket, f"out/{key}.json"))
        assert mask.shape == raw.shape == (image.height, image.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert np.abs(raw.astype(int) - expected.raw_pixels().astype(int)).max() <= 1
        assert np.mean(mask == expected.binary_pixels()) > 0.999
        assert meta["source"] == f"s3://{bucket}/in/{key}"
        assert (meta["width"], meta["height"]) == image.size
        assert meta["prompts"] == ["a cat", "dog"] and meta["negative_prompts"] == ["tree"]
        assert meta["outputs"]["mask"] == f"s3://{bucket}/out/{key}.mask.png"
        assert meta["coverage"] == pytest.approx(float(np.mean(mask == 255)))
        assert meta["model"]["revision"].startswith("sha256:") and meta["model"]["random"] is True

    # And the worker's start-up log said which model it runs, where, and that its weights are random
    assert re.search(rf"engine ready: model {re.escape(job_env['CLIPMASK_MODEL'])} \(revision sha256:\w+, fp32\) "
                     r"- RANDOM demo weights: masks are meaningless on cpu, batches of up to 4 images", worker.log())
    # And SIGTERM stops the worker cleanly
    assert worker.terminate() == 0, worker.log()
    assert "ERROR" not in worker.log()


def test_a_killed_worker_loses_no_image(bucket_with_inputs, job_env, start_worker):
    bucket = bucket_with_inputs
    env = {**job_env, **FAST_REDELIVERY}
    # Given a job of one image per task and a worker in the middle of one of them
    first = start_worker("doomed", **FAST_REDELIVERY)
    job_id = submit(bucket, env, "--chunk-size", "1")
    # When that worker dies without a chance to acknowledge or finish anything
    lost = kill_mid_task(first)
    assert job_status(job_id, env)["state"] != "finished", first.log()
    # Then a new worker is handed the interrupted task again, and no image is lost or counted twice
    second = start_worker("rescuer", **FAST_REDELIVERY)
    status = wait_for(job_id, env, worker=second)
    assert lost <= second.tasks("received")
    assert (status["total"], status["succeeded"], status["failed"]) == (5, 4, 1)
    manifest = read_object(bucket, f"out/_jobs/{job_id}/manifest.jsonl").splitlines()
    assert len(manifest) == 5


def test_submit_skip_existing_plans_only_what_is_new_without_a_request_per_image(
        bucket_with_inputs, job_env, start_worker, moto_server):
    bucket = bucket_with_inputs
    s3 = boto3.client("s3")
    same = encoded(noise_image(96, 72, 1), "PNG")
    for i in range(30):
        s3.put_object(Bucket=bucket, Key=f"in/many/{i:02d}.png", Body=same)
    worker = start_worker()
    first = wait_for(submit(bucket, job_env, "--chunk-size", "8"), job_env, worker=worker)
    assert (first["succeeded"], first["failed"]) == (34, 1)
    worker.stop_quietly()

    def modified(key):
        return s3.head_object(Bucket=bucket, Key=key)["LastModified"]

    unchanged = {key: modified(key) for key in ("out/many/05.png.json", "out/many/05.png.mask.png")}
    # Given two images replaced with new content and two added, a second later (S3's time resolution)
    time.sleep(1.1)
    changed = encoded(noise_image(128, 96, 2), "PNG")
    for key in ("in/many/03.png", "in/many/17.png", "in/new/a.png", "in/new/b.png"):
        s3.put_object(Bucket=bucket, Key=key, Body=changed)
    # When a submit with --skip-existing and its worker go through a proxy that records each request
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        env = {**job_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
        worker = start_worker("w2", AWS_ENDPOINT_URL_S3=proxy.endpoint)
        status = wait_for(submit(bucket, env, "--skip-existing", "--chunk-size", "8"), env, worker=worker)
        seen = list(proxy.seen)
    # Then the four are masked, the corrupt image tried again, the 32 others counted up to date
    assert (status["succeeded"], status["failed"], status["skipped"], status["up_to_date"]) == (4, 1, 0, 32)
    said = clipmask("status", status["job_id"], env=job_env).stdout
    assert "5/5 done (4 succeeded, 1 failed, 0 skipped), 32 up to date left alone" in said, said
    record = json.loads(s3.get_object(Bucket=bucket, Key="out/many/17.png.json")["Body"].read())
    assert (record["width"], record["height"], record["source_size"]) == (128, 96, len(changed))
    assert record["source_etag"] == s3.head_object(Bucket=bucket, Key="in/many/17.png")["ETag"]
    assert {key: modified(key) for key in unchanged} == unchanged
    # and no request went to an image that was up to date, or to its outputs
    heads = [path for method, path in seen if method == "HEAD" and f"/{bucket}/out/_jobs/" not in path]
    assert heads == []  # a chunk may look for its own results file, never for an image's record
    touched = {path.split("?")[0].split(f"/{bucket}/", 1)[-1] for method, path in seen if method in ("GET", "PUT")}
    images = {key for key in touched if key.startswith("in/")}
    assert images == {"in/many/03.png", "in/many/17.png", "in/new/a.png", "in/new/b.png", "in/photos/broken.jpg"}
    outputs = {key for key in touched if key.startswith("out/") and not key.startswith("out/_jobs/")}
    masked = {image.removeprefix("in/") for image in images}
    written = {image + suffix for image in masked for suffix in (".mask.png", ".raw.png", ".json")}
    assert {key.removeprefix("out/") for key in outputs} <= written
    manifest = s3.get_object(Bucket=bucket, Key=f"out/_jobs/{status['job_id']}/manifest.jsonl")["Body"]
    assert len(manifest.read().splitlines()) == 5


def test_submit_with_nothing_new_creates_no_job(s3_bucket, job_env, tmp_path):
    # Given a folder whose images all have records newer than them
    src, out = tmp_path / "src", tmp_path / "out"
    write_tree(src, ["a.png", "b/c.jpg"], sample_inputs()["alpha.png"])
    time.sleep(0.05)
    write_tree(out, ["a.png.json", "b/c.jpg.json"], b"{}")
    # When submitted with --skip-existing
    result = clipmask("submit", str(src), "--out", str(out), "--prompt", PROMPT, "--skip-existing", env=job_env)
    # Then it says so, succeeds, and records no job
    assert result.returncode == 0, result.stderr
    assert "nothing new" in result.stderr and "2 images" in result.stderr
    assert not (out / "_jobs").exists() or not any((out / "_jobs").iterdir())


def test_submit_rejects_an_empty_source_and_a_bad_option(s3_bucket, job_env):
    empty = clipmask("submit", f"s3://{s3_bucket}/nothing/", "--out", f"s3://{s3_bucket}/out/",
                     "--prompt", "cat", env=job_env)
    assert empty.returncode == 2 and "no images under" in empty.stderr
    bad = clipmask("submit", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/",
                   "--prompt", "cat", "--threshold", "1.5", env=job_env)
    assert bad.returncode == 2 and "--threshold must be in [0, 1]" in bad.stderr


def test_status_of_an_unknown_job_names_the_problem(job_env):
    result = clipmask("status", "nosuchjob", "--json", env=job_env)
    assert result.returncode == 1 and "no job 'nosuchjob'" in result.stderr


def test_backend_offload_of_one_image_returns_its_mask_keys_and_metadata(
        bucket_with_inputs, start_worker, backend_app):
    from tasks.client import mask_image

    bucket = bucket_with_inputs
    # Given a worker, and a backend process configured from the same environment
    worker = start_worker()
    # When it offloads one uploaded image and waits for the answer
    result = mask_image(f"s3://{bucket}/in/", "photos/cat.jpg", f"s3://{bucket}/offload/", prompt="a cat")
    row = result.get(timeout=120)
    # Then the answer names the written masks and carries the metadata record
    assert row["status"] == "succeeded", worker.log()
    assert row["outputs"]["mask"] == f"s3://{bucket}/offload/photos/cat.jpg.mask.png"
    assert row["metadata"]["width"] == 96 and row["metadata"]["prompts"] == ["a cat"]
    assert read_object(bucket, "offload/photos/cat.jpg.mask.png").startswith(b"\x89PNG")
    # And a corrupt upload comes back as a failed row with the reason, not an exception
    bad = mask_image(f"s3://{bucket}/in/", "photos/broken.jpg", f"s3://{bucket}/offload/", prompt="a cat")
    assert bad.get(timeout=120)["status"] == "failed"


def test_a_worker_batches_32_concurrent_offload_requests_together(s3_bucket, start_worker, backend_app):
    from tasks.client import mask_image

    s3, rng = boto3.client("s3"), np.random.default_rng(3)
    sizes = {f"up/{i:02d}.jpg": (48 + i, 40 + (i % 7)) for i in range(32)}
    for key, (w, h) in sizes.items():
        s3.put_object(Bucket=s3_bucket, Key=key,
                      Body=encoded(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "JPEG"))
    # Given one worker (CPU: batches of 4; it holds 8 tasks at once by default)
    worker = start_worker()
    source, dest = f"s3://{s3_bucket}/", f"s3://{s3_bucket}/masks/"
    assert mask_image(source, "up/00.jpg", dest, prompt="a cat").get(timeout=120)["status"] == "succeeded"
    # When 32 one-image requests arrive together
    results = {key: mask_image(source, key, dest, prompt="a cat") for key in sizes}
    rows = {key: result.get(timeout=240) for key, result in results.items()}
    # Then each answer is its own image's (its size), all succeeded...
    for key, row in rows.items():
        assert row["status"] == "succeeded", (key, row, worker.log())
        assert (row["metadata"]["width"], row["metadata"]["height"]) == sizes[key]
        assert row["metadata"]["source"] == f"s3://{s3_bucket}/{key}"
    # ...and the worker ran them in shared batches, as their metadata records say
    batches = [row["metadata"]["worker"]["batch_images"] for row in rows.values()]
    assert max(batches) > 1, batches


def test_a_worker_carries_on_after_redis_restarts(bucket_with_inputs, job_env, start_worker, redis_server):
    bucket = bucket_with_inputs
    # Given a worker connected to the broker
    worker = start_worker()
    wait_for(submit(bucket, job_env), job_env, worker=worker)
    # When redis-server goes away and comes back on the same address
    redis_server.stop()
    time.sleep(2)
    redis_server.start()
    # Then the same worker reconnects and runs the next job to the end
    status = wait_for(submit(bucket, job_env), job_env, worker=worker, timeout=180)
    assert (status["succeeded"], status["failed"]) == (4, 1)
    assert worker.process.poll() is None


def test_an_unreachable_redis_is_named_with_the_variable_to_fix(job_env, s3_bucket):
    from tests.services import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {**job_env, "CELERY_BROKER_URL": dead, "CELERY_RESULT_BACKEND": dead}
    result = clipmask("status", "somejob", env=env)
    assert result.returncode == 2 and "CELERY_BROKER_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_cancelled_job_skips_what_was_still_queued(bucket_with_inputs, job_env, start_worker):
    bucket = bucket_with_inputs
    # Given a job queued while no worker runs
    job_id = submit(bucket, job_env, "--chunk-size", "1")
    assert job_status(job_id, job_env)["state"] == "queued"
    # When the user cancels it and a worker then comes up
    result = clipmask("cancel", job_id, env=job_env)
    assert result.returncode == 0, result.stderr
    worker = start_worker()
    # Then every input is recorded as skipped, nothing is masked, and the job says cancelled
    status = wait_for(job_id, job_env, worker=worker)
    assert (status["state"], status["skipped"], status["succeeded"]) == ("cancelled", 5, 0), worker.log()
    rows = [json.loads(line) for line in read_object(bucket, f"out/_jobs/{job_id}/manifest.jsonl").splitlines()]
    assert {row["error"] for row in rows} == {"job cancelled"}
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="out/photos/")
    watch = clipmask("status", job_id, "--watch", env=job_env)
    assert watch.returncode == 0 and "cancelled" in watch.stdout


def test_scheduled_scan_masks_only_new_images(bucket_with_inputs, job_env, start_worker, backend_app):
    app = backend_app
    bucket = bucket_with_inputs
    worker = start_worker()
    scan = {"source": f"s3://{bucket}/in/", "dest": f"s3://{bucket}/out/", "prompt": "dog"}
    queue = job_env["CLIPMASK_QUEUE"]
    # Given a first scheduled scan over the prefix
    first = app.send_task("clipmask.scheduled_scan", kwargs=scan, queue=queue).get(timeout=120)
    assert wait_for(first, job_env, worker=worker)["succeeded"] == 4
    # When a new image arrives and the schedule fires again
    boto3.client("s3").put_object(Bucket=bucket, Key="in/new/late.png", Body=sample_inputs()["alpha.png"])
    second = app.send_task("clipmask.scheduled_scan", kwargs=scan, queue=queue).get(timeout=120)
    # Then only the new image is masked
    status = wait_for(second, job_env, worker=worker)
    assert (status["succeeded"], status["skipped"], status["failed"], status["up_to_date"]) == (1, 0, 1, 4)


def test_beat_schedule_comes_from_the_environment(job_env):
    import subprocess
    import sys

    entry = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog", "every_s": 600}
    env = {**job_env, "CLIPMASK_SCHEDULE": json.dumps([entry])}
    code = "import celeryconfig, json; print(json.dumps(celeryconfig.beat_schedule))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    schedule = json.loads(out.stdout)
    assert schedule == {"clipmask-scan-0": {"task": "clipmask.scheduled_scan", "schedule": 600.0,
                                            "kwargs": {"source": "s3://b/in/", "dest": "s3://b/out/",
                                                       "prompt": "dog"}}}
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "CLIPMASK_SCHEDULE": "[oops"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "CLIPMASK_SCHEDULE must be JSON" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 0, reason="checks a machine without GPUs")
def test_worker_refuses_gpus_this_machine_lacks(job_env):
    result = clipmask("worker", "--gpus", "0", env=job_env, timeout=60)
    assert result.returncode == 2 and "no GPU [0] on this machine" in result.stderr


def test_a_job_that_no_worker_can_mask_fails_its_images_with_the_reason_instead_of_hanging(
        bucket_with_inputs, job_env, start_worker, backend_app):
    from storage import open_store
    from tasks.jobs.files import JobFiles, PlanChunk
    from tasks.jobs.index import JobIndex, new_job_id, now_iso

    app = backend_app
    bucket = bucket_with_inputs
    worker = start_worker()
    jobs = JobIndex.from_env()
    # Given a job whose recorded spec no worker can use (say, written by a mismatched client)
    job_id, dest = new_job_id(), f"s3://{bucket}/out/"
    record = {"job_id": job_id, "source": f"s3://{bucket}/in/", "dest": dest, "skip_existing": False,
              "spec": {"prompts": [], "threshold": 0.5}, "chunk_size": 2, "created_at": now_iso()}
    files = JobFiles(open_store(dest), job_id)
    files.write_job(record)
    files.write_plan(PlanChunk(0, 0, ["alpha.png", "photos/cat.jpg"]))
    files.write_planned(1, 2)
    jobs.create(job_id, record)
    jobs.finish_planning(job_id, 1, 2)
    app.send_task("clipmask.mask_chunk", queue=job_env["CLIPMASK_QUEUE"], args=(job_id, 0, dest, 2))
    # Then both images fail with the reason, and the job finishes with its manifest
    status = wait_for(job_id, job_env, worker=worker)
    assert (status["failed"], status["succeeded"]) == (2, 0)
    rows = [json.loads(line) for line in read_object(bucket, f"out/_jobs/{job_id}/manifest.jsonl").splitlines()]
    assert all("InvalidSpecError: no positive prompt" in row["error"] for row in rows)


def test_client_job_handle_waits_for_the_manifest(bucket_with_inputs, start_worker, backend_app):
    from tasks.client import submit_job_handle

    bucket = bucket_with_inputs
    worker = start_worker()
    job = submit_job_handle(f"s3://{bucket}/in/", f"s3://{bucket}/client/", prompt="dog", chunk_size=2)
    status = job.wait(timeout=120, interval=0.2)
    assert (status["state"], status["succeeded"], status["failed"]) == ("finished", 4, 1), worker.log()
    assert read_object(bucket, f"client/_jobs/{job.job_id}/manifest.jsonl").count(b"\n") == 5


TORCH_BLOCKED = """
import sys
class NoGPUSide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "transformers") or name in ("worker.engine", "worker.lifecycle"):
            raise ImportError(f"the job side imported {name}")
sys.meta_path.insert(0, NoGPUSide())
from tasks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_submit_status_cancel_and_resume_run_without_the_gpu_side(bucket_with_inputs, job_env):
    import subprocess
    import sys

    def job_side(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *args], env=job_env, capture_output=True,
                              text=True, timeout=120)

    # Given a Python where importing torch, transformers or the engine fails
    bucket = bucket_with_inputs
    submitted = job_side("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/", "--prompt", "dog")
    # Then the job-side commands all work
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    for args in (["status", job_id, "--json"], ["resume", job_id], ["cancel", job_id], ["status", job_id]):
        result = job_side(*args)
        assert result.returncode == 0, (args, result.stderr)
    assert "cancelled" in result.stdout


SUPERVISOR = """
import argparse, sys
from worker.supervise import supervise_workers
args = argparse.Namespace(tasks=2, precision="auto", loglevel="INFO")
sys.exit(supervise_workers(["cpu", "cpu"], args, ["-n", "sup@%h"]))
"""


def test_one_worker_per_device_restarted_when_it_dies_and_stopped_by_sigterm(bucket_with_inputs, job_env, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.processes import REPO

    log_path = tmp_path / "supervisor.log"
    # Given the parent that `clipmask worker` runs on a machine with two devices (two CPU children here)
    with open(log_path, "wb") as log:
        parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR], env=job_env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        children = _children_of(parent.pid, count=2)
        # When a job runs, its chunks are served
        assert wait_for(submit(bucket_with_inputs, job_env, "--chunk-size", "1"), job_env)["state"] == "finished"
        # And when one child dies, it is started again
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while children[0] in _children_of(parent.pid, count=2, wait=False) or \
                len(_children_of(parent.pid, count=2, wait=False)) < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert "starting it again" in log_path.read_text()
        # Then SIGTERM to the parent stops every child warmly, and the parent exits 0
        survivors = _children_of(parent.pid, count=2)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(90) == 0, log_path.read_text()
        assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                       for pid in survivors)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait(30)


def test_two_processes_per_device_each_serve_with_a_name_and_threads_of_their_own(bucket_with_inputs, job_env,
                                                                                   start_worker):
    import os
    import re

    # Given `clipmask worker` asked for two processes on its one device (the CPU)
    worker = start_worker("pair", CLIPMASK_PROCESSES_PER_DEVICE="2")
    children = _children_of(worker.process.pid, count=2)
    assert len(children) == 2, worker.log()
    deadline = time.monotonic() + 120
    while len(set(re.findall(r"(pair-\w+-cpu-[01]@\S+) ready", worker.log()))) < 2:
        assert time.monotonic() < deadline and worker.process.poll() is None, worker.log()
        time.sleep(0.2)
    # Then each is a Celery node of its own name, with half of the cores as torch threads
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for pid in children:
        environ = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
        assert environ.get("OMP_NUM_THREADS") == share
    # And a job's masks are all made, by these processes
    status = wait_for(submit(bucket_with_inputs, job_env, "--chunk-size", "1"), job_env, worker=worker)
    assert status["state"] == "finished" and status["succeeded"] == 4, status
    records = [json.loads(read_object(bucket_with_inputs, f"out/{key}.json"))
               for key in sample_inputs() if key not in ("photos/broken.jpg", "notes.txt")]
    assert len(records) == 4 and {record["worker"]["pid"] for record in records} <= set(children)


def _children_of(pid: int, count: int, wait: bool = True) -> list[int]:
    """The pids of ``pid``'s child processes; with ``wait``, once there are ``count`` of them."""
    deadline = time.monotonic() + 60
    while True:
        try:
            children = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        except FileNotFoundError:
            children = []
        if not wait or len(children) >= count or time.monotonic() > deadline:
            return children
        time.sleep(0.2)
