"""``/healthz`` (the process answers) and ``/readyz`` (the broker, Redis and storage answer). No auth:
a load balancer's and an orchestrator's probes."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tasks.api.context import Context, blocking, context
from tasks.api.problems import MEDIA_TYPE, Problem, documented
from tasks.redact import redact_url

router = APIRouter(tags=["health"])

#: Seconds each readiness check may take.
CHECK_TIMEOUT_S = 3.0
#: Threads for readiness checks: a check that hangs holds one until it answers.
_CHECKS = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="clipmask-readyz")


@router.get("/healthz", summary="Liveness: the process answers",
            responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the broker, Redis and storage answer",
            responses={200: {"content": {"application/json": {"example": {
                "status": "ready", "checks": {"broker": "ok", "redis": "ok", "storage": "ok"}}}}},
                **documented(503)})
async def readyz(request: Request) -> JSONResponse:
    """`200` when the broker, Redis and the uploads store (where one is set) each answer within
    3 s; `503` naming what does not."""
    checks = await blocking(run_checks, context(request))
    if all(result == "ok" for result in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(f"{name}: {result}" for name, result in checks.items() if result != "ok")
    problem = Problem(503, "not-ready", f"not ready: {failing}", headers={"Retry-After": "5"}, checks=checks)
    return JSONResponse(problem.body("/readyz"), status_code=503, media_type=MEDIA_TYPE, headers=problem.headers)


def run_checks(ctx: Context) -> dict[str, str]:
    """Each check's answer, ``ok`` or why not, all at once, each within ``CHECK_TIMEOUT_S``."""
    checks: dict[str, Callable[[], None]] = {"broker": _broker, "redis": lambda: _redis(ctx)}
    if ctx.uploads is not None:
        checks["storage"] = lambda: _storage(ctx)
    futures = {name: _CHECKS.submit(check) for name, check in checks.items()}
    results = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT_S)
            results[name] = "ok"
        except concurrent.futures.TimeoutError:
            results[name] = f"no answer within {CHECK_TIMEOUT_S:.0f} s"
        except Exception as err:  # noqa: BLE001 - what is wrong, said
            results[name] = redact_url(f"{type(err).__name__}: {err}")
    return results


def _broker() -> None:
    from tasks.jobs.queue import check_broker

    check_broker()


def _redis(ctx: Context) -> None:
    ctx.redis.ping()


def _storage(ctx: Context) -> None:
    from tasks.jobs.retries import storage_answers

    away = storage_answers(ctx.uploads)
    if away:
        raise ConnectionError(away)
