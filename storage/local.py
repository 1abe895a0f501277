"""ObjectStore on a local directory.

Writes are atomic: data goes to a temporary file in the destination
directory which is then renamed over the key with ``os.replace``, so readers
see the old or the new content, never a partial file. (Not fsync'ed: atomic,
not durable across power loss.) ``write_stream`` does the same with data
arriving in chunks, so its memory stays flat.

Listing walks one directory at a time in S3's key order (a directory sorts
as "name/", so "a-b" comes before "a/c"). Sorted order needs all of one
directory's names before its first key is yielded, so while a directory is
listed its names are held in memory as plain strings: about 60 bytes plus
the name's length each (71 bytes for "img_000001.jpg", 70 MB for a million
such files). Only the directories on the path being walked are held at
once, so a tree of nested folders costs what its largest folder costs.
A directory of more than ``spill_names`` names (SPILL_NAMES, 200,000) is
sorted in runs of that many, spilled to anonymous temporary files in
``tempfile``'s directory (the name's length plus one byte each) and merged:
about 15 MB while it is read, then about 80 KB per run, whatever its size.
Names are filtered by the listing's prefix and ``start_after`` as they are
read, and a subdirectory that sorts entirely before ``start_after`` is
skipped without being opened, so resuming a listing after key K reads only
the directories on K's path and those after it. Symlinked directories are
not followed; temporary files are not listed.
"""

from __future__ import annotations

import heapq
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, BinaryIO

from storage.base import (
    Listed,
    ObjectStore,
    check_chunks,
    check_data,
    check_key,
    check_prefix,
    check_start_after,
)

__all__ = ["SPILL_NAMES", "LocalStore"]

_TEMP_PREFIX = ".clipmask-tmp-"
#: Names of one directory held in memory before they are sorted and spilled to a temp file.
SPILL_NAMES = 200_000
_RUN_READ_SIZE = 1 << 14


class LocalStore(ObjectStore):
    """Objects stored as files under the directory ``root``.

    ``spill_names`` is how many names of one directory a listing sorts in
    memory before spilling them to a temporary file (see the module doc).
    """

    networked = False  # a request is served at once: nothing to keep in flight

    def __init__(self, root: str, *, spill_names: int = SPILL_NAMES) -> None:
        """Raises ValueError if ``root`` is not an absolute path or spill_names < 1."""
        if not os.path.isabs(root):
            raise ValueError(f"LocalStore root must be an absolute path, got {root!r}")
        if spill_names < 1:
            raise ValueError(f"spill_names must be at least 1, got {spill_names}")
        self._root = os.path.normpath(root)
        self._spill_names = spill_names

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

    def read_stream(self, key: str) -> BinaryIO:
        """The file opened for reading (buffered, flat memory); raises as ``read_bytes`` does."""
        path = self.url_for(key)
        try:
            return open(path, "rb")
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
        _write_atomic(path, (data,))

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> int:
        """Atomically create or replace ``key`` from ``chunks``; return the bytes written.

        Chunks go to a temporary file beside the target, renamed over it at
        the end; on any exception the temporary file is removed and an old
        file is left as it was. ``content_type`` is ignored. Raises TypeError
        for a chunk that is not bytes-like; OSError from the filesystem (as
        write_bytes); the iterable's own exceptions unchanged.
        """
        path = self.url_for(key)
        chunks = check_chunks(chunks)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _write_atomic(path, chunks)

    def check_root(self) -> None:
        """Raise ``NotADirectoryError`` if the root is a file, ``FileNotFoundError`` if it is missing."""
        if os.path.isfile(self._root):
            raise NotADirectoryError(f"{self._root} is a file, not a folder")
        if not os.path.isdir(self._root):
            raise FileNotFoundError(f"{self._root} does not exist")

    def discard_root(self) -> None:
        """Remove the root folder if it is empty; a folder with anything in it stays."""
        try:
            os.rmdir(self._root)
        except OSError:
            pass

    def read_lines(self, key: str) -> Iterator[bytes]:
        """Yield the file's lines as it is read (flat memory); raises as ``read_bytes`` does."""
        path = self.url_for(key)
        try:
            handle = open(path, "rb")
        except NotADirectoryError as err:
            raise FileNotFoundError(err.errno, "No such file (a parent is not a directory)", path) from err
        with handle:
            yield from handle

    def delete(self, key: str) -> None:
        """Remove the file ``key`` if it exists, then the folders it leaves empty below the root
        (S3 has no empty folders either); PermissionError, IsADirectoryError from the filesystem."""
        path = self.url_for(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        folder = os.path.dirname(path)
        while folder != self._root and folder.startswith(self._root):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or not ours to remove): stop there
                return
            folder = os.path.dirname(folder)

    def exists(self, key: str) -> bool:
        """Return True if ``key`` is an existing file; ValueError for a bad key."""
        return os.path.isfile(self.url_for(key))

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        """Yield keys starting with ``prefix`` (a plain string prefix, as on S3).

        Keys come in sorted order, walking one directory at a time; with
        ``start_after`` only keys greater than it, skipping the directories
        before it unread. A missing root or prefix yields nothing. Raises
        ValueError for a bad prefix and TypeError for a non-str start_after
        (at call time); while iterating, PermissionError for an unreadable
        directory and OSError if a temporary file for a huge directory fails.
        """
        check_prefix(prefix)
        after = check_start_after(start_after)
        head, _, tail = prefix.rpartition("/")
        base = head + "/" if head else ""
        return self._list(base, tail, after)

    def list_entries(self, prefix: str = "", start_after: str | None = None) -> Iterator[Listed]:
        """``list``, each key with its file's size and mtime, read (one ``stat``) when first
        asked for: a caller that looks at a few keys' details pays for those alone. A file removed
        in between has size 0 and mtime 0."""
        keys = self.list(prefix, start_after)
        return self._entries(keys)

    def _entries(self, keys: Iterator[str]) -> Iterator[Listed]:
        root = self._root
        for key in keys:
            yield _LocalListed(key, root)

    def _list(self, base: str, tail: str, after: str) -> Iterator[str]:
        """Yield keys under the folder ``base`` whose name there starts with ``tail``, > ``after``."""
        if after.startswith(base):
            yield from self._walk(base, tail, after[len(base):])
        elif after < base:
            yield from self._walk(base, tail, "")

    def _walk(self, base: str, tail: str, after: str) -> Iterator[str]:
        """Yield ``base + relative path`` of the files under folder ``base`` in key order.

        Only names starting with ``tail`` and sorting after ``after`` (relative
        to ``base``) are listed; a subdirectory "d/" is entered only if its
        keys can be greater than ``after``.
        """
        directory = os.path.join(self._root, base)
        for name in self._sorted_names(directory, _NameFilter(tail, after)):
            if name.endswith("/"):
                yield from self._walk(base + name, "", after[len(name):] if after.startswith(name) else "")
            else:
                yield base + name

    def _sorted_names(self, directory: str, keep: _NameFilter) -> Iterator[str]:
        """Return the kept sort names of ``directory`` in order (nothing if it is missing).

        Merges the runs spilled to temporary files with the names left in memory.
        """
        try:
            runs, names = self._scan(directory, keep)
        except (FileNotFoundError, NotADirectoryError):
            return iter(())
        names.sort()
        return heapq.merge(*map(_read_run, runs), names) if runs else iter(names)

    def _scan(self, directory: str, keep: _NameFilter) -> tuple[list[IO[bytes]], list[str]]:
        """Read the sort names of ``directory`` that ``keep`` accepts.

        Returns the sorted runs of ``spill_names`` names spilled to temporary
        files, and the names that did not fill a run. A directory's name ends
        with "/"; files are regular files (or links to them); temporary files
        and anything else are left out.
        """
        runs: list[IO[bytes]] = []
        names: list[str] = []
        with os.scandir(directory) as entries:
            for entry in entries:
                name = _sort_name(entry)
                if name is not None and keep(name):
                    names.append(name)
                    if len(names) >= self._spill_names:
                        runs.append(_spill(names))
                        names = []
        return runs, names


