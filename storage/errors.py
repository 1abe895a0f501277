"""Exceptions of the storage layer and translation of the S3 clients' errors (botocore's and
obstore's).

Backends raise Python's own exceptions so callers need not know their clients:

- missing key or bucket           -> FileNotFoundError
- access denied, bad credentials  -> PermissionError
- network trouble, throttling, 5xx -> ConnectionError (transient: retry it), including a
  response body cut off mid-stream (botocore's ResponseStreamingError,
  IncompleteReadError, ReadTimeoutError, or urllib3's ProtocolError and
  other urllib3 HTTPErrors that escape botocore)
- anything else                   -> StorageError (an OSError)

obstore gives the HTTP status only in its message ("... status code: 503 Service Unavailable"),
and a connection, timeout or cut body as an "HTTP error": both are read from the message.

The original exception is always kept as ``__cause__``.
"""

from __future__ import annotations

import errno
import re

from botocore import exceptions as boto_errors
from obstore import exceptions as obstore_errors
from urllib3 import exceptions as urllib3_errors

__all__ = ["OBSTORE_ERRORS", "StorageError", "is_transient", "translate_obstore_error", "translate_s3_error"]

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


#: The HTTP status in an obstore error message, and the mark of a request that got no answer.
_OBSTORE_STATUS = re.compile(r"status code: (\d{3})")
_OBSTORE_NO_ANSWER = "HTTP error"
#: What obstore raises: its own errors, and Python's for a missing object or a denied request.
OBSTORE_ERRORS = (obstore_errors.BaseError, FileNotFoundError, PermissionError)


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


def translate_obstore_error(err: Exception, url: str) -> OSError:
    """Return the Python exception that stands for obstore error ``err`` on ``url`` (raise it
    ``from err``); its message is obstore's first paragraph, without the debug dump."""
    message = _obstore_message(str(err))
    match = _OBSTORE_STATUS.search(message)
    status = int(match.group(1)) if match else 0
    if isinstance(err, (FileNotFoundError, obstore_errors.NotFoundError)) or status == 404:
        return FileNotFoundError(errno.ENOENT, message, url)
    denied = (PermissionError, obstore_errors.PermissionDeniedError, obstore_errors.UnauthenticatedError)
    if isinstance(err, denied) or status in (401, 403):
        return PermissionError(errno.EACCES, message, url)
    if status == 429 or status >= 500 or (not status and _OBSTORE_NO_ANSWER in message):
        return ConnectionError(f"{url}: {message}")
    return StorageError(f"{url}: {message}")


def _obstore_message(text: str) -> str:
    """obstore's message without its debug dump, and S3's XML error body as "(Code: Message)"."""
    message, _, body = text.split("\n\nDebug source:")[0].partition(": <?xml")
    code, detail = _xml_field("Code", body), _xml_field("Message", body)
    return f"{message.strip()} ({code}: {detail})" if code else message.strip()


def _xml_field(name: str, xml: str) -> str:
    match = re.search(f"<{name}>(.*?)</{name}>", xml, re.DOTALL)
    return match.group(1).strip() if match else ""
