"""Image decoding and mask encoding.

Decoding follows the seed node (and ComfyUI's image loader): EXIF orientation applied, then RGB,
with grey replicated and alpha dropped (not composited). Everything that can go wrong with one
file becomes an ``ImageDecodeError`` or ``ImageTooLargeError`` for that file alone.
"""

from __future__ import annotations

import io
import struct
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from isal import isal_zlib
from PIL import Image, UnidentifiedImageError

from worker import settings
from worker.errors import ImageDecodeError, ImageTooLargeError

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# clipmask applies its own, configurable limit in decode_image(); Pillow's fixed guard would refuse
# (or warn about) images that CLIPMASK_MAX_PIXELS allows.
Image.MAX_IMAGE_PIXELS = None


def max_pixels() -> int:
    """The decompression-bomb limit in pixels (``CLIPMASK_MAX_PIXELS``: a guard against a tiny file
    that decodes to gigabytes); raises ``ValueError`` naming the bad variable."""
    return settings.MAX_PIXELS.get()


class Decoded(NamedTuple):
    """An upright RGB ``image`` and ``size``, the (W, H) of the upright full-resolution image.

    ``image`` is smaller than ``size`` when a JPEG was decoded at a reduced DCT scale."""

    image: Image.Image
    size: tuple[int, int]


#: EXIF orientation -> the transpose that makes the image upright (5 to 8 swap W and H).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
          Image.Transpose.ROTATE_90)
_EXIF_ORIENTATION = 0x0112


def decode_image(data: bytes, limit: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image at full resolution.

    Raises ``ImageTooLargeError`` past ``limit`` pixels (default ``max_pixels()``) and
    ``ImageDecodeError`` for anything Pillow cannot read.
    """
    return decode_scaled(data, None, limit).image


def decode_scaled(data: bytes, min_size: tuple[int, int] | None = None, limit: int | None = None) -> Decoded:
    """Like ``decode_image``, but a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8)
    whose upright image still has at least ``min_size`` (W, H): libjpeg then skips most of its
    work. Other formats, and ``min_size=None``, decode at full resolution. The EXIF orientation is
    applied to the decoded image (no copy when it is upright); ``size`` is always the full upright
    (W, H), from the header."""
    limit = max_pixels() if limit is None else limit
    with _image_errors():
        image = _open_checked(data, limit)
        width, height = image.size
        if min_size is not None and image.format in ("JPEG", "MPO"):
            swap = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            image.draft(None, min_size[::-1] if swap else min_size)
        image.load()
        # The orientation as a transpose of the (possibly reduced) image: no copy when upright.
        method = _UPRIGHT.get(image.getexif().get(_EXIF_ORIENTATION, 1))
        size = (height, width) if method in _SWAPS else (width, height)
        if method is not None:
            image = image.transpose(method)
        return Decoded(to_rgb(image), size)


class Header(NamedTuple):
    """What ``read_header`` learns of a file without decoding its pixels."""

    format: str | None  # Pillow's: "JPEG", "PNG", "MPO", ...
    mode: str  # Pillow's mode of the stored image: "RGB" (a YCbCr or RGB JPEG), "L", "CMYK", ...
    size: tuple[int, int]  # (W, H) of the upright image, EXIF orientation applied
    orientation: int  # EXIF orientation, 1 (upright, or unknown) to 8
    info: dict  # Pillow's ``info`` (for a JPEG: "progressive", "adobe_transform", ...)


def read_header(data: bytes, limit: int | None = None) -> Header:
    """The header of an image file, read by Pillow without decoding pixels. Raises the errors
    ``decode_scaled`` raises for the same file's header (unknown format, over ``limit`` pixels,
    default ``max_pixels()``), with the same messages."""
    limit = max_pixels() if limit is None else limit
    with _image_errors():
        image = _open_checked(data, limit)
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        orientation = orientation if orientation in _UPRIGHT else 1
        width, height = image.size
        size = (height, width) if _UPRIGHT.get(orientation) in _SWAPS else (width, height)
        return Header(image.format, image.mode, size, orientation, dict(image.info))


def _open_checked(data: bytes, limit: int) -> Image.Image:
    if not data:  # Pillow would say it cannot identify the file, which reads as a corrupt image
        raise ImageDecodeError("empty file (0 bytes), not an image")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > limit:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limit}; "
            "raise CLIPMASK_MAX_PIXELS if the file is trusted"
        )
    return image


@contextmanager
def _image_errors():
    """Pillow's exceptions for one file -> ``ImageDecodeError`` / ``ImageTooLargeError``."""
    try:
        yield
    except (ImageTooLargeError, ImageDecodeError):
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not an image Pillow can read (unknown format or corrupt header)") from err
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{err}; raise CLIPMASK_MAX_PIXELS if the file is trusted") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16- and 32-bit grey is scaled, not clipped."""
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if values.max(initial=0) <= 65535 else 255.0 / 4294967295.0
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0, 0, 255).round().astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_png(pixels: np.ndarray, *, binary: bool = False) -> bytes:
    """Encode a 2-D uint8 or uint16 array as a greyscale PNG (8 or 16 bit), built for speed.

    Written here rather than by Pillow, whose adaptive filter (five filters tried per row) costs
    more than the compression: one fixed filter per image, then deflate by ISA-L (``isal``, level
    1: 4x zlib's level 1 on a 12 MP raw mask and smaller output, 16x on a thresholded one; it
    releases the GIL, so encoder threads run side by side). The raw mask is smooth, so the Sub
    filter (each byte minus its left neighbour) leaves runs of small values; a thresholded mask
    (``binary``: only 0 and 255) is left unfiltered.
    """
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 2:
        raise TypeError(f"encode_png takes a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape
    depth, bpp = (16, 2) if pixels.dtype == np.uint16 else (8, 1)
    data = pixels.astype(">u2", copy=False).view(np.uint8) if depth == 16 else pixels
    rows = np.empty((height, width * bpp + 1), dtype=np.uint8)
    if binary:
        rows[:, 0] = 0  # filter type None
        rows[:, 1:] = data
    else:
        rows[:, 0] = 1  # filter type Sub; uint8 arithmetic wraps modulo 256 as PNG's does
        rows[:, 1:1 + bpp] = data[:, :bpp]
        np.subtract(data[:, bpp:], data[:, :-bpp], out=rows[:, 1 + bpp:])
    idat = isal_zlib.compress(rows, 1)
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)  # grey, deflate, no interlace
    return b"".join([b"\x89PNG\r\n\x1a\n", *_png_chunk(b"IHDR", header), *_png_chunk(b"IDAT", idat),
                     *_png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, body: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    return struct.pack(">I", len(body)), kind, body, struct.pack(">I", isal_zlib.crc32(body, isal_zlib.crc32(kind)))
