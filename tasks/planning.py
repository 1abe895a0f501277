"""Planning a job: list the source, keep the images, fan keys out in chunks.

Listing streams page by page and chunks are sent as they fill, so a prefix of millions of keys
never sits in memory.
"""

from __future__ import annotations

import logging
from itertools import chain, islice
from typing import Callable, Iterable, Iterator

from storage import ObjectStore, open_store
from storage.layout import is_output_key
from worker.codecs import IMAGE_EXTENSIONS, is_image_key
from worker.spec import MaskSpec

from .jobs import JobStore, new_job_id
from .manifest import write_job_records

log = logging.getLogger(__name__)

#: Images per task when ``--chunk-size`` is not given: large enough to batch on a GPU, small
#: enough that a redelivered chunk repeats little work.
DEFAULT_CHUNK_SIZE = 64


class NoImagesError(LookupError):
    """Raised when a source holds no image files (by extension) to mask."""

    def __init__(self, source: ObjectStore):
        super().__init__(f"no images under {source.url} (extensions: {' '.join(IMAGE_EXTENSIONS)})")


def image_keys(source: ObjectStore) -> Iterator[str]:
    """Keys under ``source`` with an image extension, excluding clipmask's own outputs."""
    return (key for key in source.list() if is_image_key(key) and not is_output_key(key))


def chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def submit_job(source_url: str, dest_url: str, spec: MaskSpec, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               skip_existing: bool = False, jobs: JobStore | None = None,
               on_chunk: Callable[[int], None] | None = None) -> str:
    """Record a job, queue its chunks and return its id.

    ``on_chunk(n)`` is called as each chunk of ``n`` keys is queued (for a progress display).
    Raises ``NoImagesError`` before recording anything if the source has no images, and
    ``ValueError`` for a bad URL or chunk size.
    """
    from .masks import mask_chunk  # the Celery side, imported only when a job is submitted

    if chunk_size < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {chunk_size}")
    source, dest = open_store(source_url), open_store(dest_url)
    chunks = chunked(image_keys(source), chunk_size)
    first = next(chunks, None)
    if first is None:
        raise NoImagesError(source)
    jobs = jobs or JobStore.from_env()
    job_id = new_job_id()
    jobs.create(job_id, source.url, dest.url, spec.to_dict(), skip_existing)
    for chunk in chain([first], chunks):
        jobs.add_planned(job_id, len(chunk))  # before sending: done never runs ahead of total
        mask_chunk.apply_async(args=(job_id, source.url, dest.url, chunk, spec.to_dict(), skip_existing))
        if on_chunk:
            on_chunk(len(chunk))
    jobs.finish_planning(job_id)
    write_job_records(jobs, job_id, dest)  # if every chunk finished before planning did
    log.info("job %s: %s -> %s planned", job_id, source.url, dest.url)
    return job_id
