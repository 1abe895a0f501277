"""Errors as ``application/problem+json`` (RFC 9457): one exception, ``Problem``, and the
handlers that turn it, Starlette's ``HTTPException``, request validation errors and the job
side's ``ClipmaskError`` into one.

A problem is ``{"type", "title", "status", "detail"}`` plus members of its own: ``errors`` (a
list of ``{"field", "message"}``) for a ``422``, ``allowed`` for a ``403`` of a location,
``state`` for a ``409`` of something not finished, ``checks`` for ``/readyz``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from tasks.errors import ClipmaskError, explain

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
#: Problem types, by slug: ``urn:clipmask:problem:<slug>``.
TYPE_PREFIX = "urn:clipmask:problem:"


class Problem(Exception):
    """An error the caller can act on: an HTTP ``status``, a short ``slug`` naming its type, what
    to do in ``detail``, and any ``extra`` members (``errors``, ``allowed``, ...)."""

    def __init__(self, status: int, slug: str, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.slug, self.detail, self.headers, self.extra = status, slug, detail, headers or {}, extra

    def body(self, instance: str | None = None) -> dict:
        return {"type": TYPE_PREFIX + self.slug, "title": HTTPStatus(self.status).phrase, "status": self.status,
                "detail": self.detail, **({"instance": instance} if instance else {}), **self.extra}

    def response(self, instance: str | None = None) -> JSONResponse:
        return JSONResponse(self.body(instance), status_code=self.status, media_type=MEDIA_TYPE,
                            headers=self.headers)


class ProblemBody(BaseModel):
    """An error, as RFC 9457 writes it; ``errors`` names each invalid field of a ``422``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


def invalid(errors: Iterable[dict]) -> Problem:
    """A ``422`` naming each invalid field: ``errors`` as pydantic lists them (``loc``, ``msg``)."""
    named = [{"field": _field(error.get("loc", ())), "message": error.get("msg", "invalid")} for error in errors]
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in named)
    return Problem(422, "invalid-request", detail or "invalid request", errors=named)


def invalid_field(field: str, message: str) -> Problem:
    return invalid([{"loc": (field,), "msg": message}])


def _field(loc: Iterable) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    return ".".join(parts)


def documented(*statuses: int) -> dict[int | str, dict]:
    """``responses=`` of a route: each status an ``application/problem+json`` body, for OpenAPI."""
    return {status: {"model": ProblemBody, "description": HTTPStatus(status).phrase,
                     "content": {MEDIA_TYPE: {"example": EXAMPLES.get(status) or _example(status)}}}
            for status in statuses}


def _example(status: int) -> dict:
    return {"type": TYPE_PREFIX + "...", "title": HTTPStatus(status).phrase, "status": status, "detail": "..."}


EXAMPLES = {
    401: {"type": TYPE_PREFIX + "unauthorized", "title": "Unauthorized", "status": 401,
          "detail": "send Authorization: Bearer <token>, one of CLIPMASK_API_TOKENS"},
    403: {"type": TYPE_PREFIX + "location-not-allowed", "title": "Forbidden", "status": 403,
          "detail": "source s3://other/a.jpg is not under an allowed prefix (CLIPMASK_API_ALLOWED: "
                    "s3://uploads/, s3://masks/)", "field": "source", "allowed": ["s3://uploads/", "s3://masks/"]},
    404: {"type": TYPE_PREFIX + "not-found", "title": "Not Found", "status": 404,
          "detail": "no mask request 3f2a...: unknown, or its result expired"},
    409: {"type": TYPE_PREFIX + "not-finished", "title": "Conflict", "status": 409,
          "detail": "job 3f2a... has no manifest yet (running)", "state": "running"},
    413: {"type": TYPE_PREFIX + "too-large", "title": "Content Too Large", "status": 413,
          "detail": "the request body is over 67108864 bytes (CLIPMASK_API_MAX_BYTES)"},
    422: {"type": TYPE_PREFIX + "invalid-request", "title": "Unprocessable Content", "status": 422,
          "detail": "threshold: Input should be less than or equal to 1",
          "errors": [{"field": "threshold", "message": "Input should be less than or equal to 1"}]},
    503: {"type": TYPE_PREFIX + "unavailable", "title": "Service Unavailable", "status": 503,
          "detail": "cannot reach Redis at redis://127.0.0.1:6379/0 (...)"},
}


def install(app: FastAPI) -> None:
    """Every error of ``app`` as ``application/problem+json``."""

    async def on_problem(request: Request, err: Problem) -> JSONResponse:
        return err.response(request.url.path)

    async def on_http(request: Request, err: HTTPException) -> JSONResponse:
        slug = {401: "unauthorized", 404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(
            err.status_code, "http-error")
        detail = err.detail if isinstance(err.detail, str) else HTTPStatus(err.status_code).phrase
        return Problem(err.status_code, slug, detail, headers=getattr(err, "headers", None)).response(request.url.path)

    async def on_validation(request: Request, err: RequestValidationError | ValidationError) -> JSONResponse:
        return invalid(err.errors()).response(request.url.path)

    async def on_clipmask(request: Request, err: Exception) -> JSONResponse:
        return from_error(err).response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(ClipmaskError, on_clipmask)
    # Redis or the broker away while a request is answered: a 503, not a 500 with a traceback.
    from kombu.exceptions import OperationalError
    from redis import RedisError

    app.add_exception_handler(RedisError, on_clipmask)
    app.add_exception_handler(OperationalError, on_clipmask)


def from_error(err: BaseException) -> Problem:
    """What the job side raises (or Redis, the broker, storage), as a problem: a service away is
    ``503``, a job or object not there ``404``, anything the request asked wrongly ``422``."""
    from tasks.errors import (
        JobNotFoundError,
        NoImagesError,
        PlanningBusyError,
        ServiceUnavailableError,
        StorageProblem,
    )

    known = explain(err)
    if known is None:
        raise err
    message = str(known)
    if isinstance(known, ServiceUnavailableError):
        return Problem(503, "unavailable", message, headers={"Retry-After": "5"})
    if isinstance(known, JobNotFoundError):
        return Problem(404, "not-found", message)
    if isinstance(known, PlanningBusyError):
        return Problem(409, "busy", message)
    if isinstance(known, StorageProblem) and _away(err):
        return Problem(503, "storage-unavailable", message, headers={"Retry-After": "5"})
    if isinstance(known, NoImagesError):
        return Problem(422, "no-images", message)
    return Problem(422, "invalid-request", message)


def _away(err: BaseException) -> bool:
    from storage import is_transient
    from storage.availability import is_unavailable

    return isinstance(err, (ConnectionError, TimeoutError)) or is_transient(err) or is_unavailable(err)
