"""ObjectStore on a local directory.

Writes are atomic: data goes to a temporary file in the destination
directory which is then renamed over the key with ``os.replace``, so readers
see the old or the new content, never a partial file. (Not fsync'ed: atomic,
not durable across power loss.) Symlinked directories are not followed when
listing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

from storage.base import ObjectStore, check_data, check_key, check_prefix

__all__ = ["LocalStore"]

_TEMP_PREFIX = ".clipmask-tmp-"


class LocalStore(ObjectStore):
    """Objects stored as files under the directory ``root``."""

    def __init__(self, root: str) -> None:
        """Raises ValueError if ``root`` is not an absolute path."""
        if not os.path.isabs(root):
            raise ValueError(f"LocalStore root must be an absolute path, got {root!r}")
        self._root = os.path.normpath(root)

    @property
    def url(self) -> str:
        return self._root

    def url_for(self, key: str) -> str:
        """Return the absolute path of ``key``; ValueError for an invalid key."""
        return os.path.join(self._root, check_key(key))

    def read_bytes(self, key: str) -> bytes:
        """Return the file's content.

        Raises FileNotFoundError if it is missing (also when a parent is a
        file), IsADirectoryError if ``key`` is a directory, PermissionError.
        """
        path = self.url_for(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except NotADirectoryError as err:
            raise FileNotFoundError(err.errno, "No such file (a parent is not a directory)", path) from err

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Atomically create or replace ``key``, creating parent directories.

        ``content_type`` is ignored. Raises TypeError if data is not
        bytes-like; OSError (FileExistsError, NotADirectoryError,
        IsADirectoryError, PermissionError, ...) from the filesystem.
        """
        path = self.url_for(key)
        data = check_data(data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, data)

    def exists(self, key: str) -> bool:
        """Return True if ``key`` is an existing file; ValueError for a bad key."""
        return os.path.isfile(self.url_for(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield keys starting with ``prefix`` (a plain string prefix, as on S3).

        Keys come in sorted order, walking one directory at a time. A missing
        root or prefix yields nothing. Raises ValueError for a bad prefix,
        PermissionError for an unreadable directory.
        """
        check_prefix(prefix)
        head, _, tail = prefix.rpartition("/")
        start = os.path.join(self._root, head) if head else self._root
        return _walk(start, head + "/" if head else "", tail)


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, then rename it over ``path``."""
    tmp = os.path.join(os.path.dirname(path), _TEMP_PREFIX + uuid.uuid4().hex)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists, ignoring errors."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _walk(directory: str, base: str, name_prefix: str = "") -> Iterator[str]:
    """Yield ``base + relative path`` of files under ``directory`` in key order."""
    for entry in _sorted_entries(directory):
        if not entry.name.startswith(name_prefix) or entry.name.startswith(_TEMP_PREFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, base + entry.name + "/")
        elif entry.is_file():
            yield base + entry.name


def _sorted_entries(directory: str) -> list[os.DirEntry]:
    """Return the entries of ``directory`` in key order ([] if it is missing).

    A directory sorts as "name/" so that the keys below it fall where S3's
    lexicographic order puts them (e.g. "a-b" before "a/c").
    """
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entries, key=_sort_key)


def _sort_key(entry: os.DirEntry) -> str:
    """Return the name of ``entry``, with "/" appended for a directory."""
    return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name
