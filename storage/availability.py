"""Whether a failure says the store is away for now, not that the object asked for is at fault.

An S3 outage shows as ``ConnectionError`` (refused, cut, timed out, 5xx after the client's
retries: ``is_transient``) or as requests that never answer. A local folder answers at once, so it
says it is away through its filesystem's error numbers instead: the disk or the quota is full, the
filesystem went read-only (as ext4 does after an I/O error), or the device or network share under
it is gone. None of those is the image's fault, and each lasts until someone frees space or mounts
the share again, so the work is retried later rather than recorded failed. A file that is missing,
denied or not a regular file is the key's own business (``FileNotFoundError``, ``PermissionError``,
``IsADirectoryError``) and is not in this list.

``StorageUnavailableError`` is raised by the callers that know more than one request can: a folder
that held a job's files no longer does (an unmounted share leaves its empty mount point behind).
"""

from __future__ import annotations

import errno

__all__ = ["UNAVAILABLE_ERRNOS", "StorageUnavailableError", "check_marker", "is_unavailable", "missing_marker"]

#: Error numbers of a filesystem that is away for now: full (ENOSPC, EDQUOT), read-only (EROFS),
#: its disk failing or gone (EIO, ENODEV, ENOMEDIUM), or its network share gone (ESTALE, ENOTCONN,
#: EHOSTDOWN, EHOSTUNREACH, ENETDOWN, ENETUNREACH, ECOMM, EREMOTEIO). Errors that Python already
#: raises as ``ConnectionError`` or ``TimeoutError`` (ECONNREFUSED, ETIMEDOUT, ...) are transient
#: anyway.
UNAVAILABLE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "EIO", "ENODEV", "ENOMEDIUM", "ESTALE", "ENOTCONN", "EHOSTDOWN",
    "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ECOMM", "EREMOTEIO") if hasattr(errno, name))


class StorageUnavailableError(ConnectionError):
    """Raised when a store is away for now as a whole (its folder gone, or not the one it was),
    rather than one object failing: retry the work later."""


def is_unavailable(err: BaseException) -> bool:
    """True if ``err`` says the store is away for now (a full or read-only disk, a share gone),
    not that the object asked for is at fault."""
    return isinstance(err, StorageUnavailableError) or (isinstance(err, OSError) and err.errno in UNAVAILABLE_ERRNOS)


def missing_marker(store, key: str) -> str:
    """Why ``store`` is away when ``key``, a file the work wrote there first (a job's ``job.json``),
    is gone: the folder is no longer the one the work started in."""
    return (f"{store.url_for(key)} is missing: the job's files are gone from {store.url}, not the folder "
            "the job started in (a share unmounted?); nothing is written there until it is back")


def check_marker(store, key: str) -> None:
    """Raise ``StorageUnavailableError`` (``missing_marker``) unless ``key`` exists in ``store``."""
    if not store.exists(key):
        raise StorageUnavailableError(missing_marker(store, key))