class _LocalListed(Listed):
    """A listed file whose ``size``, ``modified`` and ``etag`` (None) come from a ``stat`` made
    when one of them is first read."""

    def __new__(cls, key: str, root: str) -> "_LocalListed":
        listed = str.__new__(cls, key)
        listed._root = root
        return listed

    def __getattr__(self, name: str):
        if name not in ("size", "modified", "etag"):
            raise AttributeError(name)
        try:
            stat = os.stat(self._root + os.sep + self)  # a checked relative key: no join needed
            self.size, self.modified = stat.st_size, stat.st_mtime
        except FileNotFoundError:
            self.size, self.modified = 0, 0.0
        self.etag = None
        return getattr(self, name)


class _NameFilter:
    """Whether a sort name in a directory is listed, given the prefix ``tail`` and ``after``."""

    __slots__ = ("tail", "after")

    def __init__(self, tail: str, after: str) -> None:
        self.tail, self.after = tail, after

    def __call__(self, name: str) -> bool:
        """True if ``name`` starts with tail and it or (for "d/") keys below it sort after ``after``."""
        if not name.startswith(self.tail):
            return False
        return name > self.after or (name.endswith("/") and self.after.startswith(name))


def _sort_name(entry: os.DirEntry) -> str | None:
    """Return the sort name of ``entry``: "name/" for a directory, "name" for a file, else None.

    Uses the type cached by scandir (d_type); only symlinks cost a stat.
    """
    if entry.name.startswith(_TEMP_PREFIX):
        return None
    if entry.is_dir(follow_symlinks=False):
        return entry.name + "/"
    return entry.name if entry.is_file() else None


def _spill(names: list[str]) -> IO[bytes]:
    """Sort ``names`` into an anonymous temporary file (NUL-terminated), rewound for reading."""
    names.sort()
    run = tempfile.TemporaryFile()
    run.writelines(os.fsencode(name) + b"\0" for name in names)
    run.seek(0)
    return run


def _read_run(run: IO[bytes]) -> Iterator[str]:
    """Yield the names of a spilled run in order, closing (and so deleting) it at the end."""
    with run:
        rest = b""
        while block := run.read(_RUN_READ_SIZE):
            *names, rest = (rest + block).split(b"\0")
            yield from map(os.fsdecode, names)


def _write_atomic(path: str, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to a temp file next to ``path``, then rename it over ``path``.

    Returns the bytes written. On any exception the temp file is removed and
    the exception re-raised; ``path`` is untouched.
    """
    tmp = os.path.join(os.path.dirname(path), _TEMP_PREFIX + uuid.uuid4().hex)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            size = sum(f.write(chunk) for chunk in chunks)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return size


def _remove_quietly(path: str) -> None:
    """Remove ``path`` if it exists, ignoring errors."""
    try:
        os.unlink(path)
    except OSError:
        pass
