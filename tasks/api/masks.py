"""``/v1/masks``: one image masked on the workers, from a URL or an upload, and its outputs."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from storage import split_object_url
from tasks.api.context import Context, authorized, blocking, context
from tasks.api.models import Accepted, MaskRequest, MaskResult, Pending, UploadFields, validate_model
from tasks.api.offload import MaskState, mask_state, new_mask_id, record_of, send_mask
from tasks.api.problems import Problem, documented, invalid_field
from tasks.api.uploads import CONTENT_TYPES, checked_image, upload_name
from tasks.webhooks import mask_result

router = APIRouter(prefix="/v1/masks", tags=["masks"], dependencies=[Depends(authorized)])

#: Longest ``?wait=`` in seconds.
MAX_WAIT_S = 60
#: Seconds between looks at a result while a request waits for it: from the first to the last.
POLL_FIRST_S, POLL_MAX_S = 0.05, 0.5

MaskId = Path(pattern=r"^[0-9a-f]{32}$", description="the id `POST /v1/masks` answered")
Wait = Query(0, ge=0, le=MAX_WAIT_S, description="seconds to hold the request until the mask is done: `200` "
             "with the result if it is, else the same answer as without")


def _upload_schema() -> dict:
    schema = UploadFields.model_json_schema()
    return {"type": "object", "required": ["file", *schema.get("required", [])],
            "properties": {"file": {"type": "string", "format": "binary", "description": "the image"},
                           **schema["properties"]}}


BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": MaskRequest.model_json_schema(),
                         "example": MaskRequest.model_config["json_schema_extra"]["examples"][0]},
    "multipart/form-data": {"schema": _upload_schema(), "encoding": {"file": {"contentType": "image/*"}}},
}}}


@router.post("", status_code=202, response_model=Accepted, openapi_extra=BODY,
             summary="Mask one image, from a URL (JSON) or an upload (multipart/form-data)",
             responses={200: {"model": MaskResult, "description": "done within `wait`: the result"},
                        202: {"description": "queued: poll `Location`",
                              "headers": {"Location": {"schema": {"type": "string"},
                                                       "description": "/v1/masks/{id}"}}},
                        **documented(401, 403, 413, 415, 422, 501, 503)})
async def create_mask(request: Request, wait: float = Wait) -> Response:
    """JSON `{"source", "dest", "prompt", options}`, or `multipart/form-data` with the image in
    `file` and the same fields but `source`: the image is stored under `CLIPMASK_API_UPLOADS`
    and masked from there. Outputs go to `dest`, under the image's name (an upload's under
    `<id>/<name>`). `202` with `{"id", "state"}` and `Location`; with `wait`, `200` and the
    result if it is done in time. With `callback_url`, the result is also POSTed there, signed."""
    ctx, mask_id = context(request), new_mask_id()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        root, key, dest, spec, callback = await _from_upload(ctx, request, mask_id)
    elif content_type in ("application/json", ""):
        try:
            data = json.loads(await request.body() or b"null")
        except ValueError as err:
            raise Problem(422, "invalid-request", f"the body is not JSON: {err}") from None
        asked = validate_model(MaskRequest, data)
        source = ctx.allowed.object("source", asked.source)
        dest, spec = ctx.allowed.prefix("dest", asked.dest), asked.spec()
        callback = ctx.callbacks.url("callback_url", asked.callback_url) if asked.callback_url else None
        root, key = split_object_url(source)
    else:
        raise Problem(415, "unsupported-media-type",
                      f"send application/json or multipart/form-data, not {content_type}")
    await blocking(send_mask, ctx.redis, mask_id, root, key, dest, spec, uploaded=content_type == "multipart/form-data",
                   callback_url=callback)
    state = await _within(mask_id, {"source": f"{root.rstrip('/')}/{key}"}, wait) if wait else MaskState("queued")
    return _answer(mask_id, state)


async def _from_upload(ctx: Context, request: Request, mask_id: str):
    if ctx.uploads is None:
        raise Problem(501, "uploads-off", "this server takes no uploads (CLIPMASK_API_UPLOADS is not set); send "
                      "JSON with the image's URL in source")
    form = await request.form(max_files=1, max_fields=32)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise invalid_field("file", "an image in a field named file is required")
        fields = {name: value for name, value in form.multi_items() if name != "file"}
        if "source" in fields:
            raise invalid_field("source", "an upload is the source: send source in JSON, or the image in file")
        asked = validate_model(UploadFields, fields)
        dest, spec = ctx.allowed.prefix("dest", asked.dest), asked.spec()
        callback = ctx.callbacks.url("callback_url", asked.callback_url) if asked.callback_url else None
        data = await upload.read()
        extension = await blocking(checked_image, data)
        key = f"{mask_id}/{upload_name(upload.filename, extension)}"
        try:
            await blocking(ctx.uploads.write_bytes, key, data, CONTENT_TYPES[extension])
        except Exception as err:  # noqa: BLE001 - the server's store, not the caller's request
            raise Problem(503, "storage-unavailable", f"could not store the upload under {ctx.uploads.url} "
                          f"({type(err).__name__}: {err}); check CLIPMASK_API_UPLOADS",
                          headers={"Retry-After": "5"}) from None
    finally:
        await form.close()
    return ctx.uploads.url, key, dest, spec, callback


@router.get("/{mask_id}", response_model=MaskResult, summary="A mask request's state, or its result",
            responses={202: {"model": Pending, "description": "queued or running"}, **documented(401, 404, 503)})
async def get_mask(request: Request, mask_id: str = MaskId, wait: float = Wait) -> Response:
    """`202` with `{"state"}` (`queued`, `running`) until the image has an outcome, then `200`
    with the result: the manifest row (`status`, `outputs` or `error`) and the metadata record.
    An image that failed is a `200` whose `status` is `failed`, with the reason."""
    record = await _record(context(request), mask_id)
    return _answer(mask_id, await _within(mask_id, record, wait))


@router.get("/{mask_id}/{role}.png", summary="An output image, read from storage",
            response_class=Response, responses={
                200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                      "description": "the PNG"}, **documented(401, 403, 404, 409, 503)})
async def get_output(request: Request, role: str = Path(pattern="^(mask|raw)$", description="mask or raw"),
                     mask_id: str = MaskId) -> Response:
    """The thresholded mask (`mask.png`, 0/255) or the raw mask (`raw.png`): a backend needs no
    storage credentials. `409` while the request has no outcome, `404` when it failed or wrote
    no such output (`outputs: ["rle"]` writes no PNG: the mask is the result's `metadata.rle`)."""
    ctx = context(request)
    state = await _within(mask_id, await _record(ctx, mask_id), 0)
    if state.state != "finished":
        raise Problem(409, "not-finished", f"mask request {mask_id} is {state.state}: no output yet",
                      state=state.state)
    row = state.row
    url = (row.get("outputs") or {}).get(role)
    if url is None:
        why = f"it {row['status']}: {row.get('error')}" if row.get("status") != "succeeded" else "not asked for"
        raise Problem(404, "not-found", f"mask request {mask_id} has no {role} output ({why})")
    root, key = split_object_url(ctx.allowed.object("output", url))
    try:
        data = await blocking(_read, root, key)
    except FileNotFoundError:
        raise Problem(404, "not-found", f"{url} is no longer in storage") from None
    return Response(data, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{key.rsplit("/", 1)[-1]}"'})


def _read(root: str, key: str) -> bytes:
    from storage import open_store

    return open_store(root).read_bytes(key)


async def _record(ctx: Context, mask_id: str) -> dict:
    record = await blocking(record_of, ctx.redis, mask_id)
    if record is None:
        raise Problem(404, "not-found", f"no mask request {mask_id}: unknown, or its result expired "
                      "(CLIPMASK_RESULT_EXPIRES)")
    return record


async def _within(mask_id: str, record: dict, wait: float) -> MaskState:
    """The request's state, looked at until it is finished or ``wait`` seconds have passed."""
    deadline, pause = time.monotonic() + wait, POLL_FIRST_S
    while True:
        state = await blocking(mask_state, mask_id, record)
        left = deadline - time.monotonic()
        if state.state == "finished" or left <= 0:
            return state
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, POLL_MAX_S)


def _answer(mask_id: str, state: MaskState) -> JSONResponse:
    if state.state != "finished":
        return JSONResponse({"id": mask_id, "state": state.state}, status_code=202,
                            headers={"Location": f"/v1/masks/{mask_id}"})
    return JSONResponse(mask_result(mask_id, state.row))
