"""A job's durable record in storage, under ``DST/_jobs/<job_id>/`` (docs/design.md, "Jobs").

- ``job.json``        what was asked: source, dest, spec, skip_existing, chunk_size, created_at,
                      and ``shards`` for a job over WebDataset shards (a chunk per shard);
                      written before anything is planned
- ``plan/<n>.json``   chunk ``n``: ``{"chunk": n, "first": index of its first key, "keys": [...]}``,
                      written before chunk ``n`` is queued
- ``planned.json``    ``{"chunks": N, "total": T}``, written when planning is over
- ``results/<n>.jsonl`` chunk ``n``'s manifest rows in plan order; a redelivered chunk
                      overwrites it with the same rows
- ``cancelled.json``  present once the job was cancelled
- ``manifest.jsonl``, ``summary.json``  streamed from the results once every chunk has one

Everything Redis knows about a job can be rebuilt from these files (``clipmask resume``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

from storage import ObjectStore, open_store
from storage.layout import chunk_of, job_keys, plan_key, results_key
from tasks.shards.names import SHARD_SUFFIX, ShardSet


def dumps(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def row_line(row: dict) -> bytes:
    """One manifest line: sorted keys, so that reruns write identical files."""
    return dumps(row) + b"\n"


@dataclass(frozen=True)
class PlanChunk:
    """One planned chunk: its number, the index of its first key in the job, and its keys."""

    chunk: int
    first: int
    keys: list[str]

    @property
    def end(self) -> int:
        """Index one past this chunk's last key: the job's total when it is the last chunk."""
        return self.first + len(self.keys)


class JobFiles:
    """The files of one job in its destination store."""

    def __init__(self, dest: ObjectStore, job_id: str):
        self.dest, self.job_id = dest, job_id
        self.keys = job_keys(job_id)

    def url(self, role: str) -> str:
        return self.dest.url_for(self.keys[role])

    # --- what was asked -------------------------------------------------

    def write_job(self, record: dict) -> None:
        self.dest.write_bytes(self.keys["job"], dumps(record), "application/json")

    def read_job(self) -> dict:
        """The job's ``job.json``; FileNotFoundError names the job when it has none."""
        try:
            return json.loads(self.dest.read_bytes(self.keys["job"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"no job {self.job_id!r} under {self.dest.url}: "
                                    f"{self.url('job')} does not exist") from None

    # --- the plan ---------------------------------------------------------

    def write_plan(self, plan: PlanChunk) -> None:
        record = {"chunk": plan.chunk, "first": plan.first, "keys": plan.keys}
        self.dest.write_bytes(plan_key(self.job_id, plan.chunk), dumps(record), "application/json")

    def read_plan(self, chunk: int) -> PlanChunk:
        record = json.loads(self.dest.read_bytes(plan_key(self.job_id, chunk)))
        return PlanChunk(record["chunk"], record["first"], record["keys"])

    def last_plan(self) -> PlanChunk | None:
        """The last chunk of the plan's unbroken run from chunk 0 (None before the first).

        Plan files are written a few at a time, so an interrupted planner may leave a gap; the
        files past it are planned again (to the same numbers) by ``clipmask resume``."""
        last = -1
        for key in self.dest.list(self.keys["plan"]):
            if chunk_of(key) != last + 1:
                break
            last += 1
        return None if last < 0 else self.read_plan(last)

    def write_planned(self, chunks: int, total: int, up_to_date: int | None = None) -> None:
        planned = {"chunks": chunks, "total": total, **({"up_to_date": up_to_date} if up_to_date is not None else {})}
        self.dest.write_bytes(self.keys["planned"], dumps(planned), "application/json")

    def read_planned(self) -> dict | None:
        """``{"chunks", "total"}`` once planning is over (with ``up_to_date``, the images a plan
        of what is new left out), else None."""
        try:
            return json.loads(self.dest.read_bytes(self.keys["planned"]))
        except FileNotFoundError:
            return None

    # --- results ------------------------------------------------------------

    def write_results(self, chunk: int, rows: list[dict]) -> None:
        data = b"".join(row_line(row) for row in rows)
        self.dest.write_bytes(results_key(self.job_id, chunk), data, "application/x-ndjson")

    def read_results(self, chunk: int) -> bytes:
        """Chunk ``chunk``'s manifest lines; FileNotFoundError until it has them."""
        return self.dest.read_bytes(results_key(self.job_id, chunk))

    def has_results(self, chunk: int) -> bool:
        return self.dest.exists(results_key(self.job_id, chunk))

    # --- cancellation ---------------------------------------------------------

    def mark_cancelled(self, at: str) -> None:
        self.dest.write_bytes(self.keys["cancelled"], dumps({"cancelled_at": at}), "application/json")

    def is_cancelled(self) -> bool:
        return self.dest.exists(self.keys["cancelled"])


def shard_set(record: dict) -> ShardSet | None:
    """The shards of a job over WebDataset shards (its ``job.json`` has ``shards``: one chunk per
    shard, the plan's keys shard keys under ``source``; ``suffix`` ``.tar`` or ``.parquet``), else
    None."""
    if not record.get("shards"):
        return None
    shards = record["shards"]
    return ShardSet(open_store(record["source"]), shards.get("pattern"), shards.get("suffix", SHARD_SUFFIX))


def count_statuses(lines: bytes) -> dict[str, int]:
    """Per-status counts of manifest lines."""
    counts = {"succeeded": 0, "failed": 0, "skipped": 0}
    for line in lines.splitlines():
        if line:
            counts[json.loads(line)["status"]] += 1
    return counts


def iter_lines(data: bytes) -> Iterator[bytes]:
    return (line + b"\n" for line in data.splitlines() if line)
