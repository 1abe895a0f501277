"""What an operator sees of a running worker: Prometheus metrics that match the manifest, and the
per-job progress, scraped over HTTP from a real ``clipmask worker``."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid

import pytest

from tests.metrics import scrape, total
from tests.processes import clipmask, wait_for
from tests.services import free_port


@pytest.fixture
def metrics_env(redis_url, tiny_model):
    base = redis_url.rsplit("/", 1)[0]
    return {**os.environ, "CELERY_BROKER_URL": f"{base}/0", "CELERY_RESULT_BACKEND": f"{base}/1", "CLIPMASK_MODEL": tiny_model,
            "CLIPMASK_QUEUE": f"test-{uuid.uuid4().hex[:8]}", "HF_HUB_OFFLINE": "1",
            "CLIPMASK_METRICS_PORT": str(free_port())}


def test_worker_metrics_match_the_manifest(image_dir, tmp_path, metrics_env, workers):
    port = int(metrics_env["CLIPMASK_METRICS_PORT"])
    worker = workers(metrics_env)
    out = tmp_path / "out"
    # Given a job of four good images and a corrupt one, run by a worker that serves metrics
    submitted = clipmask("submit", str(image_dir), "--out", str(out), "--prompt", "dog", "--chunk-size", "2",
                         env=metrics_env)
    job_id = submitted.stdout.strip().splitlines()[-1]
    status = wait_for(job_id, metrics_env, worker=worker)
    rows = [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]
    # When an operator scrapes the worker
    samples = scrape(port)
    # Then the outcome counters match the manifest, and every stage has one sample per masked image
    for outcome in ("succeeded", "failed"):
        expected = sum(row["status"] == outcome for row in rows)
        assert total(samples, "clipmask_images_total", outcome=outcome) == expected == status[outcome]
    for stage in ("download", "decode", "preprocess", "inference", "encode", "upload"):
        assert total(samples, "clipmask_stage_seconds_count", stage=stage) == status["succeeded"], stage
    assert total(samples, "clipmask_batch_size_count") >= 1
    assert {dict(labels)["device"] for (name, labels) in samples if name == "clipmask_images_total"} == {"cpu"}
    # And a job that waits in another queue shows its progress
    other = {**metrics_env, "CLIPMASK_QUEUE": f"idle-{uuid.uuid4().hex[:8]}"}
    waiting = clipmask("submit", str(image_dir), "--out", str(tmp_path / "other"), "--prompt", "dog", env=other)
    waiting_id = waiting.stdout.strip().splitlines()[-1]
    samples = scrape(port)
    assert total(samples, "clipmask_job_total", job_id=waiting_id) == 5
    assert total(samples, "clipmask_job_images", job_id=waiting_id) == 0


def test_flower_shows_the_chunks_with_their_counts(image_dir, tmp_path, metrics_env, workers):
    import base64
    import subprocess
    import sys
    import time

    port = free_port()
    # Given Flower with basic auth from the environment, as compose runs it, and a worker
    env = {**metrics_env, "FLOWER_BASIC_AUTH": "ops:s3cret-pass"}
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower",
                               f"--port={port}", "--address=127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    auth = base64.b64encode(b"ops:s3cret-pass").decode()

    def api(path: str):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def eventually(probe, what: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if found := probe():
                    return found
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"Flower never showed {what}")

    try:
        worker = workers(metrics_env)
        eventually(lambda: api("/api/workers?refresh=1&status=1"), "the worker")  # Flower hears its events
        # When a job of two chunks runs, one of them with a corrupt image
        submitted = clipmask("submit", str(image_dir), "--out", str(tmp_path / "out"), "--prompt", "dog",
                             "--chunk-size", "3", env=metrics_env)
        job_id = submitted.stdout.strip().splitlines()[-1]
        status = wait_for(job_id, metrics_env, worker=worker)
        # Then Flower's API (behind its login) lists the chunks, each with its counts

        def job_chunks():
            tasks = api("/api/tasks?taskname=clipmask.mask_chunk").values()
            found = [t for t in tasks if job_id in (t.get("args") or "") and t.get("result")]
            return found if len(found) == 2 else None

        chunks = eventually(job_chunks, "the job's two chunks")
        results = [t["result"] for t in chunks]
        assert all(t["state"] == "SUCCESS" for t in chunks), chunks
        assert any("'failed': 1" in result for result in results), results
        assert sum(int(r.split("'succeeded': ")[1].split(",")[0].rstrip("}")) for r in results
                   if "'succeeded'" in r) == status["succeeded"]
        anonymous = urllib.request.Request(f"http://127.0.0.1:{port}/api/tasks")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(anonymous, timeout=10)
    finally:
        flower.terminate()
        flower.wait(30)
