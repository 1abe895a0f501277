"""Exceptions of the storage layer and translation of botocore errors.

Backends raise Python's own exceptions so callers need not know boto:

- missing key or bucket           -> FileNotFoundError
- access denied, bad credentials  -> PermissionError
- network trouble, throttling, 5xx -> ConnectionError (transient: retry it), including a
  response body cut off mid-stream (botocore's ResponseStreamingError,
  IncompleteReadError, ReadTimeoutError, or urllib3's ProtocolError and
  other urllib3 HTTPErrors that escape botocore)
- anything else from botocore     -> StorageError (an OSError)

The original exception is always kept as ``__cause__``.
"""

from __future__ import annotations

import errno

from botocore import exceptions as boto_errors
from urllib3 import exceptions as urllib3_errors

__all__ = ["StorageError", "is_transient", "translate_s3_error"]

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset({
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "ExpiredToken", "InvalidToken",
})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "500", "502", "503", "504",
})
_TRANSIENT_BOTO_ERRORS = (
    boto_errors.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
    boto_errors.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ...
    boto_errors.ResponseStreamingError,  # a body read cut off (an HTTPClientError too)
    boto_errors.IncompleteReadError,
    urllib3_errors.HTTPError,  # ProtocolError ("Connection broken"), urllib3's ReadTimeoutError, ...
)


class StorageError(OSError):
    """A storage failure that is neither 'not found', 'denied' nor transient."""


def is_transient(exc: BaseException) -> bool:
    """Return True if ``exc`` is worth retrying (ConnectionError/TimeoutError)."""
    return isinstance(exc, (ConnectionError, TimeoutError))


def translate_s3_error(err: Exception, url: str) -> OSError:
    """Return the Python exception that stands for botocore (or urllib3) error ``err`` on ``url``.

    The caller raises it with ``raise translate_s3_error(err, url) from err``.
    Raises nothing itself.
    """
    if isinstance(err, boto_errors.ClientError):
        return _from_client_error(err, url)
    if isinstance(err, _TRANSIENT_BOTO_ERRORS):
        return ConnectionError(f"{url}: {err}")
    if isinstance(err, boto_errors.NoCredentialsError):
        return PermissionError(errno.EACCES, f"no AWS credentials found ({err})", url)
    return StorageError(f"{url}: {err}")


def _from_client_error(err: boto_errors.ClientError, url: str) -> OSError:
    """Map an S3 error response (code and HTTP status) to a Python exception."""
    code, status, message = _error_details(err)
    detail = f"{code}: {message}" if message else code
    if code in _NOT_FOUND_CODES or status == 404:
        return FileNotFoundError(errno.ENOENT, detail, url)
    if code in _DENIED_CODES or status == 403:
        return PermissionError(errno.EACCES, detail, url)
    if code in _TRANSIENT_CODES or status == 429 or status >= 500:
        return ConnectionError(f"{url}: {detail}")
    return StorageError(f"{url}: {detail}")


def _error_details(err: boto_errors.ClientError) -> tuple[str, int, str]:
    """Return (error code, HTTP status, message) from a ClientError response."""
    error = err.response.get("Error", {})
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0), str(error.get("Message", ""))
