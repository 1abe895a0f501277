"""Python client API, for a web backend that offloads masking to the workers.

    from tasks.client import mask_image, submit_job_handle
    result = mask_image("s3://bucket/uploads/", "u/42.jpg", "s3://bucket/masks/", prompt="person")
    row = result.get(timeout=60)   # {"status": "succeeded", "outputs": {...}, "metadata": {...}}

    job = submit_job_handle("s3://bucket/photos/", "s3://bucket/masks/", prompt="person|dog")
    job.wait()                     # the status dict, once every image has an outcome
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from celery.result import AsyncResult

from tasks.jobs.index import JobIndex
from tasks.jobs.planning import submit_job
from tasks.jobs.queue import app
from tasks.settings import DEFAULT_CHUNK_SIZE
from worker.spec import MaskSpec


def mask_image(source: str, key: str, dest: str, prompt: str, negative: str | None = None,
               **options) -> AsyncResult:
    """Queue one image (``key`` relative to ``source``); the result is its manifest row + metadata.

    Raises ``InvalidSpecError`` at once for bad options, before anything is queued.
    """
    spec = MaskSpec.from_text(prompt, negative, **options)
    return app.send_task("clipmask.mask_image", args=(source, key, dest, spec.to_dict()))


@dataclass
class JobHandle:
    """A submitted job: poll ``status()`` or block on ``wait()``."""

    job_id: str
    jobs: JobIndex

    def status(self) -> dict:
        return self.jobs.status(self.job_id)

    def wait(self, timeout: float | None = None, interval: float = 2.0) -> dict:
        """Block until the job has ended and its manifest is written; returns the status.

        Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (status := self.status())["manifest"]:
            if status["planning_interrupted"]:
                raise RuntimeError(f"job {self.job_id}: planning was interrupted; run clipmask resume {self.job_id}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status['state']} after {timeout}s")
            time.sleep(interval)
        return status


def submit_job_handle(source: str, dest: str, prompt: str, negative: str | None = None, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, skip_existing: bool = False, **options) -> JobHandle:
    """Plan and queue a job like ``clipmask submit``; returns its handle."""
    jobs = JobIndex.from_env()
    spec = MaskSpec.from_text(prompt, negative, **options)
    job_id = submit_job(source, dest, spec, chunk_size=chunk_size, skip_existing=skip_existing, jobs=jobs)
    return JobHandle(job_id, jobs)
