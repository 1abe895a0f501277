"""``clipmask preview``: a static HTML page to eyeball a finished job's masks.

>>> write_preview("s3://bucket/masks/")                  # the most recent job there
PosixPath('preview-3f2a9c1b7d4e/index.html')
>>> write_preview("masks/", out_dir="/tmp/p", job_id="3f2a9c1b7d4e", limit=50, seed=1)

The page (``index.html`` with ``thumbs/`` and ``overlays/`` beside it) is self-contained: inline
CSS, no JavaScript, no external URL, images by relative path, so the folder can be opened from disk,
zipped or attached to a ticket. It shows the job's summary, a histogram of mask coverage, a uniform
random sample of ``limit`` succeeded images (thumbnail and mask overlay) and the job's failures.

Cost does not grow with the job: the manifest is streamed once (reservoir sampling keeps ``limit``
rows), and only the sampled rows' metadata, image and mask are read, so the coverage histogram is
that of the sample and says so. On S3 the manifest is read as one object (``ObjectStore`` has no
streaming read): its bytes are held, never its rows. One unreadable image, mask or metadata file
becomes a card with its error; it never stops the page.

This is job-side code: Pillow, numpy, ``storage`` and ``worker.codecs`` only (no torch, no engine).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage import ObjectStore, open_store, parse_url
from storage.layout import JOBS_PREFIX, METADATA_SUFFIX, job_keys
from worker.codecs import to_rgb  # Pillow and numpy only: no torch

from .manifest_sample import DEFAULT_LIMIT, ManifestSample, manifest_lines, sample_manifest
from .preview_page import render_page

__all__ = [
    "DEFAULT_LIMIT", "Card", "ManifestSample", "URLReader", "find_job", "list_job_ids", "read_url",
    "sample_manifest", "write_preview",
]

#: Longest side of thumbnails and overlays, in pixels.
THUMB_SIDE = 256
JPEG_QUALITY = 85
TINT = (255, 0, 0)
TINT_ALPHA = 0.5
OUTLINE = (255, 230, 0)
#: Images larger than this (W*H) are not decoded: a guard against decompression bombs.
MAX_PIXELS = 100_000_000
#: Threads reading and drawing sampled images (I/O bound on S3; Pillow releases the GIL).
WORKERS = 4
#: The job ids clipmask makes are hex; anything else cannot name a job (and never a path).
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


# --- reading URLs ---------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, str]:
    """``(store root, key)`` of an object URL: ``s3://bucket/a/b.jpg`` or a local path/file URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"not an object URL: {url!r}")
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://"):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ValueError(f"S3 URL {url!r} does not name an object; expected s3://bucket/key")
        parent, _, name = key.rpartition("/")
        return f"s3://{bucket}/{parent}", name
    path = parse_url(url).prefix  # absolute local path (also for file:// URLs)
    return os.path.dirname(path), os.path.basename(path)


class URLReader:
    """Reads object URLs through ``storage``, one store per parent folder (so one S3 client)."""

    def __init__(self) -> None:
        self._stores: dict[str, ObjectStore] = {}
        self._lock = threading.Lock()

    def read(self, url: str) -> bytes:
        """The bytes at ``url``; FileNotFoundError, PermissionError, ConnectionError, ValueError."""
        root, name = _split_url(url)
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                store = self._stores[root] = open_store(root)
        return store.read_bytes(name)


def read_url(url: str) -> bytes:
    """The bytes at ``url``: ``s3://bucket/key`` or a local path (absolute, or ``file:///...``)."""
    return URLReader().read(url)


# --- finding the job ------------------------------------------------------------------------------


def list_job_ids(store: ObjectStore) -> list[str]:
    """Ids of the jobs under ``_jobs/`` of ``store``, sorted, with one listing request per job.

    After the first key of a job, the listing restarts past all of that job's files (plan and
    result files number in the thousands for a large job): ``start_after`` is the job's folder
    with its trailing "/" replaced by "0", the next character, so no key of the job sorts after it.
    """
    ids: list[str] = []
    after: str | None = None
    while True:
        keys = store.list(JOBS_PREFIX, start_after=after)
        try:
            key = next(iter(keys), None)
        finally:
            getattr(keys, "close", lambda: None)()
        if key is None:
            return ids
        job_id, slash, _ = key[len(JOBS_PREFIX):].partition("/")
        if slash and job_id:
            ids.append(job_id)
            after = f"{JOBS_PREFIX}{job_id}0"
        else:
            after = key  # a stray file directly under _jobs/


def _read_summary(store: ObjectStore, job_id: str) -> dict:
    """The job's ``summary.json``; FileNotFoundError when it has none (yet), ValueError when it
    is not a JSON object."""
    key = job_keys(job_id)["summary"]
    data = store.read_bytes(key)
    try:
        summary = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{store.url_for(key)} is not valid JSON ({err}); rewrite it with "
                         f"`clipmask resume {job_id}`") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{store.url_for(key)} is not a JSON object")
    return summary


