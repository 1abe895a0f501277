"""Small test images, made deterministically from a seed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str) -> bytes:
    """``image`` saved in format ``fmt`` ("JPEG", "PNG", "WEBP"...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_inputs() -> dict[str, bytes]:
    """JPEG, greyscale PNG, RGBA PNG and WebP in nested folders, a corrupt JPEG and a non-image."""
    rng = np.random.default_rng(7)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return {
        "photos/cat.jpg": encoded(rgb(96, 64), "JPEG"),
        "photos/deep/grey.png": encoded(rgb(40, 72).convert("L"), "PNG"),
        "alpha.png": encoded(rgb(50, 50).convert("RGBA"), "PNG"),
        "photos/pic.webp": encoded(rgb(64, 48), "WEBP"),
        "photos/broken.jpg": b"\xff\xd8\xff\xe0 this is not really a jpeg",
        "notes.txt": b"not an image, not listed",
    }


#: Mixed image sizes (W, H) for the engine tests: landscape, portrait, square, odd.
SIZES = [(64, 48), (50, 70), (33, 33), (200, 120)]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A horizontal gradient half-mixed with noise: masks with structure on the tiny model."""
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    pixels = 0.5 * smooth + 0.5 * rng.integers(0, 255, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


def png(seed: int, size=(24, 16)) -> bytes:
    """A PNG of random RGB noise, ``size`` = (W, H), the same bytes for the same seed."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "PNG")


def images_in(folder: Path, count: int) -> list[str]:
    """Write ``count`` PNGs under ``folder`` in three sub-folders; returns their relative keys."""
    keys = [f"set{i % 3}/img{i:04d}.png" for i in range(count)]
    for i, key in enumerate(keys):
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(png(i))
    return keys


def write_tree(root, keys, data: bytes = b"x") -> None:
    """Files at ``root / key`` for each key, holding ``data``, folders made as needed."""
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
