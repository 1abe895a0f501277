"""ObjectStore on an S3 bucket (or any S3-compatible service).

Endpoint, credentials and region come only from boto3's own configuration
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION,
config files, ...). Single objects are read, written and checked with
obstore, which costs about a tenth of boto3's CPU per request and waits with the
GIL released; listing, deleting and multipart uploads go through boto3. Both clients are
made lazily, once per process for the same settings and environment, and
shared by every store (``storage.s3_clients``); they are thread-safe, so stores
may be shared by many threads.

Retries happen in layers, each failure in exactly one of them:

1. The client retries every request, ``max_attempts`` attempts in all (default
   5, exponential back-off with jitter): throttling (503 SlowDown, 429), other
   5xx, connection errors and timeouts, and a response cut off mid-body (for
   GETs too: obstore reads the body again).
2. Callers above storage never retry one storage call again: a
   ConnectionError means this budget is spent. They may retry a whole
   unit of work later.

``read_stream`` reads one GET as its body arrives, in pieces of about ``STREAM_CHUNK_SIZE``
(1 MiB): an object of any size in flat memory. A body cut off while it is read this way is read
on by the client from where it was cut (a ranged GET, within the same ``max_attempts``); past
them, the read raises ConnectionError.

``write_stream`` uploads in parts of ``part_size`` (PART_SIZE, 8 MiB) with a
multipart upload, or one PUT for less than a part; S3 allows 10,000 parts,
so with 8 MiB parts an object of up to about 78 GiB. If the response to the
final CompleteMultipartUpload is lost, botocore's retry of it can fail (the
upload is already gone) although the object was written: the caller sees an
error, and retrying its unit of work writes the same object again.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import obstore
from botocore import exceptions as boto_errors
from urllib3 import exceptions as urllib3_errors

from storage.base import Listed, ObjectStore, check_chunks, check_data, check_key, check_prefix, check_start_after
from storage.errors import OBSTORE_ERRORS, translate_obstore_error, translate_s3_error
from storage.listing import LIST_CONCURRENCY, Page, list_page, parallel_keys, sequential_keys
from storage.s3_clients import shared_client, shared_data_store

__all__ = ["MIN_PART_SIZE", "PART_SIZE", "STREAM_CHUNK_SIZE", "S3Store"]

#: Part size of write_stream's multipart uploads.
PART_SIZE = 8 * 1024 * 1024
#: S3's smallest part (all parts but the last) and largest.
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 ** 3
#: Bytes of a streamed GET's body gathered before ``read_stream`` hands them on (obstore's default,
#: 10 MB, would hold ten times as much per open stream).
STREAM_CHUNK_SIZE = 1024 * 1024

# urllib3's own errors can escape botocore while a streamed body is read.
_BOTO_ERRORS = (boto_errors.ClientError, boto_errors.BotoCoreError, urllib3_errors.HTTPError)


class S3Store(ObjectStore):
    """Objects stored under ``prefix`` in ``bucket``.

    ``max_attempts`` is the clients' budget of attempts per request, the
    first included (1 = no retry);
    ``part_size`` the part size of write_stream's multipart uploads;
    ``list_concurrency`` the listing requests ``list`` keeps in flight at most
    (``storage/listing.py``; 1 lists one page after another).
    """

    def __init__(self, bucket: str, prefix: str = "", *, max_attempts: int = 5,
                 part_size: int = PART_SIZE, list_concurrency: int = LIST_CONCURRENCY) -> None:
        """Raises ValueError if ``bucket`` is empty, ``prefix`` is invalid,
        max_attempts < 1, ``part_size`` is outside S3's part sizes (5 MiB to 5 GiB)
        or list_concurrency < 1."""
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        if prefix:
            check_prefix(prefix)
        _check_limits(max_attempts, part_size)
        if list_concurrency < 1:
            raise ValueError(f"list_concurrency must be at least 1, got {list_concurrency}")
        self.part_size = part_size
        self.list_concurrency = list_concurrency
        self._bucket = bucket
        self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        # (pid, client) of the process that made them: a forked child makes its own.
        self._client: tuple[int, Any] | None = None
        self._data_store: tuple[int, Any] | None = None

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}"

    def url_for(self, key: str) -> str:
        """Return "s3://bucket/prefix/key"; ValueError for an invalid key."""
        return self.url + check_key(key)

    def read_bytes(self, key: str) -> bytes:
        """Return the object's content (its GET is sent again while the body is cut off).

        Raises FileNotFoundError (missing key or bucket), PermissionError,
        ConnectionError (transient) or StorageError.
        """
        return self.read_object(key)[0]

    def read_object(self, key: str) -> tuple[bytes, str | None]:
        """The object's content and ETag, from one GET; raises as ``read_bytes``."""
        url = self.url_for(key)
        store = self._data(url)
        try:
            result = obstore.get(store, self._prefix + key)
            return bytes(result.bytes()), result.meta.get("e_tag")
        except OBSTORE_ERRORS as err:
            raise translate_obstore_error(err, url) from err

    def read_stream(self, key: str) -> BinaryIO:
        """The object's content as a buffered file-like object, read from one GET as its body
        arrives (about ``STREAM_CHUNK_SIZE`` held at a time). Raises as ``read_bytes`` at call time;
        while reading, ConnectionError for a body cut off more often than the client retries
        (see the module's doc), StorageError."""
        url = self.url_for(key)
        store = self._data(url)
        try:
            result = obstore.get(store, self._prefix + key)
        except OBSTORE_ERRORS as err:
            raise translate_obstore_error(err, url) from err
        return io.BufferedReader(_Body(result.stream(min_chunk_size=STREAM_CHUNK_SIZE), url))

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace the object, with ``content_type`` if given.

        Raises TypeError if data is not bytes-like; FileNotFoundError (missing
        bucket), PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        body = check_data(data)
        attributes = {"Content-Type": content_type} if content_type else None
        store = self._data(url)
        try:
            obstore.put(store, self._prefix + key, body, attributes=attributes, use_multipart=False)
        except OBSTORE_ERRORS as err:
            raise translate_obstore_error(err, url) from err

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
        try:  # boto3's: obstore deletes with DeleteObjects, which not every S3-compatible service has
            self._s3().delete_object(Bucket=self._bucket, Key=self._prefix + key)
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, url) from err

    def exists(self, key: str) -> bool:
        """Return True if the object exists (False also for a missing bucket).

        Raises PermissionError, ConnectionError (transient) or StorageError.
        """
        url = self.url_for(key)
        store = self._data(url)
        try:
            obstore.head(store, self._prefix + key)
        except OBSTORE_ERRORS as err:
            error = translate_obstore_error(err, url)
            if isinstance(error, FileNotFoundError):
                return False
            raise error from err
        return True

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        """Yield keys starting with ``prefix`` (and greater than ``start_after``), in S3's order.

        Where the prefix has sub-prefixes they are listed side by side, up to
        ``list_concurrency`` requests in flight, and merged back into key order
        (``storage/listing.py``); else page by page. Keys ending in "/" (directory
        placeholders) are skipped. Raises ValueError for a bad prefix and TypeError
        for a non-str start_after (at call time); while iterating, FileNotFoundError
        for a missing bucket, PermissionError, ConnectionError (transient) or
        StorageError, after the keys that come before the page that failed.
        """
        check_prefix(prefix)
        after = check_start_after(start_after)
        return self._iter_keys(self._prefix + prefix, self._prefix + after if after else "")

    def list_entries(self, prefix: str = "", start_after: str | None = None) -> Iterator[Listed]:
        """``list``, each key with the Size, LastModified and ETag of its listing's answer."""
        check_prefix(prefix)
        after = check_start_after(start_after)
        return self._iter_keys(self._prefix + prefix, self._prefix + after if after else "", detailed=True)

    def _iter_keys(self, full_prefix: str, full_start_after: str, detailed: bool = False) -> Iterator[str]:
        """Yield keys (relative to the store root) of objects under ``full_prefix``."""
        start = len(self._prefix)
        fetch = self._list_detailed if detailed else self._list_page
        if self.list_concurrency == 1:
            keys = sequential_keys(fetch, full_prefix, full_start_after)
        else:
            keys = parallel_keys(fetch, full_prefix, full_start_after, self.list_concurrency)
        try:
            if detailed:
                for key in keys:
                    yield key.moved(key[start:])
            else:
                for key in keys:
                    yield key[start:]
        except _BOTO_ERRORS as err:
            raise translate_s3_error(err, self.url + full_prefix[start:]) from err
        finally:
            keys.close()

    def _list_page(self, full_prefix: str, full_start_after: str, token: str | None, delimited: bool) -> Page:
        """One ListObjectsV2 page of ``full_prefix`` (boto3's errors untranslated)."""
        return list_page(self._s3(), self._bucket, full_prefix, full_start_after, token, delimited)

    def _list_detailed(self, full_prefix: str, full_start_after: str, token: str | None, delimited: bool) -> Page:
        """``_list_page``, its keys ``Listed``."""
        return list_page(self._s3(), self._bucket, full_prefix, full_start_after, token, delimited, detailed=True)

    def _s3(self) -> Any:
        """Return this process's boto3 S3 client, creating it on first use."""
        return self._per_process("_client", lambda: shared_client(self._max_attempts))

    def _data(self, url: str) -> Any:
        """This process's obstore store of the bucket (made on first use, then shared); a missing
        credential is a PermissionError naming ``url``."""
        try:
            return self._per_process("_data_store", lambda: shared_data_store(self._bucket, self._max_attempts))
        except PermissionError as err:
            raise PermissionError(errno.EACCES, str(err), url) from err

    def _per_process(self, attribute: str, make: Callable[[], Any]) -> Any:
        """The client this store holds in ``attribute`` for this process, from ``make()`` on first use
        (a store keeps its clients when the ``AWS_*`` environment changes; a store opened after
        gets the clients of the new one)."""
        pid = os.getpid()
        held = getattr(self, attribute)
        if held is None or held[0] != pid:
            with self._lock:
                held = getattr(self, attribute)
                if held is None or held[0] != pid:
                    held = (pid, make())
                    setattr(self, attribute, held)
        return held[1]

    def __getstate__(self) -> dict:
        """Pickle without the client and lock (recreated lazily after unpickling)."""
        state = self.__dict__.copy()
        state.update(_client=None, _data_store=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


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


class _Body(io.RawIOBase):
    """A GET's body as a raw stream: obstore's chunks handed over as they arrive, its errors
    translated (``url`` names the object in them)."""

    def __init__(self, chunks: Iterator[Any], url: str) -> None:
        super().__init__()
        self._chunks, self._url = chunks, url
        self._chunk, self._at = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Copy the next bytes into ``buffer``; 0 at the end of the body."""
        if self._at >= len(self._chunk) and not self._next_chunk():
            return 0
        size = min(len(buffer), len(self._chunk) - self._at)
        buffer[:size] = self._chunk[self._at:self._at + size]
        self._at += size
        return size

    def _next_chunk(self) -> bool:
        try:
            self._chunk, self._at = memoryview(next(self._chunks)), 0
        except StopIteration:
            return False
        except OBSTORE_ERRORS as err:
            raise translate_obstore_error(err, self._url) from err
        return True

    def close(self) -> None:
        self._chunks, self._chunk = iter(()), memoryview(b"")  # the connection goes with the stream
        super().close()


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
