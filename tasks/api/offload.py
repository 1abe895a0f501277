"""One-image requests: the ``clipmask.mask_image`` task sent by name, its record, its state.

A request's id is its task's id. Before the task is sent, the API writes a small record in Redis,
``clipmask:mask:<id>`` (source, dest, created_at), which expires with the task's result
(``CLIPMASK_RESULT_EXPIRES``): an id without one is unknown (``404``), so the result backend's
``PENDING``, which Celery also answers for ids it never saw, only ever means queued. The result is
the task's return value, read from the result backend: the manifest row plus the metadata record.

This process never waits on a result through Celery: it reads task states with one ``GET``
each. Celery would otherwise subscribe to every sent task's result channel, and a server that
never reads those messages would hold them for good.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import redis
from celery import states

from tasks import settings
from tasks.jobs.index import now_iso
from tasks.jobs.queue import app
from worker.spec import MaskSpec

MASK_IMAGE = "clipmask.mask_image"
PREFIX = "clipmask:mask:"
#: Sending a request's task retries for about 5 s while the broker is away (then a ``503``): a
#: caller waits on it, unlike a chunk, which rides out a restart of a minute.
SEND_RETRY = {"max_retries": 10, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


def never_join_results() -> None:
    """Send tasks without subscribing to their results (see the module's docstring): what Celery
    does in its own worker processes, where a task never waits on another's result."""
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(True)


def app_backend():
    """The result backend results are read from (made on first use)."""
    return app.backend


def new_mask_id() -> str:
    return uuid.uuid4().hex


def send_mask(client: redis.Redis, mask_id: str, root: str, key: str, dest: str, spec: MaskSpec,
              uploaded: bool = False, callback_url: str | None = None) -> None:
    """Record the request, then queue its task (``tasks.masks.mask_image``) under the same id;
    the task POSTs its result to ``callback_url`` too."""
    record = {"source": root.rstrip("/") + "/" + key, "dest": dest, "created_at": now_iso(), "uploaded": int(uploaded)}
    client.set(PREFIX + mask_id, json.dumps(record), ex=settings.RESULT_EXPIRES.get())
    args, kwargs = (root, key, dest, spec.to_dict()), {"callback_url": callback_url} if callback_url else {}
    try:
        # The arguments' repr given, as Celery would write it: its own safe repr of them costs a
        # third of the send.
        app.send_task(MASK_IMAGE, args=args, kwargs=kwargs, task_id=mask_id, retry_policy=SEND_RETRY,
                      argsrepr=repr(args), kwargsrepr=repr(kwargs))
    except Exception:
        client.delete(PREFIX + mask_id)  # never queued: unknown
        raise


@dataclass(frozen=True)
class MaskState:
    """Where a request is: ``queued``, ``running`` or ``finished`` (then ``row`` is its result)."""

    state: str
    row: dict | None = None


def record_of(client: redis.Redis, mask_id: str) -> dict | None:
    raw = client.get(PREFIX + mask_id)
    return json.loads(raw) if raw else None


def mask_state(mask_id: str, record: dict) -> MaskState:
    """The request's state from the result backend (one ``GET``). A task that raised (its retries
    spent, say) is a ``failed`` row with the reason, as an image that failed is."""
    meta = app.backend.get_task_meta(mask_id)
    status = meta.get("status")
    if status == states.SUCCESS:
        return MaskState("finished", meta["result"])
    if status in states.EXCEPTION_STATES:
        reason = "revoked" if status == states.REVOKED else _reason(meta.get("result"))
        return MaskState("finished", {"source": record["source"], "status": "failed", "error": reason})
    if status == states.STARTED:
        return MaskState("running")
    return MaskState("queued")  # PENDING, RECEIVED, RETRY (it runs again)


def _reason(result: object) -> str:
    """What a task that raised left in the result backend, as ``Type: message``."""
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    if isinstance(result, dict):  # not turned back into an exception
        message = result.get("exc_message", "")
        message = ", ".join(map(str, message)) if isinstance(message, (list, tuple)) else str(message)
        return f"{result.get('exc_type', 'Error')}: {message}"
    return str(result)
