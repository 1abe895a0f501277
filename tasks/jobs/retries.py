"""When a chunk runs again: the budgets of its retries, and whether storage is away.

A chunk that could not finish runs again later, on any worker (a Celery retry: a new message
with a countdown). What its attempts learnt travels in that message as ``RetryState``: one
character per image of the chunk (masked, skipped, still to do: never a key), so that a retry
masks only what is left, and three numbers for the budgets. There are two budgets:

- **Storage away** (requests that did not answer within the time limit, a full or read-only
  disk, a share gone): the chunk runs again for as long as ``CLIPMASK_STORAGE_RETRY_S`` (6 h)
  since storage was first found away. An outage is not the images' fault; a few hours of it are
  worth waiting out rather than recording every image it touched as failed.
- **Anything else worth retrying**: an image whose storage request failed while the store
  answers others, Redis away after its own retries, a worker that cannot load its model or use
  its device: ``CHUNK_RETRIES`` (8) times, as before.

The wait before each attempt doubles from ``RETRY_BACKOFF_S`` up to ``max_delay()``. An attempt
that brings images to an end (progress: the chunk only gets shorter) starts both budgets afresh.
Images that fail for their own reasons (corrupt, an option they cannot take, the device busy past
the time limit) are not retried at all: they are recorded failed, alone.

Storage is away when a failure says so itself (``storage.availability``), or when, after an
attempt whose storage requests failed or stalled, a store does not answer one small request
within ``PROBE_TIMEOUT_S`` (``storage_answers``): a HEAD of a key on S3, the job's own
``job.json`` in DST (so that a folder whose share was unmounted counts as away too).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from storage import ObjectStore, is_transient
from storage.availability import is_unavailable, missing_marker
from tasks import settings

#: Retries of a chunk after failures other than storage being away (about an hour of waits).
CHUNK_RETRIES = 8
#: Seconds before the first retry; the wait doubles with each attempt without progress.
RETRY_BACKOFF_S = 5
#: Seconds a store has to answer the probe after an attempt whose storage requests failed.
PROBE_TIMEOUT_S = 5.0
#: A key probed on a store where any answer will do (S3 answers 404).
PROBE_KEY = "_jobs/.clipmask-probe"
#: Probes a process has in flight at most: one that hangs (a share that never answers) keeps its
#: thread, and once this many hang, a probe that cannot start counts as no answer.
PROBES_IN_FLIGHT = 8
_PROBES = threading.BoundedSemaphore(PROBES_IN_FLIGHT)
#: The marks of ``RetryState.kept``, one per image of the chunk, in plan order.
SUCCEEDED, SKIPPED, TODO = "s", "k", "."


@dataclass(frozen=True)
class RetryState:
    """What a chunk's earlier attempts learnt, carried by its retry message (task keyword
    arguments): ``kept`` (a mark per image: ``s`` masked, ``k`` skipped, ``.`` still to do; empty
    on the first attempt), ``away_since`` (epoch seconds when storage was first found away since
    the last progress, 0 if it was not), ``tries`` (failed attempts since the last progress) and
    ``strikes`` (those that failed otherwise than by storage being away)."""

    kept: str = ""
    away_since: float = 0.0
    tries: int = 0
    strikes: int = 0

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> RetryState:
        return cls(str(kwargs.get("kept") or ""), float(kwargs.get("away_since") or 0),
                   int(kwargs.get("tries") or 0), int(kwargs.get("strikes") or 0))

    def kwargs(self) -> dict:
        return {"kept": self.kept, "away_since": self.away_since, "tries": self.tries, "strikes": self.strikes}

    def kept_for(self, size: int) -> str:
        """``kept`` for a chunk of ``size`` images (all still to do if it does not fit)."""
        return self.kept if len(self.kept) == size and not set(self.kept) - {SUCCEEDED, SKIPPED, TODO} else TODO * size


@dataclass(frozen=True)
class Decision:
    """Run the chunk again after ``delay`` seconds with ``state``, or (``state`` None) give up,
    recording what is left failed, prefixed with ``reason``."""

    state: RetryState | None
    delay: int = 0
    reason: str = ""


def decide(state: RetryState, kept: str, away: bool, now: float) -> Decision:
    """After a failed attempt that left the chunk's images marked ``kept``: retry, or give up.
    ``away``: storage was away (see the module's doc); ``now``: epoch seconds."""
    if _done(kept) > _done(state.kept):  # progress: both budgets start afresh
        state = RetryState(kept)
    tries = state.tries + 1
    if away:
        since = state.away_since or now
        if now - since >= settings.STORAGE_RETRY_S.get():
            return Decision(None, reason=f"gave up after storage was away for {_duration(now - since)} "
                                         f"(CLIPMASK_STORAGE_RETRY_S)")
        following = replace(state, kept=kept, away_since=since, tries=tries)
    else:
        if state.strikes >= CHUNK_RETRIES:
            return Decision(None, reason=f"gave up after {CHUNK_RETRIES} retries")
        following = replace(state, kept=kept, tries=tries, strikes=state.strikes + 1)
    return Decision(following, backoff(tries - 1))


def backoff(retries: int) -> int:
    """Seconds before retry number ``retries`` + 1: 5 s doubling, up to ``max_delay()``."""
    return min(max_delay(), RETRY_BACKOFF_S * 2 ** min(retries, 20))


def max_delay() -> int:
    """The longest wait before a retry: ``CLIPMASK_RETRY_MAX_DELAY_S``, and at most half of what
    the visibility timeout leaves over the time limit. A worker holds a message with a countdown
    unacknowledged until it has run it: on a Redis broker, one held past the visibility timeout
    is handed to another worker as well (and on RabbitMQ, past its ``consumer_timeout``, the
    channel is closed), so countdown plus run must stay under it."""
    margin = settings.VISIBILITY_TIMEOUT.get() - settings.TASK_TIME_LIMIT.get()
    return max(1, min(settings.RETRY_MAX_DELAY_S.get(), margin // 2))


def storage_answers(store: ObjectStore, key: str = PROBE_KEY, must_exist: bool = False) -> str | None:
    """None when ``store`` answers a HEAD of ``key`` (a local folder: it is there, with ``key``
    in it if ``must_exist``) within ``PROBE_TIMEOUT_S``; else why not, naming the store."""
    answer: list = []
    done = threading.Event()
    url = store.url_for(key)

    def probe() -> None:
        try:
            store.check_root()
            answer.append(store.exists(key))
        except Exception as err:  # noqa: BLE001 - judged below
            answer.append(err)
        finally:
            _PROBES.release()
            done.set()

    if not _PROBES.acquire(timeout=PROBE_TIMEOUT_S):
        return f"{url} did not answer: {PROBES_IN_FLIGHT} earlier probes still wait for their answers"
    threading.Thread(target=probe, name="clipmask-probe", daemon=True).start()  # daemon: a hung one ends with the process
    if not done.wait(PROBE_TIMEOUT_S):
        return f"{url} did not answer within {PROBE_TIMEOUT_S:.0f} s"
    result = answer[0]
    if isinstance(result, BaseException):
        if is_transient(result) or is_unavailable(result) or isinstance(result, (FileNotFoundError, NotADirectoryError)):
            return f"{type(result).__name__}: {result}"
        return None  # any other answer (denied, ...) is an answer
    if must_exist and not result:
        return missing_marker(store, key)
    return None


def _done(kept: str) -> int:
    return sum(mark != TODO for mark in kept)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
