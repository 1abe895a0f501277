"""What every route of one server shares, made once at start (``Context.from_env``): the tokens,
the allowed locations, the uploads store, the Redis client, the planners of this process. The
server keeps nothing else: any number of replicas can answer the same requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from storage import ObjectStore, open_store
from tasks import settings
from tasks.api.access import Allowed, Callbacks, Tokens
from tasks.api.planners import Planners
from tasks.errors import UsageError
from tasks.jobs.index import JobIndex

T = TypeVar("T")


@dataclass
class Context:
    tokens: Tokens
    allowed: Allowed
    uploads: ObjectStore | None
    max_bytes: int
    jobs: JobIndex
    callbacks: Callbacks = field(default_factory=lambda: Callbacks(()))
    planners: Planners = field(default_factory=Planners)

    @classmethod
    def from_env(cls, no_auth: bool = False) -> Context:
        """The server's context from the environment; ``UsageError`` for a malformed setting."""
        uploads = settings.API_UPLOADS.get()
        try:
            store = open_store(uploads) if uploads else None
        except ValueError as err:
            raise UsageError(f"CLIPMASK_API_UPLOADS: {err}") from None
        return cls(Tokens.from_env(no_auth), Allowed.from_env(), store, settings.API_MAX_BYTES.get(),
                   JobIndex.from_env(), Callbacks.from_env())

    @property
    def redis(self):
        return self.jobs.redis


def context(request: Request) -> Context:
    return request.app.state.context


async def authorized(request: Request) -> None:
    """A dependency of every ``/v1`` route: ``Authorization: Bearer <token>``, else a ``401``. A
    coroutine, so that it runs on the event loop: a plain function would cost every call a trip
    through the thread pool for a few microseconds of hashing."""
    context(request).tokens.check(request.headers.get("authorization"))


async def blocking(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` on a worker thread: Redis, the broker and storage block."""
    return await run_in_threadpool(function, *args, **kwargs)
