"""Sending clipmask's tasks by name, from processes that never load the engine.

Task messages are small and of fixed size: a job id, a chunk number, the job's destination URL
(where its plan and spec live) and the chunk's key count. Nothing subscribes to their results:
chunks report through the job's files and the Redis index, never through the result backend.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

from worker.celery_app import app, ready_messages

MASK_CHUNK = "clipmask.mask_chunk"
FINISH_JOB = "clipmask.finish_job"


@contextmanager
def producer() -> Iterator[object]:
    """One broker connection for many sends (planning sends a message per chunk)."""
    with app.producer_or_acquire() as prod:
        yield prod


#: Broker URL schemes clipmask is tested with.
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


def broker_url() -> str:
    return str(app.conf.broker_url)


def check_broker() -> None:
    """Fail fast, before a job is recorded, when the broker URL is malformed or unreachable.

    Raises ``ValueError`` naming ``CELERY_BROKER_URL`` for a malformed URL, kombu's
    ``OperationalError`` when the broker does not answer."""
    url = broker_url()
    parsed = urlparse(url)
    if parsed.scheme not in BROKER_SCHEMES or not parsed.hostname:
        raise ValueError(f"CELERY_BROKER_URL {url!r} is not a broker URL: expected redis://host:6379/0 or "
                         "amqp://user:password@host:5672//")
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)


def default_queue() -> str:
    return str(app.conf.task_default_queue)


def send_chunk(job_id: str, chunk: int, dest: str, size: int, prod=None, queue: str | None = None) -> None:
    """Queue one chunk, on ``queue`` (the job's) or else this process's default queue."""
    args = (job_id, chunk, dest, size)
    # The arguments' repr given, as Celery would write it: its own safe repr costs a planner a
    # tenth of each send, for four plain values.
    app.send_task(MASK_CHUNK, args=args, ignore_result=True, producer=prod, queue=queue,
                  argsrepr=repr(args), kwargsrepr="{}")


def send_finish(job_id: str, dest: str, queue: str | None = None) -> None:
    app.send_task(FINISH_JOB, args=(job_id, dest), ignore_result=True, queue=queue)


def queued_messages() -> int:
    """Messages waiting in clipmask's queue (0 when the queue does not exist yet)."""
    return ready_messages(default_queue())
