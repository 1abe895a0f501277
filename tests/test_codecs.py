"""Image decoding and mask encoding (``worker/codecs.py``), as a user feeding real files sees it."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from storage.layout import is_image_key
from worker.codecs import decode_image, encode_png, max_pixels, to_rgb
from worker.errors import ImageDecodeError, ImageError, ImageTooLargeError

EXIF_ORIENTATION = 0x0112


# --- helpers ------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _asymmetric_rgb(width: int = 48, height: int = 32) -> np.ndarray:
    """Large flat colour blocks (JPEG-friendly), different in every quadrant, so any flip or
    rotation of the picture is visible."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    pixels[:h2, :w2] = (220, 30, 30)  # top-left red
    pixels[:h2, w2:] = (30, 220, 30)  # top-right green
    pixels[h2:, :w2] = (30, 30, 220)  # bottom-left blue
    pixels[h2:, w2:] = (230, 230, 40)  # bottom-right yellow
    return pixels


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR for a huge 1-bit image, and a few bytes of pixel data: cheap to
    build, and its declared size is what a size guard must look at."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)


# --- EXIF orientation -----------------------------------------------------------


def test_jpeg_with_exif_orientation_6_comes_out_upright():
    # Given a landscape JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)
    original = _asymmetric_rgb(48, 32)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = _save(Image.fromarray(original), "JPEG", quality=95, exif=exif.tobytes())

    # When it is decoded
    decoded = decode_image(data)

    # Then it is the upright (portrait) picture: W and H swapped, quadrants where a viewer sees them
    assert decoded.mode == "RGB"
    assert decoded.size == (32, 48)
    got = np.asarray(decoded).astype(np.int16)
    upright = np.rot90(original, k=-1).astype(np.int16)  # 90 degrees clockwise
    wrong_way = np.rot90(original, k=1).astype(np.int16)
    assert np.abs(got - upright).mean() < 6, "pixels differ from the clockwise-rotated original"
    assert np.abs(got - wrong_way).mean() > 60, "test image must tell the two rotations apart"
    # top-left of the upright picture is the original's bottom-left (blue)
    assert np.abs(got[2, 2] - np.array([30, 30, 220])).max() < 20


def test_jpeg_without_exif_orientation_is_left_as_is():
    # Given a plain JPEG with no orientation tag
    original = _asymmetric_rgb(48, 32)
    data = _save(Image.fromarray(original), "JPEG", quality=95)

    # When decoded, Then it keeps its size and pixel placement
    decoded = decode_image(data)
    assert decoded.size == (48, 32)
    assert np.abs(np.asarray(decoded).astype(np.int16) - original).mean() < 6


# --- colour modes -----------------------------------------------------------------


def test_greyscale_png_becomes_rgb_with_equal_channels():
    # Given an 8-bit greyscale gradient PNG
    grey = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    data = _save(Image.fromarray(grey, "L"), "PNG")

    # When decoded
    decoded = decode_image(data)

    # Then every channel carries the original grey value
    assert decoded.mode == "RGB"
    pixels = np.asarray(decoded)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], grey)


def test_rgba_png_drops_alpha_without_compositing():
    # Given an RGBA PNG where some pixels are fully transparent but still carry colour
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 1] = np.arange(10, dtype=np.uint8)[None, :] * 20
    rgba[..., 2] = 77
    rgba[..., 3] = 255
    rgba[:, :5, 3] = 0  # left half invisible
    data = _save(Image.fromarray(rgba, "RGBA"), "PNG")

    # When decoded
    decoded = decode_image(data)

    # Then the RGB values are kept as stored, even where alpha was 0 (no blending onto black/white)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgba[..., :3])


def test_palette_png_with_transparency_becomes_rgb():
    # Given a palette PNG with a transparent index
    indices = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    image = Image.frombytes("P", (4, 2), indices.tobytes())
    image.putpalette(palette + [0, 0, 0] * 253)
    data = _save(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"

    # When decoded
    decoded = decode_image(data)

    # Then each pixel is its palette colour, in RGB
    assert decoded.mode == "RGB"
    expected = np.array(palette, dtype=np.uint8).reshape(3, 3)[indices]
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_16_bit_greyscale_png_is_scaled_to_8_bit_not_clipped():
    # Given a 16-bit greyscale PNG spanning the full 16-bit range
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 50000, 65280]], dtype=np.uint16)
    data = _save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    # When decoded
    pixels = np.asarray(decode_image(data))

    # Then values are scaled by 255/65535 (65535 -> 255, 32896 -> ~128), not clipped at 255
    assert pixels.shape == (2, 4, 3)
    assert pixels[0, 3, 0] == 255
    assert abs(int(pixels[0, 2, 0]) - 128) <= 1
    assert pixels[0, 1, 0] == 1
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    np.testing.assert_allclose(pixels[..., 0], expected, atol=1)
    assert np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2])


def test_to_rgb_scales_16_bit_image_directly():
    # Given an in-memory 16-bit greyscale image, When converted, Then it is scaled to 8-bit RGB
    values = np.array([[0, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(values))
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 255])


def test_cmyk_jpeg_becomes_rgb():
    # Given a CMYK JPEG (as print workflows produce)
    original = _asymmetric_rgb(48, 32)
    data = _save(Image.fromarray(original).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    # When decoded
    decoded = decode_image(data)

    # Then it is RGB with the original colours (within JPEG tolerance)
    assert decoded.mode == "RGB"
    assert decoded.size == (48, 32)
    assert np.abs(np.asarray(decoded).astype(np.int16) - original).mean() < 8


def test_webp_decodes_to_rgb():
    # Given a lossless WebP with an alpha channel
    rgba = np.dstack([_asymmetric_rgb(16, 12), np.full((12, 16), 128, dtype=np.uint8)])
    data = _save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True)

    # When decoded, Then it is the same RGB picture
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), rgba[..., :3])


