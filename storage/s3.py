"""ObjectStore on an S3 bucket (or any S3-compatible service).

Endpoint, credentials and region come only from boto3's own configuration
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION,
config files, ...). The boto3 client is created lazily, once per process for
the same settings and environment, and shared by every store (``shared_client``);
it is thread-safe, so stores may be shared by many threads.

Retries happen in layers, each failure in exactly one of them:

1. botocore's standard retry mode (``max_attempts``, default 5 attempts in
   all, exponential back-off with jitter) retries every request: throttling
   (503 SlowDown, 429), other 5xx, connection errors, and a response cut off
   while botocore reads it itself (every response but GetObject's body).
2. ``read_bytes`` retries the whole GET when the object's body stream is cut
   after the headers arrived, which botocore does not retry: STREAM_ATTEMPTS
   GETs in all, after 0.2, 0.4, 0.8 s; then ConnectionError.
3. Callers above storage never retry one storage call again: a
   ConnectionError means these budgets are spent. They may retry a whole
   unit of work later.

``write_stream`` uploads in parts of ``part_size`` (PART_SIZE, 8 MiB) with a
multipart upload, or one PUT for less than a part; S3 allows 10,000 parts,
so with 8 MiB parts an object of up to about 78 GiB. If the response to the
final CompleteMultipartUpload is lost, botocore's retry of it can fail (the
upload is already gone) although the object was written: the caller sees an
error, and retrying its unit of work writes the same object again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import boto3
from botocore import exceptions as boto_errors
from botocore.config import Config
from urllib3 import exceptions as urllib3_errors

from storage.base import ObjectStore, check_chunks, check_data, check_key, check_prefix, check_start_after
from storage.errors import translate_s3_error

__all__ = ["MIN_PART_SIZE", "PART_SIZE", "STREAM_ATTEMPTS", "S3Store"]

#: Part size of write_stream's multipart uploads.
PART_SIZE = 8 * 1024 * 1024
#: S3's smallest part (all parts but the last) and largest.
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 ** 3
#: Connections a client keeps open for reuse: more than the requests a process sends at once
#: (its storage threads, CLIPMASK_S3_CONCURRENCY, 400 by default); opened only as they are needed.
MAX_CONNECTIONS = 1024
#: GETs read_bytes makes in all while an object's body stream is cut, and the first back-off.
STREAM_ATTEMPTS = 4
STREAM_BACKOFF_S = 0.2

# urllib3's own errors can escape botocore while a streamed body is read.
_BOTO_ERRORS = (boto_errors.ClientError, boto_errors.BotoCoreError, urllib3_errors.HTTPError)
_STREAM_ERRORS = (
    boto_errors.ResponseStreamingError,  # urllib3 ProtocolError: connection broken mid-body
    boto_errors.IncompleteReadError,  # fewer bytes than Content-Length
    boto_errors.ReadTimeoutError,
    urllib3_errors.HTTPError,
)


class S3Store(ObjectStore):
    """Objects stored under ``prefix`` in ``bucket``.

    ``max_attempts`` is botocore's standard-mode budget of attempts per
    request, the first included (1 = no retry);
    ``part_size`` the part size of write_stream's multipart uploads.
    """

    def __init__(self, bucket: str, prefix: str = "", *, max_attempts: int = 5,
                 part_size: int = PART_SIZE) -> None:
        """Raises ValueError if ``bucket`` is empty, ``prefix`` is invalid,
        max_attempts < 1 or ``part_size`` is outside S3's part sizes (5 MiB to 5 GiB)."""
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        if prefix:
            check_prefix(prefix)
        _check_limits(max_attempts, part_size)
        self.part_size = part_size
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
        """Return the object's content, GETting it again while its body stream is cut.

        Raises FileNotFoundError (missing key or bucket), PermissionError,
        ConnectionError (transient, also after STREAM_ATTEMPTS cut GETs) or
        StorageError.
        """
        url = self.url_for(key)
        try:
            return self._get_with_retries(self._prefix + key)
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, url) from err

    def _get_with_retries(self, full_key: str) -> bytes:
        """GET ``full_key``: STREAM_ATTEMPTS GETs at most, with back-off, while the body is cut.

        Raises the last GET's streaming error, or any other error at once
        (botocore has retried the request itself).
        """
        for attempt in range(STREAM_ATTEMPTS - 1):
            body = self._get_body(full_key)
            try:
                with body:
                    return body.read()
            except _STREAM_ERRORS:
                time.sleep(STREAM_BACKOFF_S * 2 ** attempt)
        with self._get_body(full_key) as body:
            return body.read()

    def _get_body(self, full_key: str) -> Any:
        """Send a GET for ``full_key`` and return its unread streaming body."""
        return self._s3().get_object(Bucket=self._bucket, Key=full_key)["Body"]

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace the object, with ``content_type`` if given.

        Raises TypeError if data is not bytes-like; FileNotFoundError (missing
        bucket), PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        body = check_data(data)
        try:
            self._s3().put_object(Bucket=self._bucket, Key=self._prefix + key, Body=body,
                                  **_content_type_args(content_type))
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, url) from err

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> int:
        """Create or replace the object from ``chunks``; return the bytes written.

        Memory stays within about two parts: chunks are gathered into parts of
        ``part_size`` bytes and sent as a multipart upload, or as one PUT when
        all of them fit in one part. On any exception the multipart upload is
        aborted (best effort): no new object appears and an old one is
        untouched. Raises
        TypeError for a chunk that is not bytes-like; FileNotFoundError
        (missing bucket), PermissionError, ConnectionError (transient) or
        StorageError; the iterable's own exceptions unchanged.
        """
        url = self.url_for(key)
        chunks = check_chunks(chunks)
        upload = _Upload(self._s3, self._bucket, self._prefix + key, _content_type_args(content_type))
        try:
            return upload.send(chunks, self.part_size)
        except BaseException as err:
            upload.abort()
            if isinstance(err, _BOTO_ERRORS):
                raise translate_s3_error(err, url) from err
            raise

    def delete(self, key: str) -> None:
        """Remove the object (S3 answers a missing key with success too).

        Raises FileNotFoundError (missing bucket), PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        try:
            self._s3().delete_object(Bucket=self._bucket, Key=self._prefix + key)
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

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        """Yield keys starting with ``prefix`` (and greater than ``start_after``), sorted, page by page.

        Keys ending in "/" (directory placeholders) are skipped. Raises
        ValueError for a bad prefix and TypeError for a non-str start_after
        (at call time); while iterating, FileNotFoundError for a missing
        bucket, PermissionError, ConnectionError (transient) or StorageError.
        """
        check_prefix(prefix)
        after = check_start_after(start_after)
        return self._iter_keys(self._prefix + prefix, self._prefix + after if after else "")

    def _iter_keys(self, full_prefix: str, full_start_after: str) -> Iterator[str]:
        """Yield keys (relative to the store root) of objects under ``full_prefix``."""
        start = len(self._prefix)
        try:
            for page in self._pages(full_prefix, full_start_after):
                for item in page.get("Contents", ()):
                    if not item["Key"].endswith("/"):
                        yield item["Key"][start:]
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, self.url + full_prefix[start:]) from err

    def _pages(self, full_prefix: str, full_start_after: str) -> Iterator[dict]:
        """Return list_objects_v2 result pages for ``full_prefix``, after ``full_start_after`` if set."""
        paginator = self._s3().get_paginator("list_objects_v2")
        after = {"StartAfter": full_start_after} if full_start_after else {}
        return iter(paginator.paginate(Bucket=self._bucket, Prefix=full_prefix, **after))

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
        return shared_client(self._max_attempts)

    def __getstate__(self) -> dict:
        """Pickle without the client and lock (recreated lazily after unpickling)."""
        state = self.__dict__.copy()
        state.update(_client=None, _client_pid=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


#: The process's S3 clients, most recently used last (``shared_client``).
_CLIENTS: OrderedDict[tuple, Any] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()
#: Clients kept for distinct settings (a long-lived process has one or two).
_CLIENTS_KEPT = 8


def shared_client(max_attempts: int) -> Any:
    """This process's boto3 S3 client for ``max_attempts`` and the current ``AWS_*`` environment
    (endpoint, credentials, region), made on first use and then shared by every store: a client is
    thread-safe, and making one costs 60-190 ms of CPU, with the GIL held (botocore loads and
    parses the service's model), which each chunk task and each offload request would otherwise
    pay for its stores."""
    key = (os.getpid(), max_attempts, tuple(sorted(item for item in os.environ.items() if item[0].startswith("AWS_"))))
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                # total_max_attempts counts the first request too; Config's "max_attempts" would not.
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                max_pool_connections=MAX_CONNECTIONS,
            )
            client = _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
            while len(_CLIENTS) > _CLIENTS_KEPT:
                _CLIENTS.popitem(last=False)
        _CLIENTS.move_to_end(key)
        return client


def _forget_clients_in_child() -> None:
    """After a fork: the parent's clients (their connections) and lock are not this process's."""
    global _CLIENTS_LOCK
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_in_child)


def _http_status(err: boto_errors.ClientError) -> int:
    """Return the HTTP status code of an S3 error response (0 if unknown)."""
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _check_limits(max_attempts: int, part_size: int) -> None:
    """Raise ValueError if max_attempts < 1 or part_size is outside S3's part sizes."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise ValueError(f"part_size must be from {MIN_PART_SIZE} (5 MiB) to {MAX_PART_SIZE} (5 GiB) "
                         f"bytes, got {part_size}")


