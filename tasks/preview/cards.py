"""One card of the preview page: a sampled image's upright thumbnail and its mask tinted over it.

Pillow, numpy, ``storage``, ``worker.codecs`` and ``worker.rle`` only (no torch, no engine). The
mask is its PNG, or the record's RLE where the job wrote no PNG. Files are read by URL through
the reader given, which hands over the shard members already read for a job over shards
(``shards.py``). One unreadable image, mask or metadata file (or shard) becomes a card with its
error; it never stops the page.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage import URLReader
from storage.layout import METADATA_SUFFIX
from tasks.preview.shards import MemberUnavailable, ShardMembers
from worker import rle  # numpy and pycocotools: no torch
from worker.codecs import to_rgb  # Pillow and numpy only: no torch
from worker.model_source import describe_model  # no torch either

#: Longest side of thumbnails and overlays, in pixels.
THUMB_SIDE = 256
JPEG_QUALITY = 85
TINT = (255, 0, 0)
TINT_ALPHA = 0.5
OUTLINE = (255, 230, 0)
#: Images larger than this (W*H) are not decoded: a guard against decompression bombs.
MAX_PIXELS = 100_000_000


@dataclass
class Card:
    """One sampled image on the page; ``error`` is set when it could not be drawn."""

    number: int
    source: str
    name: str
    coverage: float | None = None
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    thumb: str | None = None    # relative to the page
    overlay: str | None = None
    size: tuple[int, int] | None = None  # thumbnail size
    error: str | None = None
    note: str | None = None
    model: str | None = None  # the model its mask came from (``describe_model``)


def _open_image(data: bytes, side: int, what: str) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` (refusing decompression bombs) and return it with its stored size.

    With ``side``, a JPEG is decoded at a reduced scale (1/2 to 1/8) that keeps both sides >= side.
    """
    image = Image.open(io.BytesIO(data))
    size = image.size
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(f"{what} is {size[0]}x{size[1]} pixels, over the preview limit of {MAX_PIXELS}")
    if side:
        image.draft("RGB", (side, side))
    image.load()
    return image, size


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB thumbnail (longest side ``side``) of image bytes, and the upright full size."""
    image, size = _open_image(data, side, "the image")
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
        size = size[::-1]
    image = to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image, size


def overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` tinted red where ``mask`` is on (>= 128 once resized), with a 1-px outline."""
    mask = mask if mask.mode == "L" else to_rgb(mask).convert("L")
    on = np.asarray(mask.resize(image.size, Image.Resampling.BILINEAR)) >= 128
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[on] = pixels[on] * (1 - TINT_ALPHA) + np.asarray(TINT, np.float32) * TINT_ALPHA
    padded = np.pad(on, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pixels[on & ~inner] = OUTLINE
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _describe(err: BaseException) -> str:
    if isinstance(err, MemberUnavailable):  # its text says which shard and why
        return str(err)
    if isinstance(err, UnidentifiedImageError):  # its text is "cannot identify image file <_io.BytesIO ...>"
        return "not an image Pillow can read (unknown format or corrupt header)"
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r} in the record"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _relative_name(source: str, outputs: dict, source_root: object, dest_root: str) -> str:
    """The input's relative path R: ``source`` under the job's SRC, else its metadata URL under
    DST without ".json", else the source's base name."""
    for url, root, suffix in ((source, source_root, ""), (outputs.get("metadata"), dest_root, METADATA_SUFFIX)):
        if isinstance(url, str) and isinstance(root, str) and root:
            root = root if root.endswith("/") else root + "/"
            if url.startswith(root) and url.endswith(suffix) and len(url) > len(root) + len(suffix):
                return url[len(root):len(url) - len(suffix)]
    return posixpath.basename(source.rstrip("/")) or source


def _mask_of(outputs: dict, meta: dict, reader: URLReader | ShardMembers) -> Image.Image:
    """The thresholded mask: its PNG, or, for a job that wrote none (``--outputs rle``), the
    record's COCO RLE decoded (a ``KeyError`` for ``mask`` when it has neither)."""
    if "mask" in outputs or not isinstance(meta.get("rle"), dict):
        return _open_image(reader.read(outputs["mask"]), 0, "the mask")[0]
    height, width = meta["rle"].get("size") or (0, 0)
    if width * height > MAX_PIXELS:
        raise ValueError(f"the mask is {width}x{height} pixels, over the preview limit of {MAX_PIXELS}")
    return Image.fromarray(rle.decode(meta["rle"]) * np.uint8(255), "L")


def draw_card(number: int, row: dict, reader: URLReader | ShardMembers, out_dir: Path, summary: dict, dest_root: str,
               side: int = THUMB_SIDE) -> Card:
    """Read one sampled row's metadata, image and mask; write its thumbnail and overlay."""
    source = str(row.get("source", ""))
    outputs = row.get("outputs") or {}
    card = Card(number=number, source=source, name=_relative_name(source, outputs, summary.get("source"), dest_root))
    stage = "metadata"
    try:
        meta = json.loads(reader.read(outputs["metadata"]))
        card.coverage = float(meta["coverage"]) if meta.get("coverage") is not None else None
        card.prompts = [str(p) for p in meta.get("prompts") or []]
        card.negative_prompts = [str(p) for p in meta.get("negative_prompts") or []]
        card.model = describe_model(meta["model"]) if isinstance(meta.get("model"), dict) else None
        stage = "image"
        image, full = thumbnail(reader.read(source or meta["source"]), side)
        stage = "mask"
        mask = _mask_of(outputs, meta, reader)
        if mask.size != full:
            card.note = f"mask is {mask.size[0]}x{mask.size[1]}, image is {full[0]}x{full[1]}"
        drawn = overlay(image, mask)
        stem = f"{number:05d}.jpg"
        image.save(out_dir / "thumbs" / stem, "JPEG", quality=JPEG_QUALITY)
        drawn.save(out_dir / "overlays" / stem, "JPEG", quality=JPEG_QUALITY)
        card.thumb, card.overlay, card.size = f"thumbs/{stem}", f"overlays/{stem}", image.size
    except Exception as err:  # noqa: BLE001 - one bad file never breaks the page
        card.error = f"cannot preview the {stage}: {_describe(err)}"
    return card
