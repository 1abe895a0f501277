"""A finished job written by hand, file by file, as ``clipmask run`` would leave it (for test_preview).

Inputs live under ``<root>/photos/`` and outputs under ``<root>/masks/``, in a local folder
(:class:`LocalTarget`) or an S3 bucket written with a plain boto3 client (:class:`S3Target`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

RED, GREEN, BLUE, GREY = (220, 30, 30), (0, 200, 0), (0, 0, 200), (128, 128, 128)


class LocalTarget:
    def __init__(self, root: Path):
        self.root = Path(root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def folder(self, prefix: str) -> str:
        return str(self.root / prefix)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class S3Target:
    def __init__(self, bucket: str):
        self.bucket = bucket
        self.client = boto3.session.Session().client("s3")

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def folder(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}/"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int], first: tuple, second: tuple, vertical: bool = True) -> Image.Image:
    """An RGB image whose top (or left) half is ``first`` and the rest ``second``."""
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = second
    if vertical:
        pixels[: height // 2] = first
    else:
        pixels[:, : width // 2] = first
    return Image.fromarray(pixels, "RGB")


def rows_mask(size: tuple[int, int], fraction: float) -> np.ndarray:
    """A 0/255 mask whose top ``fraction`` of rows is on."""
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    mask[: round(height * fraction)] = 255
    return mask


@dataclass(eq=False)
class Item:
    """One input: the upright image, its mask (upright), and the bytes stored as the source."""

    key: str
    upright: Image.Image
    mask: np.ndarray
    data: bytes

    @property
    def coverage(self) -> float:
        return float((self.mask == 255).mean())


def sample_items() -> list[Item]:
    """Images of several sizes and formats; one stored sideways with EXIF orientation 6."""
    items = []
    wide = halves((320, 160), GREY, BLUE)
    items.append(Item("a/wide.jpg", wide, rows_mask(wide.size, 0.25), encode(wide, "JPEG", quality=95)))
    tall = halves((120, 300), GREEN, BLUE)
    items.append(Item("b/tall.png", tall, rows_mask(tall.size, 0.6), encode(tall, "PNG")))
    # Upright it is 150x300, green over blue; stored 300x150, rotated, with orientation 6 ("rotate 90 CW").
    upright = halves((150, 300), GREEN, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    items.append(Item("exif/rotated.jpg", upright, rows_mask(upright.size, 0.5),
                      encode(stored, "JPEG", quality=95, exif=exif.tobytes())))
    big = halves((1200, 800), GREY, GREEN)
    items.append(Item("big image & <co>.jpg", big, rows_mask(big.size, 0.125), encode(big, "JPEG", quality=90)))
    return items


@dataclass
class Job:
    """What the test knows about the job it wrote."""

    job_id: str
    dest: str
    items: list[Item]
    failed: list[dict] = field(default_factory=list)
    corrupt: list[Item] = field(default_factory=list)


#: The ``model`` of the records ``write_job`` writes: random test weights.
MODEL = {"id": "/models/tiny", "revision": "sha256:0123456789abcdef", "precision": "fp32", "random": True}


def write_job(target, job_id: str, items: list[Item], *, corrupt: list[Item] = (), failures: int = 1,
              skipped: int = 1, finished_at: str = "2024-05-01T12:00:00+00:00") -> Job:
    """Write inputs, outputs, a manifest and a summary for a finished job; returns what was written.

    ``corrupt`` items get outputs as if they had succeeded, but their source bytes are garbage
    (the file was replaced after the job ran).
    """
    spec = {"prompts": ["a <b>cat</b>", "dog"], "negative_prompts": ["tree & bush"], "threshold": 0.4,
            "profile": "default", "normalize": False, "raw_bits": 8}
    rows = []
    for item in [*items, *corrupt]:
        source_key = f"photos/{item.key}"
        target.put(source_key, b"\xff\xd8 this is not a JPEG any more" if any(item is bad for bad in corrupt) else item.data)
        outputs = {role: target.url(f"masks/{item.key}{suffix}")
                   for role, suffix in (("mask", ".mask.png"), ("raw", ".raw.png"), ("metadata", ".json"))}
        target.put(f"masks/{item.key}.mask.png", encode(Image.fromarray(item.mask, "L"), "PNG"))
        target.put(f"masks/{item.key}.raw.png", encode(Image.fromarray(item.mask // 2, "L"), "PNG"))
        width, height = item.upright.size
        meta = {"source": target.url(source_key), "width": width, "height": height, "coverage": item.coverage,
                "prompts": spec["prompts"], "negative_prompts": spec["negative_prompts"],
                "threshold": spec["threshold"], "profile": "default", "outputs": outputs, "model": MODEL}
        target.put(f"masks/{item.key}.json", json.dumps(meta).encode())
        rows.append({"source": target.url(source_key), "status": "succeeded", "outputs": outputs})
    failed = [{"source": target.url(f"photos/broken-{i}.jpg"), "status": "failed",
               "error": f"ImageDecodeError: corrupt <data> & truncated #{i}"} for i in range(failures)]
    rows[1:1] = failed  # failures in the middle of the manifest
    rows += [{"source": target.url(f"photos/old-{i}.jpg"), "status": "skipped"} for i in range(skipped)]
    manifest = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
    target.put(f"masks/_jobs/{job_id}/manifest.jsonl", manifest)
    target.put(f"masks/_jobs/{job_id}/job.json", json.dumps({"job_id": job_id}).encode())
    for chunk in range(3):  # what a real job leaves beside its summary
        target.put(f"masks/_jobs/{job_id}/results/{chunk:09d}.jsonl", b"")
    counts = {"succeeded": len(items) + len(corrupt), "failed": failures, "skipped": skipped}
    summary = {"job_id": job_id, "state": "finished", "total": sum(counts.values()), **counts,
               "source": target.folder("photos"), "dest": target.folder("masks"), "spec": spec,
               "created_at": "2024-05-01T11:00:00+00:00", "finished_at": finished_at,
               "manifest": target.url(f"masks/_jobs/{job_id}/manifest.jsonl")}
    target.put(f"masks/_jobs/{job_id}/summary.json", json.dumps(summary, indent=2).encode())
    return Job(job_id, target.folder("masks"), list(items), failed, list(corrupt))


class PageParser(HTMLParser):
    """Collects img src attributes, card elements, svg tags and the page's text."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.cards: list[str] = []
        self.svgs = 0
        self.rects = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "svg":
            self.svgs += 1
        elif tag == "rect":
            self.rects += 1
        elif tag == "div" and "card" in (attrs.get("class") or "").split():
            self.cards.append(attrs.get("class"))

    def handle_data(self, data):
        self.text.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


def parse_page(path: os.PathLike) -> PageParser:
    parser = PageParser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    return parser
