"""``/v1/jobs``: dataset jobs as ``clipmask submit``, ``status --json``, ``cancel`` and ``resume``
run them, and a finished job's manifest.

A job submitted here is named before anything is listed, and planned in a thread of this server
(``planners.py``). Until the job's index exists (the listing found its first image) a note in
Redis, ``clipmask:api:job:<id>``, answers for it: ``planning``, or why planning ended without a
job (``failed`` with ``error``; ``nothing_new`` with ``up_to_date`` for a plan of what is new
when nothing is). Once the index exists, ``GET /v1/jobs/{id}`` is exactly ``clipmask status
--json``, plus ``planning_error`` when the plan stopped on an error.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Body, Depends, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from storage import open_store, split_object_url
from tasks.api.context import Context, authorized, blocking, context
from tasks.api.models import Accepted, JobRequest
from tasks.api.planners import Full, Plan
from tasks.api.problems import Problem, documented, from_error
from tasks.errors import JobNotFoundError, NothingNewError
from tasks.jobs.index import FINISHED_TTL_S, PREFIX, job_status, now_iso
from tasks.webhooks import job_callback_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(authorized)])

NOTE = "clipmask:api:job:"
#: Seconds a submit waits for its job to be named; a resume for its work to end (else ``202``).
NAMED_WITHIN_S, RESUMED_WITHIN_S = 60.0, 2.0

JobId = Path(pattern=r"^[0-9a-zA-Z_-]{1,64}$", description="the id `POST /v1/jobs` answered")

STATUS_EXAMPLE = {
    "job_id": "3f2a9c1e7b4d", "state": "running", "total": 5000, "succeeded": 1180, "failed": 2, "skipped": 0,
    "up_to_date": 0, "done": 1182, "chunks": 79, "chunks_done": 18, "chunks_queued": 61, "planned": True,
    "planning_interrupted": False, "source": "s3://photos/2024/", "dest": "s3://masks/2024/",
    "spec": {"prompts": ["person"], "threshold": 0.5}, "created_at": "2025-01-01T12:00:00+00:00",
    "finished_at": None, "manifest": None, "quiet_s": 1.2, "heals": 0, "resent": [], "resent_count": 0,
    "stuck": False, "retrying": None}
MANIFEST_EXAMPLE = ('{"outputs": {"mask": "s3://masks/a.jpg.mask.png", "metadata": "s3://masks/a.jpg.json"}, '
                    '"source": "s3://photos/a.jpg", "status": "succeeded"}')
STATUS = {"description": "what `clipmask status JOB --json` prints",
          "content": {"application/json": {"example": STATUS_EXAMPLE}}}


@router.post("", status_code=202, response_model=Accepted, summary="Submit a dataset job",
             responses={202: {"description": "named; its planning goes on: poll `Location`",
                              "headers": {"Location": {"schema": {"type": "string"},
                                                       "description": "/v1/jobs/{id}"}}},
                        **documented(401, 403, 413, 422, 503)})
async def submit(request: Request, asked: JobRequest) -> JSONResponse:
    """The fields of `clipmask submit`, and `callback_url` (POSTed the job's summary when it
    ends). Answers `202` with `{"id", "state": "planning"}` once the job is named, before its
    source is listed; SRC, DST and the broker are checked first (a source that does not exist or a
    DST that takes no write: `422`)."""
    ctx = context(request)
    source, dest = ctx.allowed.source("source", asked.source), ctx.allowed.prefix("dest", asked.dest)
    spec = asked.spec()
    callback = ctx.callbacks.url("callback_url", asked.callback_url) if asked.callback_url else None

    def plan(handle: Plan) -> str:
        from tasks.jobs.planning import submit_job

        def named(job_id: str) -> None:
            if callback:  # read by the job's finishing step
                open_store(dest).write_bytes(job_callback_key(job_id), json.dumps({"url": callback}).encode(),
                                             "application/json")
            _note(ctx, job_id, {"state": "planning", "source": source, "dest": dest, "created_at": now_iso()})
            handle.name(job_id)

        try:
            return submit_job(source, dest, spec, chunk_size=asked.chunk_size, skip_existing=asked.skip_existing,
                              image_column=asked.image_column, jobs=ctx.jobs, on_named=named)
        except Exception as err:
            if handle.job_id:
                _planning_failed(ctx, handle.job_id, source, dest, err)
            raise

    handle = await _start(ctx, plan, "submit")
    await blocking(handle.settled.wait, NAMED_WITHIN_S)
    if handle.job_id is None:
        if handle.done.is_set():
            try:
                handle.outcome()
            except Exception as err:  # noqa: BLE001 - what stopped it before the job was named
                raise from_error(err) from None
        raise Problem(503, "unavailable", "the job was not named within a minute; is storage answering?")
    return _accepted(handle.job_id, "planning")


@router.get("/{job_id}", summary="A job's progress: `clipmask status --json`",
            responses={200: STATUS, **documented(401, 403, 404, 503)})
async def status(request: Request, job_id: str = JobId) -> JSONResponse:
    """`state` is `queued`, `running`, `finished` or `cancelled`; before the job's first image is
    listed, `planning` (or `failed` with `error`, `nothing_new` with `up_to_date`)."""
    ctx = context(request)
    data, note = await blocking(_lookup, ctx, job_id)
    if data:
        _check_dest(ctx, data["dest"])
        report = job_status(job_id, data)
        if note and note.get("error"):
            report["planning_error"] = note["error"]
        return JSONResponse(report)
    _check_dest(ctx, note["dest"])
    return JSONResponse({"job_id": job_id, **note})


@router.post("/{job_id}/cancel", summary="Cancel a job: `clipmask cancel`",
             responses={200: STATUS, **documented(401, 403, 404, 409, 503)})
async def cancel(request: Request, job_id: str = JobId) -> JSONResponse:
    """Its queued images are recorded as skipped; the job ends `cancelled` with its manifest.
    Answers the job's status."""
    from tasks.jobs.control import cancel_job

    ctx = context(request)
    data, note = await blocking(_lookup, ctx, job_id)
    _check_dest(ctx, (data or note)["dest"])
    if not data:
        raise Problem(409, "not-indexed", f"job {job_id} is {note['state']} and has no records yet: cancel it again "
                      "once its first images are planned", state=note["state"])
    await blocking(cancel_job, job_id, ctx.jobs)
    return JSONResponse(job_status(job_id, await blocking(ctx.jobs.info, job_id)))


