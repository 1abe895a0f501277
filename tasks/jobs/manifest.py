"""A job's manifest and summary: ``_jobs/<id>/manifest.jsonl`` and ``summary.json``.

The manifest is streamed, never held: chunk result files are read a few at a time, in chunk
order (which is listing order), and written through ``ObjectStore.write_stream`` (a multipart
upload on S3, a temporary file renamed into place locally). Writing it again gives the same file.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from storage import ObjectStore
from tasks.errors import IncompleteJobError
from tasks.jobs.files import JobFiles, iter_lines, row_line
from tasks.jobs.index import STATUSES, now_iso
from tasks.jobs.readahead import ordered_map

CANCELLED = "job cancelled"


class CountingLines:
    """Passes manifest lines through while counting them by status."""

    def __init__(self):
        self.counts = {status: 0 for status in STATUSES}

    def rows(self, rows: Iterable[dict]) -> Iterator[bytes]:
        for row in rows:
            self.counts[row["status"]] += 1
            yield row_line(row)

    def lines(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        for line in lines:
            self.counts[json.loads(line)["status"]] += 1
            yield line

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def write_job_manifest(files: JobFiles, source: ObjectStore, chunks: int, cancelled: bool,
                       shards: bool = False) -> CountingLines:
    """Stream chunks ``0..chunks-1``'s results into the manifest; returns the counts.

    A chunk without results is listed as skipped when the job was cancelled (a shard that was
    not read: one row for the shard, without a ``key``); otherwise ``IncompleteJobError`` is
    raised and no manifest is written.
    """
    def skipped(key: str) -> dict:
        row = {"source": source.url_for(key), "status": "skipped", "error": CANCELLED}
        return {**row, "shard": row["source"], "key": None} if shards else row

    def chunk_lines(chunk: int) -> bytes:
        try:
            return files.read_results(chunk)
        except FileNotFoundError:
            if not cancelled:
                raise IncompleteJobError(f"job {files.job_id}: chunk {chunk} has no results yet") from None
        keys = files.read_plan(chunk).keys
        return b"".join(row_line(skipped(key)) for key in keys)

    counter = CountingLines()
    blobs = ordered_map(chunk_lines, range(chunks))
    files.dest.write_stream(files.keys["manifest"], counter.lines(line for blob in blobs for line in iter_lines(blob)),
                            "application/x-ndjson")
    return counter


def write_summary(files: JobFiles, record: dict, counts: dict[str, int], state: str,
                  finished_at: str | None = None, up_to_date: int = 0) -> dict:
    """Write ``summary.json`` from the job's record and its manifest's counts; returns it.
    ``up_to_date``: the images a plan of what is new left out (no manifest row each). A job over
    shards keeps its record's ``shards`` (pattern, suffix, image column)."""
    summary = {
        "job_id": files.job_id, "state": state, "total": sum(counts.values()), **counts, "up_to_date": up_to_date,
        "source": record["source"], "dest": record["dest"], "spec": record["spec"],
        "created_at": record["created_at"], "finished_at": finished_at or now_iso(),
        "manifest": files.url("manifest"),
    }
    if record.get("shards"):
        summary["shards"] = record["shards"]
    files.dest.write_bytes(files.keys["summary"], json.dumps(summary, indent=2).encode() + b"\n", "application/json")
    return summary