def _when(summary: dict) -> datetime:
    """When a job ended (else began), as an aware datetime; the epoch when unknown or malformed."""
    for name in ("finished_at", "created_at"):
        value = summary.get(name)
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(0, timezone.utc)


def find_job(store: ObjectStore, job_id: str | None = None) -> tuple[str, dict]:
    """``(job_id, summary)`` of ``job_id``, or of the most recently finished job in ``store``.

    Raises LookupError naming the jobs there when ``job_id`` is not one of them, and
    FileNotFoundError, saying what to do, when there is no job or it has no summary yet.
    """
    if job_id is not None:
        if _JOB_ID.match(job_id):
            try:
                return job_id, _read_summary(store, job_id)
            except FileNotFoundError:
                pass
        ids = list_job_ids(store)
        if job_id in ids:
            raise FileNotFoundError(
                f"job {job_id} under {store.url} has no summary.json yet: it is still running or was "
                f"interrupted; wait for it (clipmask status {job_id}) or finish it (clipmask resume {job_id})")
        known = ", ".join(ids) if ids else "none"
        raise LookupError(f"no job {job_id!r} under {store.url}; jobs there: {known}")
    ids = list_job_ids(store)
    finished: list[tuple[datetime, str, dict]] = []
    for candidate in ids:
        try:
            finished.append((_when(summary := _read_summary(store, candidate)), candidate, summary))
        except (FileNotFoundError, ValueError):  # running, or a damaged summary: not a candidate
            continue
    if not finished:
        if ids:
            raise FileNotFoundError(
                f"no finished job under {store.url} (jobs there without a summary.json yet: {', '.join(ids)}); "
                "wait for one to finish, or check that DST is the --out of your run")
        raise FileNotFoundError(
            f"no job under {store.url}: there is no {JOBS_PREFIX} folder; pass the --out (DST) of a "
            "finished `clipmask run` or `clipmask submit`")
    _, job_id, summary = max(finished, key=lambda item: (item[0], item[1]))
    return job_id, summary


# --- drawing one card -----------------------------------------------------------------------------


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


def _draw_card(number: int, row: dict, reader: URLReader, out_dir: Path, summary: dict, dest_root: str,
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
        stage = "image"
        image, full = thumbnail(reader.read(source or meta["source"]), side)
        stage = "mask"
        mask, _ = _open_image(reader.read(outputs["mask"]), 0, "the mask")
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


def _safe_dirname(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".") or "job"


def write_preview(dest_url: str, out_dir: str | None = None, job_id: str | None = None,
                  limit: int = DEFAULT_LIMIT, seed: int = 0) -> Path:
    """Write a static preview page of a job in ``dest_url`` (a job's DST); returns its index.html.

    ``job_id`` defaults to the most recently finished job there. ``out_dir`` is a local folder
    (default ``./preview-<job_id>``, also when DST is on S3); ``thumbs/``, ``overlays/`` and
    ``index.html`` are written into it. At most ``limit`` succeeded images are sampled (uniformly,
    with ``random.Random(seed)``) and at most ``limit`` failures listed. Raises FileNotFoundError
    when DST has no finished job, LookupError (naming the jobs there) for an unknown ``job_id``,
    ValueError for a bad ``limit`` or an ``out_dir`` that is not local.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be an int >= 0, got {limit!r}")
    if out_dir is not None and str(out_dir).startswith("s3://"):
        raise ValueError(f"out_dir must be a local folder (the page is opened in a browser), got {out_dir!r}")
    store = open_store(dest_url)
    job_id, summary = find_job(store, job_id)
    manifest_key = job_keys(job_id)["manifest"]
    try:
        sample = sample_manifest(manifest_lines(store, manifest_key), limit, seed)
    except FileNotFoundError:
        raise FileNotFoundError(f"job {job_id} has a summary but no manifest at {store.url_for(manifest_key)}; "
                                f"rewrite it with `clipmask resume {job_id}`") from None
    folder = Path(os.path.expanduser(out_dir)) if out_dir is not None else Path(f"preview-{_safe_dirname(job_id)}")
    for sub in ("thumbs", "overlays"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    reader = URLReader()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="clipmask-preview") as pool:
        cards = list(pool.map(lambda item: _draw_card(item[0], item[1], reader, folder, summary, store.url),
                              enumerate(sample.succeeded)))
    page = folder / "index.html"
    partial = folder / ".index.html.partial"
    partial.write_text(render_page(job_id, summary, sample, cards, seed), encoding="utf-8")
    os.replace(partial, page)
    return page
