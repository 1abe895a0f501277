"""The Redis index of jobs: small counters that a redelivery cannot inflate.

Storage holds the job's record (``tasks/jobs/files.py``); Redis holds, per job, only what stays
small whatever the job's size, so that it can be lost and rebuilt (``clipmask resume``):

- ``clipmask:job:{id}``        hash: source, dest, spec, queue, shards (1 for a job over shards, whose
                               chunks are shards), created_at, chunk_size, window, chunks and
                               total (planned so far), sent (chunks queued so far, see
                               ``scripts``), planned (0/1), cancelled (0/1), planner (host:pid)
                               and planner_beat while planning, succeeded / failed / skipped /
                               chunks_done, created_ts, planned_at, last_progress, healed_at
                               (epoch s), heals (chunks sent again since the last progress, how
                               many times), resent (the first of those chunks, JSON) and
                               resent_count (how many there were), retry_due (the latest
                               time a chunk waiting to run again is due, epoch s), retry_chunk,
                               retry_reason and retry_at (the last such retry: which chunk,
                               why, when), then finished_at and manifest
- ``clipmask:job:{id}:done``   bitmap, one bit per chunk: set once, when its results are in storage
- ``clipmask:jobs:active``     set of the ids of jobs without a manifest, for the healing check

A chunk's counts are added only when its bit goes from 0 to 1, so a redelivered chunk counts
once. The counts are progress; the manifest is the truth, and the finishing step writes its exact
counts back here.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tasks import settings
from tasks.errors import JobNotFoundError
from tasks.jobs import scripts
from tasks.redact import redact_url
from tasks.settings import redis_url

STATUSES = ("succeeded", "failed", "skipped")
#: Seconds a finished job's records stay in Redis (its files in storage stay for good).
FINISHED_TTL_S = 7 * 24 * 3600
#: A planner that has not written its heartbeat for this long is taken for dead.
PLANNER_STALE_S = 60
#: A job sent its missing chunks this many times without progress is stuck: logged as an error,
#: counted in ``clipmask_jobs_stuck``, shown by ``clipmask status``.
STUCK_AFTER_HEALS = 3
#: Chunk numbers a heal records for ``clipmask status`` (the first ones sent again).
RESENT_SHOWN = 5
PREFIX = "clipmask:job:"
ACTIVE = "clipmask:jobs:active"

Claims = list[tuple[int, int]]


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def this_planner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobIndex:
    """Reads and writes the Redis index of jobs; every method is one or two round trips."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        # The bitmap is bytes, not text: read it through a client that does not decode.
        pool = client.connection_pool
        self._raw = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **{**pool.connection_kwargs, "decode_responses": False}))
        self._scripts = {name: client.register_script(getattr(scripts, name))
                         for name in ("PLAN_CHUNK", "RECORD_CHUNK", "FINISH_PLANNING", "FEED", "CANCEL",
                                      "NOTE_RETRY")}

    @classmethod
    def from_env(cls, patient: bool = False) -> "JobIndex":
        """A client of ``redis_url()``. ``patient`` (workers): ride out a Redis restart of about
        a minute by retrying each call; otherwise (commands) fail within seconds."""
        attempts = 10 if patient else 1
        client = redis.Redis.from_url(
            redis_url(), decode_responses=True, socket_connect_timeout=5, socket_timeout=30,
            retry=Retry(ExponentialBackoff(cap=8, base=0.5), attempts),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        return cls(client)

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{PREFIX}{job_id}{':' + part if part else ''}"

    def _run(self, script: str, job_id: str, *args, bitmap: bool = False) -> list:
        keys = [self._key(job_id)] + ([self._key(job_id, "done")] if bitmap else [])
        return self._scripts[script](keys=keys, args=list(args))

    # --- planning -------------------------------------------------------------

    def create(self, job_id: str, record: dict) -> None:
        """Index a new job from its ``job.json`` record; this process is its planner."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id), mapping={
                "source": record["source"], "dest": record["dest"], "spec": json.dumps(record["spec"]),
                **({"queue": record["queue"]} if record.get("queue") else {}),
                **({"shards": 1} if record.get("shards") else {}),
                "created_at": record["created_at"], "chunk_size": record["chunk_size"],
                "window": record.get("window") or settings.JOB_WINDOW.get(),
                "chunks": 0, "total": 0, "sent": 0, "planned": 0, "cancelled": 0, "chunks_done": 0,
                **{status: 0 for status in STATUSES},
                "planner": this_planner(), "planner_beat": time.time(), "created_ts": time.time(),
            })
            pipe.sadd(ACTIVE, job_id)
            pipe.execute()

    def plan_chunk(self, job_id: str, chunks: int, total: int, up_to_date: int | None = None) -> tuple[bool, Claims]:
        """Note that ``chunks`` chunks of ``total`` keys are planned (and, for a plan of what is
        new, how many images were found ``up_to_date``), and beat the planner's heart; returns
        (cancelled meanwhile, the chunks to queue now)."""
        self._note_up_to_date(job_id, up_to_date)
        reply = self._run("PLAN_CHUNK", job_id, chunks, total, time.time())
        return reply[0] == 1, _pairs(reply[1:])

    def _note_up_to_date(self, job_id: str, up_to_date: int | None) -> None:
        if up_to_date is not None:
            self.redis.hset(self._key(job_id), "up_to_date", up_to_date)

    def claim_planning(self, job_id: str, chunks: int, total: int) -> None:
        """Make this process the job's planner again (``resume``) at ``chunks``/``total``."""
        self.redis.hset(self._key(job_id), mapping={
            "planner": this_planner(), "planner_beat": time.time(), "chunks": chunks, "total": total})

    def finish_planning(self, job_id: str, chunks: int, total: int,
                        up_to_date: int | None = None) -> tuple[bool, Claims]:
        """Planning is over; returns (every chunk already done: finish the job, chunks to queue)."""
        self._note_up_to_date(job_id, up_to_date)
        reply = self._run("FINISH_PLANNING", job_id, chunks, total, time.time())
        return reply[0] == 1, _pairs(reply[1:])

    # --- chunks -----------------------------------------------------------------

    def is_done(self, job_id: str, chunk: int) -> bool:
        return self.redis.getbit(self._key(job_id, "done"), chunk) == 1

    def record_chunk(self, job_id: str, chunk: int, counts: dict[str, int]) -> tuple[int, Claims]:
        """Mark ``chunk`` done with its per-status counts, once; returns (code, chunks to queue):
        code -1 unknown job, 0 already done, 1 counted, 2 counted and the job is complete."""
        reply = self._run("RECORD_CHUNK", job_id, chunk, *(counts.get(s, 0) for s in STATUSES), time.time(),
                          bitmap=True)
        return reply[0], _pairs(reply[1:])

    def note_retry(self, job_id: str, chunk: int, due: float, reason: str) -> None:
        """Note that ``chunk`` runs again at ``due`` (epoch s) because of ``reason``: the healing
        check leaves the job alone until a visibility timeout after its latest retry is due."""
        self._run("NOTE_RETRY", job_id, chunk, due, reason, time.time())

    def feed(self, job_id: str) -> Claims:
        """The chunks that fit the job's window now (nothing for a cancelled or unknown job)."""
        return _pairs(self._run("FEED", job_id))

    def missing_chunks(self, job_id: str, below: int) -> list[int]:
        """Chunk numbers below ``below`` whose bit is not set: one GET of the bitmap."""
        raw = self._raw.get(self._key(job_id, "done")) or b""
        return [n for n in range(below) if n // 8 >= len(raw) or not raw[n // 8] >> (7 - n % 8) & 1]

    # --- the job ----------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        """The job's hash, or None when Redis does not know the job."""
        return self.redis.hgetall(self._key(job_id)) or None

    def info(self, job_id: str) -> dict:
        """The job's hash; raises ``JobNotFoundError``."""
        data = self.get(job_id)
        if not data:
            raise JobNotFoundError(
                f"no job {job_id!r} in Redis at {redact_url(redis_url())}: check the id and that "
                "CLIPMASK_REDIS_URL (else CELERY_RESULT_BACKEND, else a redis:// CELERY_BROKER_URL) points "
                "where it was submitted; a job whose "
                "records Redis lost is rebuilt from storage by: clipmask resume JOB --out DST")
        return data

    def cancel(self, job_id: str) -> tuple[dict, bool]:
        """Flag the job cancelled; returns its hash (``JobNotFoundError`` if unknown) and whether
        nothing is left in flight (finish the job now)."""
        data = self.info(job_id)
        return data, self._run("CANCEL", job_id) == 1

    def note_healed(self, job_id: str, chunks: list[int]) -> None:
        """Record that ``chunks`` (none: the finishing step) were sent again, once more since the
        job's last progress."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id), mapping={"healed_at": time.time(),
                                                  "resent": json.dumps(chunks[:RESENT_SHOWN]),
                                                  "resent_count": len(chunks)})
            pipe.hincrby(self._key(job_id), "heals", 1)
            pipe.execute()

    def status(self, job_id: str) -> dict:
        """``job_id``, ``state``, ``total``, the per-status counts and planning state (docs/design.md, "Lifecycle")."""
        return job_status(job_id, self.info(job_id))

    def mark_finished(self, job_id: str, counts: dict[str, int], total: int, manifest_url: str) -> None:
        """Write the manifest's exact counts, stamp the finish once and let the records expire."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id), mapping={**counts, "total": total, "manifest": manifest_url})
            pipe.hsetnx(self._key(job_id), "finished_at", now_iso())
            pipe.srem(ACTIVE, job_id)
            for part in ("", "done"):
                pipe.expire(self._key(job_id, part), FINISHED_TTL_S)
            pipe.execute()

    def rebuild(self, job_id: str, record: dict, chunks: int, total: int, planned: bool, cancelled: bool) -> None:
        """Index a job again from its files, as if nothing were done (chunks recount from results)."""
        self.create(job_id, record)
        self.redis.hset(self._key(job_id), mapping={
            "chunks": chunks, "total": total, "planned": int(planned), "cancelled": int(cancelled), "sent": 0})
        self.redis.hdel(self._key(job_id), "planner", "planner_beat")

    # --- healing ----------------------------------------------------------------

    def active(self) -> list[str]:
        return sorted(self.redis.smembers(ACTIVE))

    def forget(self, job_id: str) -> None:
        self.redis.srem(ACTIVE, job_id)

    def take_turn(self, name: str, seconds: float) -> bool:
        """True for one caller among all workers per ``seconds`` (a lock that expires)."""
        return bool(self.redis.set(f"clipmask:lock:{name}", this_planner(), nx=True, px=int(seconds * 1000)))


def _pairs(flat: list) -> Claims:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def job_status(job_id: str, data: dict) -> dict:
    counts = {status: int(data.get(status, 0)) for status in STATUSES}
    done = sum(counts.values())
    planned = data.get("planned") == "1"
    shards = data.get("shards") == "1"  # chunks are shards; samples are known as shards are read
    chunks, chunks_done = int(data.get("chunks", 0)), int(data.get("chunks_done", 0))
    if data.get("manifest"):  # every chunk has its rows: a cancelled job's unread ones as skipped
        chunks_done = chunks
    return {
        "job_id": job_id, "state": _state(data), "total": done if shards else int(data.get("total", 0)), **counts,
        "shards": shards,
        "up_to_date": int(data.get("up_to_date", 0)),
        "done": done, "chunks": chunks, "chunks_done": chunks_done,
        "chunks_queued": 0 if data.get("manifest") else int(data.get("sent", 0)) - chunks_done,
        "planned": planned, "planning_interrupted": planning_interrupted(data),
        "source": data.get("source"), "dest": data.get("dest"),
        "spec": json.loads(data["spec"]) if data.get("spec") else None,
        "created_at": data.get("created_at"), "finished_at": data.get("finished_at"),
        "manifest": data.get("manifest"), **healing_state(data), "retrying": retrying(data),
    }


def is_complete(data: dict) -> bool:
    """Every chunk that will run has its results (as the Lua scripts' ``complete``): only the
    finishing step, which writes the manifest, is left."""
    if data.get("planned") != "1":
        return False
    done = int(data.get("chunks_done", 0))
    return done >= int(data.get("chunks", 0)) or (data.get("cancelled") == "1" and done >= int(data.get("sent", 0)))


def waiting_note(state: dict) -> str:
    """What a job without progress waits for, from ``healing_state``: "no progress for 6 min;
    chunk 17 sent again 5 times" (empty while it has been sent nothing again)."""
    if not state["heals"]:
        return ""
    resent = state["resent"]
    what = (f"chunk{'s' if len(resent) > 1 else ''} {', '.join(map(str, resent))}"
            f"{' and more' if state['resent_count'] > len(resent) else ''}" if resent else "its finishing step")
    times = "once" if state["heals"] == 1 else f"{state['heals']} times"
    return f"no progress for {_duration(state['quiet_s'])}; {what} sent again {times}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def retrying(data: dict) -> dict | None:
    """The job's last chunk sent to run again, unless a chunk finished since or the job has its
    manifest: ``{"chunk", "due_in_s" (negative once due), "reason"}``; else None."""
    at = float(data.get("retry_at") or 0)
    if not at or data.get("manifest") or at < float(data.get("last_progress") or 0):
        return None
    return {"chunk": int(data.get("retry_chunk") or 0), "reason": data.get("retry_reason", ""),
            "due_in_s": round(float(data.get("retry_due") or at) - time.time(), 1)}


def retry_note(report: dict) -> str:
    """What ``clipmask status`` says of a chunk waiting to run again: "chunk 3 runs again in
    12 s: storage did not answer ..." (empty when none waits)."""
    retry = report.get("retrying")
    if not retry:
        return ""
    when = f"in {_duration(retry['due_in_s'])}" if retry["due_in_s"] > 0 else "now"
    return f"chunk {retry['chunk']} runs again {when}: {retry['reason']}"


def healing_state(data: dict) -> dict:
    """How long the job has gone without progress and what was sent again meanwhile:
    ``quiet_s`` (seconds since a chunk last finished, or since the job was created), ``heals``,
    ``resent`` (the first chunks sent again; empty: the finishing step), ``resent_count`` and
    ``stuck``."""
    heals = int(data.get("heals") or 0)
    since = max(float(data.get(name) or 0) for name in ("created_ts", "last_progress"))
    quiet = round(time.time() - since, 1) if since and not data.get("manifest") else 0.0
    return {"quiet_s": quiet, "heals": heals, "resent": json.loads(data.get("resent") or "[]"),
            "resent_count": int(data.get("resent_count") or 0),
            "stuck": heals >= STUCK_AFTER_HEALS}


def planning_interrupted(data: dict) -> bool:
    """Planning is not over and its planner is gone: dead on this host, or silent too long."""
    if data.get("planned") == "1":
        return False
    planner, beat = data.get("planner"), float(data.get("planner_beat") or 0)
    if not planner:
        return True
    host, _, pid = planner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return True
    return time.time() - beat > PLANNER_STALE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state(data: dict) -> str:
    if data.get("cancelled") == "1":
        return "cancelled"
    if is_complete(data):
        return "finished"
    return "running" if int(data.get("chunks_done", 0)) else "queued"
