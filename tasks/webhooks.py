"""Callbacks: a result POSTed to the caller's URL when a mask request or a job ends, signed as
Standard Webhooks specifies, delivered by the workers at least once.

A message is ``{"type": "mask.finished" | "job.finished", "timestamp", "data"}``: for a mask, what
``GET /v1/masks/{id}`` answers once it has an outcome; for a job, its summary with its ``job_id``.
Its headers are ``webhook-id`` (the same on every attempt: ``mask_<id>``, ``job_<id>``, for the
receiver to drop repeats), ``webhook-timestamp`` (this attempt's, epoch seconds) and
``webhook-signature`` (``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body`` keyed by
``CLIPMASK_WEBHOOK_SECRET``, a ``whsec_`` secret; the ``standardwebhooks`` package verifies it).

Delivery is a task of its own (``clipmask.deliver_webhook``), so a restarted API loses none, and
a receiver away delays nothing else: an answer other than 2xx, or none within 10 s, is tried
again after 5 s, doubling up to 5 min, for an hour. Redirects are not followed: a callback goes
to the URL the API allowed (``CLIPMASK_API_CALLBACKS``) and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

from tasks import settings
from tasks.errors import UsageError

DELIVER = "clipmask.deliver_webhook"
#: Seconds a message is tried for, then given up (logged).
RETRY_FOR_S = 3600
#: The first wait before a message is tried again, and the longest, seconds.
FIRST_DELAY_S, MAX_DELAY_S = 5, 300
#: Seconds a receiver has to answer one attempt.
TIMEOUT_S = 10
ROLES = ("mask", "raw")


class DeliveryError(Exception):
    """Raised when an attempt was not answered with a 2xx."""


def secret_key() -> bytes:
    """The signing key: ``CLIPMASK_WEBHOOK_SECRET`` without its ``whsec_`` prefix, base64-decoded.
    Raises ``UsageError`` when it is unset or not base64."""
    raw = settings.WEBHOOK_SECRET.get()
    if not raw:
        raise UsageError("CLIPMASK_WEBHOOK_SECRET is not set: callbacks cannot be signed")
    try:
        key = base64.b64decode(raw.removeprefix("whsec_") + "==", validate=False)
    except (binascii.Error, ValueError):
        raise UsageError("CLIPMASK_WEBHOOK_SECRET must be whsec_ and base64, e.g. whsec_" +
                         base64.b64encode(b"32 random bytes, not these ones.").decode()) from None
    if not key:
        raise UsageError("CLIPMASK_WEBHOOK_SECRET is empty after its whsec_ prefix")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for one attempt."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message(event_type: str, data: dict) -> bytes:
    from tasks.jobs.index import now_iso

    return json.dumps({"type": event_type, "timestamp": now_iso(), "data": data}, sort_keys=True).encode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args, **_kwargs):
        return None  # a 3xx is then an answer like any other non-2xx


_OPENER = urllib.request.build_opener(_NoRedirects)


def deliver(url: str, msg_id: str, body: bytes, key: bytes) -> int:
    """POST ``body`` to ``url``, signed now; returns the status, or raises ``DeliveryError``."""
    timestamp = int(time.time())
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "clipmask-webhooks", "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp), "webhook-signature": sign(key, msg_id, timestamp, body)})
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as err:
        raise DeliveryError(f"{url} answered {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DeliveryError(f"{url} did not answer: {getattr(err, 'reason', err)}") from None


def retry_delay(attempt: int, first_try: float, now: float | None = None) -> float | None:
    """Seconds before the next attempt, or None once ``RETRY_FOR_S`` have passed."""
    left = first_try + RETRY_FOR_S - (time.time() if now is None else now)
    if left <= 0:
        return None
    return min(FIRST_DELAY_S * 2 ** attempt, MAX_DELAY_S, left)


def send(url: str, msg_id: str, event_type: str, data: dict) -> None:
    """Queue the delivery of one message (the workers run it)."""
    from tasks.jobs.queue import app

    app.send_task(DELIVER, args=(url, msg_id, event_type, data), ignore_result=True)


def mask_result(mask_id: str, row: dict) -> dict:
    """What ``GET /v1/masks/{id}`` answers once the request has an outcome (``row``: the task's
    result, a manifest row plus ``metadata``)."""
    files = {role: f"/v1/masks/{mask_id}/{role}.png" for role in ROLES if role in (row.get("outputs") or {})}
    return {"id": mask_id, "state": "finished", **row, "files": files}


def job_callback_key(job_id: str) -> str:
    """Where a job's callback URL is kept under its dest, beside its other records."""
    from storage.layout import JOBS_PREFIX

    return f"{JOBS_PREFIX}{job_id}/callback.json"
