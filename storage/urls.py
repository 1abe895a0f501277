"""Parsing of store URLs: the one place URLs and paths are interpreted.

Supported forms:

- ``s3://bucket`` or ``s3://bucket/some/prefix`` (trailing "/" optional)
- a local path, absolute or relative (resolved against the current directory)
- ``file:///abs/path`` (``file://localhost/abs/path`` also accepted)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote

from storage.base import check_key

__all__ = ["StoreURL", "parse_url", "split_object_url"]

SUPPORTED_FORMS = "s3://bucket/prefix or a local path (absolute, relative or file:///abs/path)"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class StoreURL:
    """A parsed store location.

    ``scheme`` is "s3" or "file"; ``bucket`` is the S3 bucket (None for
    file); ``prefix`` is the S3 key prefix ("" or ending in "/") or, for
    file, the absolute directory path.
    """

    scheme: str
    bucket: str | None
    prefix: str

    @property
    def url(self) -> str:
        """Canonical string form: "s3://bucket/prefix/" or "/abs/dir"."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        return self.prefix


def parse_url(url: str | os.PathLike[str]) -> StoreURL:
    """Parse ``url`` into a :class:`StoreURL`.

    Raises TypeError if ``url`` is not a str or path, and ValueError if it is
    empty, has an unsupported scheme, an S3 URL lacks a bucket or has an
    invalid prefix, or a file URL names a remote host or no path.
    """
    url = os.fspath(url)
    if not isinstance(url, str):
        raise TypeError(f"store URL must be a str or os.PathLike, not {type(url).__name__}")
    if not url:
        raise ValueError(f"store URL is empty; expected {SUPPORTED_FORMS}")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else "file"
    if scheme == "s3":
        return _parse_s3(url, url[match.end():])
    if scheme != "file":
        raise ValueError(f"unsupported store URL {url!r}; expected {SUPPORTED_FORMS}")
    path = _file_url_path(url, url[match.end():]) if match else url
    return StoreURL("file", None, os.path.abspath(os.path.expanduser(path)))


def _parse_s3(url: str, rest: str) -> StoreURL:
    """Split "bucket/prefix" of an S3 URL; ValueError if bucket or prefix is bad."""
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URL {url!r} has no bucket; expected s3://bucket/prefix")
    prefix = prefix[:-1] if prefix.endswith("/") else prefix
    if prefix:
        try:
            check_key(prefix)
        except ValueError as err:
            raise ValueError(f"S3 URL {url!r} has an invalid prefix: {err}") from err
    return StoreURL("s3", bucket, prefix + "/" if prefix else "")


def _file_url_path(url: str, rest: str) -> str:
    """Return the local path of a file URL; ValueError for a remote host."""
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"file URL {url!r} names host {host!r}; only local paths are supported")
    if not slash:
        raise ValueError(f"file URL {url!r} has no path; expected file:///abs/path")
    return unquote(slash + path)


def split_object_url(url: str | os.PathLike[str]) -> tuple[str, str]:
    """``(store root URL, key)`` of one object's URL: ``s3://bucket/a/b.jpg`` gives
    ``("s3://bucket/a", "b.jpg")``, a local path or file URL its folder and file name.

    Raises ValueError for an empty URL, an S3 URL without a key, or one ending in "/".
    """
    url = os.fspath(url)
    if isinstance(url, str) and url.lower().startswith("s3://"):
        bucket, _, key = url[len("s3://"):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ValueError(f"S3 URL {url!r} does not name an object; expected s3://bucket/key")
        parent, _, name = key.rpartition("/")
        return f"s3://{bucket}/{parent}", name
    path = parse_url(url).prefix  # absolute local path (also for file:// URLs)
    return os.path.dirname(path), os.path.basename(path)