@router.post("/{job_id}/resume", summary="Complete an interrupted plan, queue lost chunks: `clipmask resume`",
             responses={200: {"description": "`{job_id, planned, requeued}`", "content": {"application/json": {
                 "example": {"job_id": "3f2a9c1e7b4d", "planned": 0, "requeued": 3}}}},
                 202: {"model": Accepted, "description": "still planning: poll `Location`"},
                 **documented(401, 403, 404, 409, 422, 503)})
async def resume(request: Request, job_id: str = JobId,
                 dest: str | None = Body(None, embed=True, description="the job's dest: only needed when Redis lost "
                                         "the job's records, to rebuild them from dest/_jobs/<id>/")) -> Response:
    """Idempotent. `200` with what it did; `202` while a plan it completes still lists."""
    from tasks.jobs.planning import resume_job

    ctx = context(request)
    data, _note_of = await blocking(_lookup, ctx, job_id, missing_ok=dest is not None)
    dest = ctx.allowed.prefix("dest", dest) if dest else None
    if data:
        _check_dest(ctx, data["dest"])
    handle = await _start(ctx, lambda _plan: resume_job(job_id, dest, ctx.jobs), "resume")
    await blocking(handle.done.wait, RESUMED_WITHIN_S)
    if not handle.done.is_set():
        return _accepted(job_id, "planning")
    try:
        done = handle.outcome()
    except Exception as err:  # noqa: BLE001 - said as a problem
        raise from_error(err) from None
    return JSONResponse({"job_id": job_id, **done})


@router.get("/{job_id}/manifest", summary="A finished job's manifest, streamed as JSON lines",
            response_class=StreamingResponse, responses={
                200: {"content": {"application/x-ndjson": {"example": MANIFEST_EXAMPLE}},
                      "description": "one row per input, in listing order"}, **documented(401, 403, 404, 409, 503)})
async def manifest(request: Request, job_id: str = JobId) -> Response:
    """One JSON row per input (`source`, `status`, `outputs` or `error`). `409` until the job
    has finished (or ended cancelled) and its manifest is written."""
    ctx = context(request)
    data, note = await blocking(_lookup, ctx, job_id)
    _check_dest(ctx, (data or note)["dest"])
    url = (data or {}).get("manifest")
    if not url:
        state = job_status(job_id, data)["state"] if data else note["state"]
        raise Problem(409, "not-finished", f"job {job_id} has no manifest yet ({state})", state=state)
    root, key = split_object_url(url)
    lines = open_store(root).read_lines(key)
    try:
        first = await blocking(next, lines, b"")
    except FileNotFoundError:
        raise Problem(404, "not-found", f"the manifest {url} is no longer in storage") from None

    def rows():
        yield first
        yield from lines

    return StreamingResponse(rows(), media_type="application/x-ndjson")


async def _start(ctx: Context, work, what: str) -> Plan:
    try:
        return ctx.planners.start(work, what)
    except Full as err:
        raise Problem(503, "busy", str(err), headers={"Retry-After": "5"}) from None


def _accepted(job_id: str, state: str) -> JSONResponse:
    return JSONResponse({"id": job_id, "state": state}, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


def _lookup(ctx: Context, job_id: str, missing_ok: bool = False) -> tuple[dict | None, dict | None]:
    """The job's index hash and this API's note of it; a ``404`` when neither exists."""
    with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(PREFIX + job_id)
        pipe.get(NOTE + job_id)
        data, note = pipe.execute()
    note = json.loads(note) if note else None
    if not data and not note and not missing_ok:
        raise from_error(JobNotFoundError(f"no job {job_id}: unknown, or its records expired (7 days after it "
                                          "finished; its files stay under its dest)"))
    return data or None, note


def _check_dest(ctx: Context, dest: str) -> None:
    """A job is seen and changed only by callers allowed its dest."""
    ctx.allowed.prefix("dest", dest)


def _note(ctx: Context, job_id: str, note: dict) -> None:
    ctx.redis.set(NOTE + job_id, json.dumps(note), ex=FINISHED_TTL_S)


def _planning_failed(ctx: Context, job_id: str, source: str, dest: str, err: Exception) -> None:
    """Note why a plan ended early, for ``GET /v1/jobs/{id}``."""
    note = {"source": source, "dest": dest, "created_at": now_iso(), "failed_at": time.time()}
    if isinstance(err, NothingNewError):
        note.update(state="nothing_new", up_to_date=err.up_to_date)
    else:
        try:
            message = from_error(err).detail
        except Exception:  # noqa: BLE001 - a bug: its own words
            message = f"{type(err).__name__}: {err}"
        note.update(state="failed", error=message)
    try:
        _note(ctx, job_id, note)
    except Exception as failed:  # noqa: BLE001 - Redis away: the job's status says planning was interrupted
        log.warning("job %s: could not note why its planning ended (%s): %s", job_id, failed, note["state"])
