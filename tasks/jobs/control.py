"""Cancelling a job, as ``clipmask cancel`` and ``POST /v1/jobs/{id}/cancel`` do it."""

from __future__ import annotations

from storage import open_store
from tasks.jobs.files import JobFiles
from tasks.jobs.index import JobIndex, now_iso
from tasks.jobs.queue import send_finish


def cancel_job(job_id: str, jobs: JobIndex | None = None) -> dict:
    """Flag the job cancelled in its index and its files (``cancelled.json``), and send its
    finishing step when nothing is left in flight; returns the job's hash. Its queued chunks
    are recorded as skipped as they come. Raises ``JobNotFoundError``."""
    data, idle = (jobs or JobIndex.from_env()).cancel(job_id)
    JobFiles(open_store(data["dest"]), job_id).mark_cancelled(now_iso())
    if idle:  # no chunk in flight to finish it
        send_finish(job_id, data["dest"], data.get("queue"))
    return data