def _content_type_args(content_type: str | None) -> dict[str, str]:
    """Return the ContentType argument of a PUT or multipart upload ({} for None)."""
    return {"ContentType": content_type} if content_type else {}


class _Upload:
    """One object written from chunks: a single PUT below one part, else a multipart upload.

    ``client`` returns the boto3 client. Methods raise botocore's errors
    untranslated (the store translates them).
    """

    def __init__(self, client: Callable[[], Any], bucket: str, key: str, extra: dict[str, str]) -> None:
        self._client, self._bucket, self._key, self._extra = client, bucket, key, extra
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def send(self, chunks: Iterator[bytes], part_size: int) -> int:
        """Upload all of ``chunks`` in parts of ``part_size``; return the bytes written."""
        buffer = bytearray()
        size = 0
        for chunk in chunks:
            buffer += chunk
            size += len(chunk)
            while len(buffer) > part_size:  # more follows this part: it is not the last
                self._upload_part(buffer[:part_size])
                del buffer[:part_size]
        self._finish(buffer)
        return size

    def _upload_part(self, data: bytearray) -> None:
        """Send ``data`` as the next part, starting the multipart upload on the first."""
        if self._upload_id is None:
            response = self._client().create_multipart_upload(Bucket=self._bucket, Key=self._key, **self._extra)
            self._upload_id = response["UploadId"]
        number = len(self._parts) + 1
        response = self._client().upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data)
        self._parts.append({"ETag": response["ETag"], "PartNumber": number})

    def _finish(self, data: bytearray) -> None:
        """Send the last ``data``: the whole object as one PUT, or the last part and complete."""
        if self._upload_id is None:
            self._client().put_object(Bucket=self._bucket, Key=self._key, Body=data, **self._extra)
            return
        self._upload_part(data)
        self._client().complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts})

    def abort(self) -> None:
        """Abort the multipart upload if one was started; errors are ignored (best effort)."""
        if self._upload_id is None:
            return
        try:
            self._client().abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        except Exception:  # noqa: BLE001 - best effort: the original error is what matters
            pass
