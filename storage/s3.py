"""ObjectStore on an S3 bucket (or any S3-compatible service).

Endpoint, credentials and region come only from boto3's own configuration
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION,
config files, ...). The boto3 client is created lazily, once per store and
process; it is thread-safe, so one store may be shared by many threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import boto3
from botocore import exceptions as boto_errors
from botocore.config import Config

from storage.base import ObjectStore, check_data, check_key, check_prefix
from storage.errors import translate_s3_error

__all__ = ["S3Store"]

_BOTO_ERRORS = (boto_errors.ClientError, boto_errors.BotoCoreError)


class S3Store(ObjectStore):
    """Objects stored under ``prefix`` in ``bucket``.

    ``max_attempts`` is botocore's standard-mode retry budget (1 = no retry).
    """

    def __init__(self, bucket: str, prefix: str = "", *, max_attempts: int = 5) -> None:
        """Raises ValueError if ``bucket`` is empty or ``prefix`` is invalid."""
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        if prefix:
            check_prefix(prefix)
        self._bucket = bucket
        self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        self._client: Any = None
        self._client_pid = 0

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    def url_for(self, key: str) -> str:
        """Return "s3://bucket/prefix/key"; ValueError for an invalid key."""
        return self.url + check_key(key)

    def read_bytes(self, key: str) -> bytes:
        """Return the object's content.

        Raises FileNotFoundError (missing key or bucket), PermissionError,
        ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        try:
            response = self._s3().get_object(Bucket=self._bucket, Key=self._prefix + key)
            with response["Body"] as body:
                return body.read()
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, url) from err

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace the object, with ``content_type`` if given.

        Raises TypeError if data is not bytes-like; FileNotFoundError (missing
        bucket), PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        extra = {"ContentType": content_type} if content_type else {}
        body = check_data(data)
        try:
            self._s3().put_object(Bucket=self._bucket, Key=self._prefix + key, Body=body, **extra)
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, url) from err

    def exists(self, key: str) -> bool:
        """Return True if the object exists (False also for a missing bucket).

        Raises PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        try:
            self._s3().head_object(Bucket=self._bucket, Key=self._prefix + key)
        except boto_errors.ClientError as err:
            if _http_status(err) == 404:
                return False
            raise translate_s3_error(err, url) from err
        except boto_errors.BotoCoreError as err:
            raise translate_s3_error(err, url) from err
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield keys starting with ``prefix`` in sorted order, page by page.

        Keys ending in "/" (directory placeholders) are skipped. Raises
        ValueError for a bad prefix (at call time); while iterating,
        FileNotFoundError for a missing bucket, PermissionError,
        ConnectionError (transient) or StorageError.
        """
        check_prefix(prefix)
        return self._iter_keys(self._prefix + prefix)

    def _iter_keys(self, full_prefix: str) -> Iterator[str]:
        """Yield keys (relative to the store root) of objects under ``full_prefix``."""
        start = len(self._prefix)
        try:
            for page in self._pages(full_prefix):
                for item in page.get("Contents", ()):
                    if not item["Key"].endswith("/"):
                        yield item["Key"][start:]
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, self.url + full_prefix[start:]) from err

    def _pages(self, full_prefix: str) -> Iterator[dict]:
        """Return list_objects_v2 result pages for ``full_prefix``."""
        paginator = self._s3().get_paginator("list_objects_v2")
        return iter(paginator.paginate(Bucket=self._bucket, Prefix=full_prefix))

    def _s3(self) -> Any:
        """Return this process's boto3 S3 client, creating it on first use."""
        pid = os.getpid()
        if self._client is None or self._client_pid != pid:
            with self._lock:
                if self._client is None or self._client_pid != pid:
                    self._client = self._new_client()
                    self._client_pid = pid
        return self._client

    def _new_client(self) -> Any:
        """Create an S3 client configured from boto3's environment handling."""
        config = Config(
            retries={"mode": "standard", "max_attempts": self._max_attempts},
            max_pool_connections=32,
        )
        return boto3.session.Session().client("s3", config=config)

    def __getstate__(self) -> dict:
        """Pickle without the client and lock (recreated lazily after unpickling)."""
        state = self.__dict__.copy()
        state.update(_client=None, _client_pid=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def _http_status(err: boto_errors.ClientError) -> int:
    """Return the HTTP status code of an S3 error response (0 if unknown)."""
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
