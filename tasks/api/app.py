"""The ASGI application of ``clipmask serve``: the routes, the body limit, the metrics, errors as
problem details, and the OpenAPI schema (``/openapi.json``, ``/docs``)."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from tasks.api import health, jobs, masks, problems
from tasks.api.context import Context
from tasks.api.metrics import ApiMetrics, Measured
from tasks.api.offload import app_backend, never_join_results
from tasks.api.uploads import BodyLimit
from worker import heap

log = logging.getLogger(__name__)

DESCRIPTION = """Text-prompted image masks (CLIPSeg) on clipmask's workers, over HTTP.

Every `/v1` call needs `Authorization: Bearer <token>` (one of `CLIPMASK_API_TOKENS`). A request's
`source` and `dest` must lie under a prefix of `CLIPMASK_API_ALLOWED` (else `403`). Errors are
`application/problem+json` (RFC 9457); a `422` names each invalid field in `errors`.

- `POST /v1/masks` masks one image (a URL, or an upload) and answers `202` with its id;
  `GET /v1/masks/{id}` is `202` until it has an outcome, then `200` with the result;
  `/v1/masks/{id}/mask.png` and `/raw.png` are its outputs; with `outputs: ["rle"]` there are no
  PNGs, and the result's `metadata.rle` is the thresholded mask as COCO RLE.
- `POST /v1/jobs` submits a dataset job; `GET /v1/jobs/{id}` is `clipmask status --json`;
  `/cancel`, `/resume`, and `/manifest` once it has finished.
"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("clipmask")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def settle(app: FastAPI, ctx: Context) -> None:
    """Make what the first requests would otherwise make (the schema, the result backend, the
    broker's, Redis' and the uploads store's clients, botocore's service models among them,
    through one readiness check, whatever it answers), then move every object made so far out
    of the garbage collector's sight (``worker.heap.settle``): they live as long as the process, and a
    full collection that walked them all held every request in flight for 67 to 80 ms under
    load, where it now takes about 5 (``bench/bench_api.py``, docs/performance.md)."""
    app.openapi()
    app_backend()
    health.run_checks(ctx)
    heap.settle()


def create_app(ctx: Context) -> FastAPI:
    """The app for ``ctx`` (``Context.from_env()``)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        never_join_results()
        if ctx.uploads is not None and not ctx.uploads.url.startswith("s3://"):
            os.makedirs(ctx.uploads.url, exist_ok=True)
        await run_in_threadpool(settle, app, ctx)
        yield
        ctx.planners.join()

    app = FastAPI(title="clipmask", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                  openapi_tags=[{"name": "masks", "description": "one image, answered asynchronously"},
                                {"name": "jobs", "description": "dataset jobs: every image under a prefix"},
                                {"name": "health", "description": "probes, no auth"},
                                {"name": "metrics", "description": "Prometheus, no auth"}])
    app.state.context = ctx
    metrics = ApiMetrics()
    problems.install(app)
    for router in (masks.router, jobs.router, health.router):
        app.include_router(router)
    app.add_api_route("/metrics", metrics.endpoint, methods=["GET"], tags=["metrics"], include_in_schema=True,
                      summary="Prometheus metrics: requests by route and status, latency, in flight",
                      responses={200: {"content": {"text/plain": {"example": "clipmask_api_requests_total{...} 12"}}}})
    app.add_middleware(BodyLimit, limit=ctx.max_bytes)
    app.add_middleware(Measured, metrics=metrics)  # outermost: counts the body limit's 413s too
    return app
