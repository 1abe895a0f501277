"""Object storage for clipmask: one small API over S3 and local directories.

>>> store = open_store("s3://bucket/some/prefix")   # or "/dir", "rel/dir", "file:///dir"
>>> store.write_bytes("a/b.jpg", data)
>>> store.read_bytes("a/b.jpg")
>>> store.write_stream("big.jsonl", lines)       # an iterable of bytes, flat memory
>>> for key in store.list("a/", start_after="a/b.jpg"): ...
>>> for line in store.read_lines("manifest.jsonl"): ...
>>> URLReader().read("s3://bucket/other/prefix/c.png")   # an object by its full URL
>>> URLReader().read_stream("s3://bucket/shards/00000.tar")  # ... as a stream, one request

Errors are Python's own: FileNotFoundError, PermissionError, ConnectionError
(transient, see :func:`is_transient`), ValueError for bad keys or URLs, and
:class:`StorageError` (an OSError) for anything else. This package never
imports torch or celery.
"""

from __future__ import annotations

import os
import threading
from typing import Any, BinaryIO

from storage.base import Listed, ObjectStore
from storage.errors import StorageError, is_transient
from storage.local import LocalStore
from storage.s3 import S3Store
from storage.urls import StoreURL, parse_url, split_object_url

__all__ = [
    "Listed", "LocalStore", "ObjectStore", "S3Store", "StorageError", "StoreURL", "URLReader",
    "is_transient", "open_store", "parse_url", "split_object_url",
]


def open_store(url: str | os.PathLike[str], **options: Any) -> ObjectStore:
    """Return the store rooted at ``url`` (see :func:`parse_url` for the forms).

    ``options`` go to the backend (S3Store: ``max_attempts``, ``part_size``,
    ``list_concurrency``; LocalStore: ``spill_names``). Raises
    ValueError for an unsupported or malformed URL, TypeError for an unknown
    option. Opening does no I/O, so a missing bucket or directory is only
    noticed when used.
    """
    parsed = parse_url(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.bucket, parsed.prefix, **options)
    return LocalStore(parsed.prefix, **options)


class URLReader:
    """Reads objects by their full URL (``s3://bucket/key`` or a local path), opening one store
    per parent folder and reusing it; safe to share between threads."""

    def __init__(self) -> None:
        self._stores: dict[str, ObjectStore] = {}
        self._lock = threading.Lock()

    def read(self, url: str) -> bytes:
        """The bytes at ``url``; raises as ``ObjectStore.read_bytes`` and ``split_object_url`` do."""
        store, key = self._store_of(url)
        return store.read_bytes(key)

    def read_stream(self, url: str) -> BinaryIO:
        """The object at ``url`` as a stream from one request (``ObjectStore.read_stream``); raises
        as that and ``split_object_url`` do."""
        store, key = self._store_of(url)
        return store.read_stream(key)

    def _store_of(self, url: str) -> tuple[ObjectStore, str]:
        root, key = split_object_url(url)
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                store = self._stores[root] = open_store(root)
        return store, key
