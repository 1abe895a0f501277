"""Checks before any image is computed: the source is there, the destination takes writes.

Each failure says what to fix, so that a wrong ``SRC`` or an unwritable ``--out`` is found in a
second, not after a whole job has been computed.
"""

from __future__ import annotations

import uuid

from storage import ObjectStore, open_store
from storage.layout import JOBS_PREFIX
from tasks.errors import DestinationError, SourceError
from tasks.jobs.listing import image_keys, no_images


def check_source(source: ObjectStore) -> None:
    """A local SRC must be an existing folder (an S3 prefix is checked by listing it); raises
    ``SourceError`` saying what to pass."""
    try:
        source.check_root()
    except NotADirectoryError:
        raise SourceError(f"SRC {source.url} is a file: pass the folder that holds the images") from None
    except FileNotFoundError:
        raise SourceError(f"SRC {source.url} does not exist: pass a folder of images or s3://bucket/prefix") from None


def check_writable(dest: ObjectStore) -> None:
    """Write and delete a probe under ``DST/_jobs/`` (a local DST keeps no folder it did not
    have); raises ``DestinationError`` saying what to fix."""
    probe = f"{JOBS_PREFIX}.probe-{uuid.uuid4().hex}"
    try:
        dest.check_root()
        existed = True
    except (FileNotFoundError, NotADirectoryError):
        existed = False
    try:
        dest.write_bytes(probe, b"")
        dest.delete(probe)
        if not existed:
            dest.discard_root()
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        raise DestinationError(f"cannot write to --out {dest.url} ({err}): choose a writable folder or bucket, "
                               "or fix its permissions or credentials") from None


def check_run(source_url: str, dest_url: str) -> tuple[ObjectStore, ObjectStore, int]:
    """Before ``clipmask run`` loads a model: SRC exists and holds images, DST takes a write.
    Returns (source, dest, images under SRC). Raises ``SourceError``, ``NoImagesError``,
    ``DestinationError``, ``ValueError`` for a malformed URL."""
    source, dest = open_store(source_url), open_store(dest_url)
    check_source(source)
    check_writable(dest)
    total = sum(1 for _ in image_keys(source))
    if not total:
        raise no_images(source)
    return source, dest, total
