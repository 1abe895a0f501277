"""The ObjectStore interface and key validation shared by all backends."""

from __future__ import annotations

import abc
from collections.abc import Iterator

__all__ = ["ObjectStore", "check_data", "check_key", "check_prefix"]


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


class ObjectStore(abc.ABC):
    """A flat store of byte objects addressed by relative posix keys ("a/b.jpg").

    Every method validates its key first (ValueError/TypeError, see
    :func:`check_key`) and raises Python's own exceptions: FileNotFoundError,
    PermissionError, ConnectionError (transient), or StorageError (an OSError).
    """

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
    def exists(self, key: str) -> bool:
        """Return True if the object ``key`` exists (directories do not count)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield keys starting with ``prefix``, recursively, in sorted order."""

    @abc.abstractmethod
    def url_for(self, key: str) -> str:
        """Return the full URL (or absolute path) of ``key``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_data(data: object) -> bytes:
    """Return ``data`` as bytes/bytearray; TypeError if it is not bytes-like."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if isinstance(data, memoryview):
        return data.tobytes()
    raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
