"""Checks before any image is computed: the source is there, the destination takes writes.

Each failure says what to fix, so that a wrong ``SRC`` or an unwritable ``--out`` is found in a
second, not after a whole job has been computed.
"""

from __future__ import annotations

import logging
import threading
import uuid

from storage import ObjectStore, open_store
from storage.layout import JOBS_PREFIX
from tasks.errors import DestinationError, SourceError
from tasks.jobs.listing import image_keys, no_images
from tasks.shards.names import ShardSet, find_shards, is_brace_pattern

log = logging.getLogger(__name__)


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


def check_run(source_url: str, dest_url: str) -> tuple[ObjectStore, ObjectStore, ImageCount]:
    """Before ``clipmask run`` loads a model: SRC exists and holds images, DST takes a write.
    Returns (source, dest, the count of images under SRC, under way). Raises ``SourceError``,
    ``NoImagesError``, ``DestinationError``, ``ValueError`` for a malformed URL."""
    source, dest = open_store(source_url), open_store(dest_url)
    check_source(source)
    check_writable(dest)
    keys = image_keys(source)
    try:
        first = next(keys, None)
    finally:
        keys.close()
    if first is None:
        raise no_images(source)
    return source, dest, ImageCount(source)


def check_shard_run(shards: ShardSet, dest_url: str) -> ObjectStore:
    """Before ``clipmask run`` masks shards: the first shard SRC names is there, DST takes a
    write. Returns the dest. Raises ``SourceError``, ``DestinationError``, ``ValueError``."""
    dest = open_store(dest_url)
    check_first_shard(shards)
    check_writable(dest)
    return dest


def shard_source(url: str) -> ShardSet | None:
    """The shards a job's SRC names (``tasks.shards.names.find_shards``), their first one
    checked, or None for a folder of images, checked as ``check_source`` does. Raises
    ``SourceError``, ``ValueError`` for a malformed URL or pattern."""
    if not is_brace_pattern(url):
        check_source(open_store(url))  # a missing folder is named as such, not listed
    shards = find_shards(url)
    if shards is not None:
        check_first_shard(shards)
    return shards


def check_first_shard(shards: ShardSet) -> None:
    """The first shard SRC names exists; raises ``SourceError`` saying what to pass."""
    first = next(shards.keys(), None)
    if first is None or not shards.store.exists(first):
        named = shards.url_for(first) if first is not None else shards.store.url
        raise SourceError(f"SRC names shard {named}, which does not exist: pass a folder of .tar or .parquet shards "
                          "or a brace pattern such as s3://bucket/data/{00000..00099}.tar")


class ImageCount:
    """The images under a source, counted by a listing of its own in a thread, so that the work
    does not wait for it: a flat S3 prefix of 10^6 keys is 1,000 round trips, minutes at S3's.
    ``value`` is None until the count is done (or if it failed: it is only for a progress bar)."""

    def __init__(self, source: ObjectStore) -> None:
        self._value: int | None = None
        self._thread = threading.Thread(target=self._count, args=(source,), name="clipmask-count", daemon=True)
        self._thread.start()

    def _count(self, source: ObjectStore) -> None:
        try:
            self._value = sum(1 for _ in image_keys(source))
        except Exception as err:  # noqa: BLE001 - a progress bar without a total; the run itself says
            log.info("could not count the images under %s: %s", source.url, err)

    @property
    def value(self) -> int | None:
        return self._value

    def wait(self, timeout: float | None = None) -> int | None:
        """The count, once done (None if it failed or ``timeout`` passed)."""
        self._thread.join(timeout)
        return self._value
