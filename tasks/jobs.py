"""Job records in Redis: plan, progress and outcomes.

Keys (``{id}`` is the job id):
- ``clipmask:job:{id}``           hash: source, dest, spec, created_at, total, planned, cancelled,
                                  then finished_at and manifest (URL, once the records are written)
- ``clipmask:job:{id}:outcomes``  hash: input key -> manifest row (JSON)
- ``clipmask:job:{id}:succeeded`` / ``:failed`` / ``:skipped``  sets of input keys

Progress is counted with sets, so a redelivered task that records an input again changes no
count. ``finished`` means planning is over and every planned input has an outcome.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from typing import Iterator

import redis

STATUSES = ("succeeded", "failed", "skipped")
#: Seconds a finished job's records stay in Redis (the manifest in storage stays for good).
FINISHED_TTL_S = 7 * 24 * 3600
PREFIX = "clipmask:job:"


class JobNotFoundError(LookupError):
    """Raised when a job id is unknown to Redis (mistyped, or expired after FINISHED_TTL_S)."""


def redis_url() -> str:
    """``CLIPMASK_REDIS_URL``, else the Redis among the Celery backend and broker URLs."""
    explicit = os.environ.get("CLIPMASK_REDIS_URL")
    if explicit:
        return explicit
    for name in ("CELERY_RESULT_BACKEND", "CELERY_BROKER_URL"):
        value = os.environ.get(name, "")
        if value.startswith(("redis://", "rediss://", "unix://")):
            return value
    return "redis://127.0.0.1:6379/0"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobStore:
    """Reads and writes job records; every method is one or two round trips."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    @classmethod
    def from_env(cls) -> "JobStore":
        return cls(redis.Redis.from_url(redis_url(), decode_responses=True))

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{PREFIX}{job_id}{':' + part if part else ''}"

    def create(self, job_id: str, source: str, dest: str, spec: dict, skip_existing: bool) -> None:
        self.redis.hset(self._key(job_id), mapping={
            "source": source, "dest": dest, "spec": json.dumps(spec), "skip_existing": int(skip_existing),
            "created_at": now_iso(), "total": 0, "planned": 0, "cancelled": 0,
        })

    def add_planned(self, job_id: str, count: int) -> None:
        self.redis.hincrby(self._key(job_id), "total", count)

    def finish_planning(self, job_id: str) -> None:
        self.redis.hset(self._key(job_id), "planned", 1)

    def cancel(self, job_id: str) -> None:
        self.info(job_id)
        self.redis.hset(self._key(job_id), "cancelled", 1)

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id), "cancelled") == "1"

    def record(self, job_id: str, key: str, row: dict) -> None:
        """Store ``key``'s outcome; recording the same key again replaces, never adds."""
        status = row["status"]
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id, "outcomes"), key, json.dumps(row, sort_keys=True))
            for other in STATUSES:
                if other != status:
                    pipe.srem(self._key(job_id, other), key)
            pipe.sadd(self._key(job_id, status), key)
            pipe.execute()

    def has_outcome(self, job_id: str, key: str) -> bool:
        return bool(self.redis.hexists(self._key(job_id, "outcomes"), key))

    def info(self, job_id: str) -> dict:
        """The job's hash; raises ``JobNotFoundError``."""
        data = self.redis.hgetall(self._key(job_id))
        if not data:
            raise JobNotFoundError(f"no job {job_id!r} in Redis at {redis_url()}: check the id and "
                                   "that CELERY_BROKER_URL / CLIPMASK_REDIS_URL point where it was submitted")
        return data

    def is_complete(self, job_id: str) -> bool:
        """Planning is over and every planned input has an outcome (cancelled or not)."""
        status = self.status(job_id)
        return status["planned"] and status["done"] >= status["total"]

    def status(self, job_id: str) -> dict:
        """``job_id``, ``state``, ``total`` and the per-status counts (DESIGN.md)."""
        data = self.info(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for status in STATUSES:
                pipe.scard(self._key(job_id, status))
            counts = dict(zip(STATUSES, pipe.execute()))
        total, done = int(data["total"]), sum(counts.values())
        return {
            "job_id": job_id, "state": _state(data, done), "total": total, **counts, "done": done,
            "planned": data["planned"] == "1", "source": data["source"], "dest": data["dest"],
            "spec": json.loads(data["spec"]), "created_at": data["created_at"],
            "finished_at": data.get("finished_at"), "manifest": data.get("manifest"),
        }

    def mark_finished(self, job_id: str) -> None:
        """Stamp the finish time once and let the records expire later."""
        self.redis.hsetnx(self._key(job_id), "finished_at", now_iso())
        for part in ("", "outcomes", *STATUSES):
            self.redis.expire(self._key(job_id, part), FINISHED_TTL_S)

    def set_manifest(self, job_id: str, url: str) -> None:
        """Record where the manifest was written: its presence means the job's records exist."""
        self.redis.hset(self._key(job_id), "manifest", url)

    def outcomes(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(input key, manifest row) pairs, streamed with HSCAN."""
        for key, row in self.redis.hscan_iter(self._key(job_id, "outcomes"), count=1000):
            yield key, json.loads(row)


def _state(data: dict, done: int) -> str:
    if data.get("cancelled") == "1":
        return "cancelled"
    if data["planned"] == "1" and done >= int(data["total"]):
        return "finished"
    return "running" if done else "queued"
