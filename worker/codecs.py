"""Image decoding and mask encoding.

Decoding follows the seed node (and ComfyUI's image loader): EXIF orientation applied, then RGB,
with grey replicated and alpha dropped (not composited). Everything that can go wrong with one
file becomes an ``ImageDecodeError`` or ``ImageTooLargeError`` for that file alone.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import env_int
from .errors import ImageDecodeError, ImageTooLargeError

#: Largest image accepted, in pixels (W*H), unless ``CLIPMASK_MAX_PIXELS`` says otherwise. A
#: guard against decompression bombs: a tiny file that decodes to gigabytes.
DEFAULT_MAX_PIXELS = 100_000_000
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# clipmask applies its own, configurable limit in decode_image(); Pillow's fixed guard would refuse
# (or warn about) images that CLIPMASK_MAX_PIXELS allows.
Image.MAX_IMAGE_PIXELS = None


def max_pixels() -> int:
    """The decompression-bomb limit in pixels; raises ``ValueError`` naming the bad variable."""
    return env_int("CLIPMASK_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def decode_image(data: bytes, limit: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image.

    Raises ``ImageTooLargeError`` past ``limit`` pixels (default ``max_pixels()``) and
    ``ImageDecodeError`` for anything Pillow cannot read.
    """
    limit = max_pixels() if limit is None else limit
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limit:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {limit}; "
                "raise CLIPMASK_MAX_PIXELS if the file is trusted"
            )
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageTooLargeError:
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


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a 2-D uint8 or uint16 array as a greyscale PNG."""
    if pixels.dtype == np.uint16:
        image = Image.fromarray(pixels.astype("<u2"))  # Pillow infers I;16 from the dtype
    else:
        image = Image.fromarray(pixels, "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
