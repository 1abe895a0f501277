"""The ObjectStore interface and key validation shared by all backends."""

from __future__ import annotations

import abc
import io
from collections.abc import Iterable, Iterator
from typing import BinaryIO

__all__ = [
    "Listed", "ObjectStore", "check_chunks", "check_data", "check_key", "check_prefix", "check_start_after",
]


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative posix key.

    Raises TypeError if ``key`` is not a str, and ValueError if it is empty,
    absolute, ends with "/", or has empty, "." or ".." segments (which could
    escape the store root on local disk or alias another key).
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    if key.startswith("/"):
        raise ValueError(f"key must be relative to the store root, got absolute key {key!r}")
    if key.endswith("/"):
        raise ValueError(f"key must name an object, not a directory: {key!r}")
    _check_segments(key)
    return key


def _check_segments(key: str) -> None:
    """Raise ValueError if ``key`` has an empty, "." or ".." segment."""
    for segment in key.split("/"):
        if segment == "..":
            raise ValueError(f"key must not contain '..' segments: {key!r}")
        if segment in ("", "."):
            raise ValueError(f"key must not contain empty or '.' segments: {key!r}")


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is "" or a valid key, optionally ending in "/".

    Raises TypeError/ValueError as :func:`check_key` does.
    """
    if prefix == "":
        return prefix
    if isinstance(prefix, str) and prefix.startswith("/"):
        raise ValueError(f"prefix must be relative to the store root, got {prefix!r}")
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def check_start_after(start_after: str | None) -> str:
    """Return ``start_after`` as a str ("" for None: no lower bound).

    Any string is a valid bound (it need not name an existing key). Raises
    TypeError if it is neither a str nor None.
    """
    if start_after is None:
        return ""
    if not isinstance(start_after, str):
        raise TypeError(f"start_after must be a str or None, not {type(start_after).__name__}")
    return start_after


class Listed(str):
    """A key as a listing gives it (it compares, hashes and slices as the key), with what the
    listing says of its object: ``size`` in bytes, ``modified`` (seconds since the epoch: S3's
    LastModified, a file's mtime) and ``etag`` (S3's ETag, quotes included; None on a local disk)."""

    def __new__(cls, key: str, size: int, modified: float, etag: str | None = None) -> "Listed":
        listed = super().__new__(cls, key)
        listed.size, listed.modified, listed.etag = size, modified, etag
        return listed

    def moved(self, key: str) -> "Listed":
        """The same object under another name (relative to another root)."""
        return Listed(key, self.size, self.modified, self.etag)

    def __reduce__(self):
        return Listed, (str(self), self.size, self.modified, self.etag)


class ObjectStore(abc.ABC):
    """A flat store of byte objects addressed by relative posix keys ("a/b.jpg").

    Every method validates its key first (ValueError/TypeError, see
    :func:`check_key`) and raises Python's own exceptions: FileNotFoundError,
    PermissionError, ConnectionError (transient), or StorageError (an OSError).
    """

    #: Whether each request crosses a network (S3: tens to hundreds of milliseconds a round trip,
    #: so callers keep many in flight) or is served at once (a local disk).
    networked: bool = True

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Canonical root URL: "s3://bucket/prefix/" or an absolute directory."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the content of ``key``; FileNotFoundError if it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace ``key`` with ``data``; TypeError if data is not bytes-like."""

    @abc.abstractmethod
    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> int:
        """Create or replace ``key`` from byte chunks with flat memory; return the bytes written.

        The object appears only once the iterable is exhausted: if it (or the
        write) raises, no new object is left and an old one is untouched.
        Raises TypeError for a chunk that is not bytes-like (or a bare bytes
        object instead of an iterable of them); exceptions of the iterable
        itself propagate unchanged.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object ``key``; removing a missing object is not an error."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Return True if the object ``key`` exists (directories do not count)."""

    @abc.abstractmethod
    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        """Yield keys starting with ``prefix``, recursively, in sorted order.

        With ``start_after``, only keys strictly greater than it (resume a
        listing after the last key seen). The order is S3's: keys compared as
        strings, so "a-b" comes before "a/c". Raises ValueError for a bad
        prefix and TypeError for a non-str ``start_after``, at call time.
        """

    @abc.abstractmethod
    def list_entries(self, prefix: str = "", start_after: str | None = None) -> Iterator[Listed]:
        """``list``, each key a ``Listed`` that carries its object's size, last modification and
        ETag, at the cost of the listing itself (no request per key)."""

    def read_object(self, key: str) -> tuple[bytes, str | None]:
        """The content of ``key`` and its ETag (None where the store has none), in one request;
        raises as ``read_bytes`` does."""
        return self.read_bytes(key), None

    def read_stream(self, key: str) -> BinaryIO:
        """A file-like object (``read``, ``close``, a context manager) over the content of ``key``,
        from one request, for an object too large to hold (a WebDataset shard). Raises as
        ``read_bytes`` does, at call time for a missing key; while reading, ConnectionError
        (transient) or StorageError. Here from one ``read_bytes``, held whole; both backends stream
        with flat memory (``S3Store``: one GET read as its body arrives; ``LocalStore``: the file)."""
        return io.BytesIO(self.read_bytes(key))

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """Return the full URL (or absolute path) of ``key``."""

    def check_root(self) -> None:
        """Raise ``FileNotFoundError`` (``NotADirectoryError`` for a file) when the root is known not
        to be a place of objects. Nothing here: an S3 prefix exists once it holds a key."""

    def discard_root(self) -> None:
        """Remove the root if it is an empty folder (a probe's leftover); nothing on S3."""

    def read_lines(self, key: str) -> Iterator[bytes]:
        """Yield the lines of ``key`` (each with its b"\\n", the last one may lack it), raising
        as ``read_bytes`` does. Here from one ``read_bytes``: its bytes are held, never a list of
        lines; a backend that can stream does (``LocalStore`` reads the file as it goes)."""
        yield from io.BytesIO(self.read_bytes(key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_data(data: object) -> bytes:
    """Return ``data`` as bytes/bytearray; TypeError if it is not bytes-like."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return data.tobytes()
    raise TypeError(f"data must be bytes-like, not {type(data).__name__}")


def check_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Return an iterator over ``chunks`` that checks each one with :func:`check_data`.

    Raises TypeError at once if ``chunks`` is itself bytes-like or a str (a
    whole payload, not an iterable of chunks), and for each bad chunk when
    it is reached.
    """
    if isinstance(chunks, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"chunks must be an iterable of bytes, not {type(chunks).__name__}; "
                        "use write_bytes for a whole payload")
    return (check_data(chunk) for chunk in chunks)
