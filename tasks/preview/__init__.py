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
that of the sample and says so. The manifest comes through ``ObjectStore.read_lines`` (streamed
from a local file; on S3 one GET whose bytes are held, never its rows). One unreadable image,
mask or metadata file becomes a card with its error; it never stops the page (``cards.py``).

A job over shards names its images and outputs as members of shards (``<shard URL>#<member>``):
the sampled rows are grouped by shard and each shard they need is read once, one GET, before the
cards are drawn (``shards.py``): at most two shards a card (its input shard for the image, its
output shard for the record and mask), shared by every card from the same shards, a tar read no
further than its last needed member, and only the needed members' bytes kept. A shard that cannot
be read makes error cards of its own cards only.

This is job-side code: Pillow, numpy, ``storage``, ``worker.codecs`` and the torch-free
``tasks.shards`` only (no torch, no engine; pyarrow only once a Parquet shard is met).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage import ObjectStore, URLReader, open_store
from storage.layout import job_keys
from tasks.preview.cards import Card, draw_card
from tasks.preview.find import find_job, list_job_ids
from tasks.preview.page import render_page
from tasks.preview.sample import DEFAULT_LIMIT, ManifestSample, sample_manifest
from tasks.preview.shards import ShardMembers

__all__ = ["DEFAULT_LIMIT", "Card", "ManifestSample", "find_job", "list_job_ids", "sample_manifest", "write_preview"]

#: Threads reading and drawing sampled images (I/O bound on S3; Pillow releases the GIL).
WORKERS = 4


def _safe_dirname(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_id).lstrip(".") or "job"


def _image_column(store: ObjectStore, job_id: str, summary: dict) -> str | None:
    """The image column a job over Parquet shards read (``--image-column``): its summary's
    ``shards``, else its ``job.json``'s; None (the default columns) when neither says."""
    shards = summary.get("shards")
    if not isinstance(shards, dict):
        try:
            shards = json.loads(store.read_bytes(job_keys(job_id)["job"])).get("shards")
        except (OSError, ValueError, AttributeError):
            shards = None
    column = shards.get("image_column") if isinstance(shards, dict) else None
    return column if isinstance(column, str) and column else None


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
        sample = sample_manifest(store.read_lines(manifest_key), limit, seed)
    except FileNotFoundError:
        raise FileNotFoundError(f"job {job_id} has a summary but no manifest at {store.url_for(manifest_key)}; "
                                f"rewrite it with `clipmask resume {job_id}`") from None
    folder = Path(os.path.expanduser(out_dir)) if out_dir is not None else Path(f"preview-{_safe_dirname(job_id)}")
    for sub in ("thumbs", "overlays"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    reader = ShardMembers(sample.succeeded, URLReader())
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="clipmask-preview") as pool:
        reader.fetch(pool, _image_column(store, job_id, summary) if reader.needs_image_column else None)
        cards = list(pool.map(lambda item: draw_card(item[0], item[1], reader, folder, summary, store.url),
                              enumerate(sample.succeeded)))
    page = folder / "index.html"
    partial = folder / ".index.html.partial"
    partial.write_text(render_page(job_id, summary, sample, cards, seed), encoding="utf-8")
    os.replace(partial, page)
    return page