# --- broken files -------------------------------------------------------------------


def _assert_readable_decode_error(data: bytes) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    err = info.value
    assert isinstance(err, ImageError)
    message = str(err)
    assert message.strip(), "the manifest needs a reason, not an empty message"
    assert "image" in message.lower()
    return err


def test_truncated_jpeg_raises_image_decode_error():
    # Given a JPEG cut off halfway through its data
    data = _save(Image.fromarray(_asymmetric_rgb(64, 64)), "JPEG", quality=90)
    # When / Then decoding it fails for this one image with a readable reason
    _assert_readable_decode_error(data[: len(data) // 2])


def test_random_bytes_raise_image_decode_error():
    _assert_readable_decode_error(np.random.default_rng(1234).bytes(4096))


def test_empty_file_raises_image_decode_error_saying_it_is_empty():
    err = _assert_readable_decode_error(b"")
    assert str(err) == "empty file (0 bytes), not an image"


# --- decompression-bomb guard -----------------------------------------------------------


def test_image_over_explicit_limit_raises_too_large_naming_the_setting():
    # Given a 100x100 image (10,000 pixels)
    data = _save(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")

    # When the limit is one pixel less, Then it is refused, naming the setting that raises it
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, limit=9_999)
    assert isinstance(info.value, ImageError)
    assert "CLIPMASK_MAX_PIXELS" in str(info.value)

    # When the limit is exactly its size, Then it decodes
    assert decode_image(data, limit=10_000).size == (100, 100)


def test_pixel_limit_from_environment(monkeypatch):
    # Given CLIPMASK_MAX_PIXELS set below a 100x100 image's size
    data = _save(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")
    monkeypatch.setenv("CLIPMASK_MAX_PIXELS", "5000")
    assert max_pixels() == 5000

    # When decoding without an explicit limit, Then the environment limit applies
    with pytest.raises(ImageTooLargeError, match="CLIPMASK_MAX_PIXELS"):
        decode_image(data)

    # And raising the variable lets it through
    monkeypatch.setenv("CLIPMASK_MAX_PIXELS", "10000")
    assert decode_image(data).size == (100, 100)


def test_unset_pixel_limit_has_a_generous_default(monkeypatch):
    monkeypatch.delenv("CLIPMASK_MAX_PIXELS", raising=False)
    assert max_pixels() >= 4096 * 4096


def test_non_integer_pixel_limit_is_a_value_error_naming_the_variable(monkeypatch):
    # Given a typo in the environment
    monkeypatch.setenv("CLIPMASK_MAX_PIXELS", "lots")
    data = _save(Image.new("RGB", (4, 4)), "PNG")

    # When / Then it is a configuration error naming the variable, not a bad-image error
    with pytest.raises(ValueError, match="CLIPMASK_MAX_PIXELS") as info:
        max_pixels()
    assert not isinstance(info.value, ImageError)
    with pytest.raises(ValueError, match="CLIPMASK_MAX_PIXELS"):
        decode_image(data)


def test_raised_limit_admits_images_beyond_pillows_own_bomb_guard():
    # Given a trusted 20000x10000 image (200 Mpx) and a limit of 1 Gpx.  The file carries only the
    # start of its pixel data, so the size guard is the only thing that could say "too large".
    data = _png_header_only(20_000, 10_000)

    # When decoded with the raised limit, Then the size guard lets it through; what fails is the
    # (deliberately) truncated data
    with pytest.raises(ImageDecodeError):
        decode_image(data, limit=1_000_000_000)


def test_truncated_huge_png_header_is_refused_by_size_before_decoding():
    # Given the same 200 Mpx header and the default-sized limit, When decoded, Then it is too large
    with pytest.raises(ImageTooLargeError, match="CLIPMASK_MAX_PIXELS"):
        decode_image(_png_header_only(20_000, 10_000), limit=100_000_000)


# --- encoding ------------------------------------------------------------------------------


def test_encode_png_uint8_round_trips_as_8_bit_greyscale():
    # Given an 8-bit mask with every value
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels[0, 0] = 255
    # When encoded and read back
    image = Image.open(io.BytesIO(encode_png(pixels)))
    # Then it is a greyscale PNG with exactly those values
    assert image.format == "PNG"
    assert image.mode == "L"
    assert image.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_encode_png_binary_mask_is_0_or_255():
    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[1:3, 2:6] = 255
    image = Image.open(io.BytesIO(encode_png(mask)))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), mask)


def test_encode_png_uint16_round_trips_exactly():
    # Given a 16-bit raw mask with values across the whole range
    pixels = np.array([[0, 1, 255, 256], [32768, 65279, 65534, 65535]], dtype=np.uint16)
    # When encoded and read back
    image = Image.open(io.BytesIO(encode_png(pixels)))
    # Then it is a 16-bit greyscale PNG with exactly those values
    assert image.format == "PNG"
    assert image.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(image).astype(np.int64), pixels.astype(np.int64))


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["photo.jpg", "a/b/PHOTO.JPG", "x.Jpeg", "scan.png", "s3/bucket/x.PnG", "y.webp", "z.WEBP"],
)
def test_is_image_key_accepts_image_extensions_in_any_case(key):
    assert is_image_key(key)


@pytest.mark.parametrize(
    "key", ["notes.txt", "meta.json", "photo.jpg.json", "png.txt", "README", "a/b/c.JSON", "jpg"]
)
def test_is_image_key_rejects_non_images(key):
    assert not is_image_key(key)
