"""Request bodies: the size limit (``CLIPMASK_API_MAX_BYTES``) and uploaded images.

The limit is checked twice: a ``Content-Length`` over it is refused before a byte is read, and a
body without one (chunked) is counted as it arrives and cut off at the limit; either way a
``413``. An uploaded image is checked from its header (Pillow reads the format and size without
decoding pixels: ``worker.codecs.read_header``, as the workers will) before it is stored or
anything is queued: not an image, or over ``CLIPMASK_MAX_PIXELS``, is a ``422`` with the reason.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.layout import IMAGE_EXTENSIONS
from tasks.api.problems import Problem
from worker.codecs import read_header
from worker.errors import ImageError

#: Pillow's format -> the extension an uploaded image is stored under (the workers mask these).
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
              "GIF": ".gif"}
#: The content type an upload is stored with, by extension.
CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".bmp": "image/bmp",
                 ".tif": "image/tiff", ".gif": "image/gif"}
#: Longest file name kept from an upload.
NAME_CHARS = 100


class TooLarge(HTTPException):
    """A request body over the limit (a ``413``), raised while it is read."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit} bytes (CLIPMASK_API_MAX_BYTES)")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with a ``413``."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await Problem(400, "bad-request", "Content-Length is not a number").response()(scope, receive, send)
                return
            if int(declared) > self.limit:
                await Problem(413, "too-large", TooLarge(self.limit).detail).response()(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise TooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def checked_image(data: bytes) -> str:
    """The extension ``data`` is stored under (``.jpg``, ``.png``, ...), once its header says it
    is an image the workers take, within ``CLIPMASK_MAX_PIXELS``; else a ``422`` with the reason."""
    try:
        header = read_header(data)
    except ImageError as err:
        raise Problem(422, "invalid-image", f"file: {err}", errors=[{"field": "file", "message": str(err)}]) from None
    extension = EXTENSIONS.get(header.format or "")
    if extension is None:
        message = (f"a {header.format} image is not one clipmask masks; send "
                   f"{', '.join(sorted(set(EXTENSIONS) - {'MPO'}))}")
        raise Problem(422, "invalid-image", f"file: {message}", errors=[{"field": "file", "message": message}])
    return extension


def upload_name(filename: str | None, extension: str) -> str:
    """A safe file name for an upload: the client's name, its path dropped, characters other than
    letters, digits, ``.``, ``-`` and ``_`` replaced, with an image extension."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    name = name[:NAME_CHARS] or "image"
    return name if name.lower().endswith(IMAGE_EXTENSIONS) else name + extension
