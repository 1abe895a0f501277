"""A job's records in storage: ``_jobs/<id>/manifest.jsonl`` and ``summary.json``.

Written when every input has an outcome, by whichever task records the last one (and again, to
the same effect, by any redelivered task: the files are a pure function of the Redis records).
"""

from __future__ import annotations

import json

from storage import ObjectStore
from storage.layout import job_keys

from .jobs import JobStore


def manifest_lines(rows: list[dict]) -> bytes:
    """JSON lines sorted by source, so that reruns produce identical files."""
    rows = sorted(rows, key=lambda row: row["source"])
    return b"".join(json.dumps(row, sort_keys=True).encode() + b"\n" for row in rows)


def summary(status: dict, dest: ObjectStore, job_id: str) -> dict:
    keys = job_keys(job_id)
    fields = ("job_id", "state", "total", "succeeded", "failed", "skipped", "source", "dest", "spec",
              "created_at", "finished_at")
    return {**{name: status[name] for name in fields},
            "manifest": dest.url_for(keys["manifest"])}


def write_records(dest: ObjectStore, job_id: str, rows: list[dict], status: dict) -> dict:
    """Write manifest and summary under ``_jobs/<job_id>/``; returns the summary."""
    keys = job_keys(job_id)
    dest.write_bytes(keys["manifest"], manifest_lines(rows), "application/x-ndjson")
    record = summary(status, dest, job_id)
    dest.write_bytes(keys["summary"], json.dumps(record, indent=2).encode() + b"\n", "application/json")
    return record


def write_job_records(jobs: JobStore, job_id: str, dest: ObjectStore) -> dict | None:
    """Write a Celery job's records if it is complete; returns the summary or None."""
    if not jobs.is_complete(job_id):
        return None
    rows = [row for _, row in jobs.outcomes(job_id)]
    jobs.mark_finished(job_id)
    record = write_records(dest, job_id, rows, jobs.status(job_id))
    jobs.set_manifest(job_id, record["manifest"])
    return record
