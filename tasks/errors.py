"""The job side's errors: one base class, ``JobError``, a ``ClipmaskError`` like the engine's
(``worker/errors.py``). Each says "Raised when..." and its message says what to do.

What the services clipmask talks to raise (Redis, the broker, storage, a malformed setting) is
turned into one of these at the edge by ``explain``, so that the CLI (and any other front end)
catches ``ClipmaskError`` alone and prints a message naming the fix; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from worker.errors import ClipmaskError

__all__ = [
    "ClipmaskError", "DestinationError", "IncompleteJobError", "JobError", "JobNotFoundError", "NoImagesError",
    "NothingNewError", "PlanningBusyError", "ServiceUnavailableError",
    "ShardFormatError", "SourceError", "StorageProblem", "UsageError", "explain",
]


class JobError(ClipmaskError):
    """Base class of the job side's errors. ``exit_code`` is what ``clipmask`` exits with: 2, a
    command or configuration to change; 1, a job that is not there."""

    exit_code = 2


class UsageError(JobError, ValueError):
    """Raised when an option or setting is out of range; the message names it and what it takes."""


class JobNotFoundError(JobError, LookupError):
    """Raised when a job id is unknown to Redis (mistyped, expired, or Redis lost it)."""

    exit_code = 1


class NoImagesError(JobError, LookupError):
    """Raised when a source holds no image files (by extension) to mask."""


class NothingNewError(JobError, LookupError):
    """Raised by a submit that skips existing outputs when every image under the source already
    has a record newer than it: no job is created. ``up_to_date`` counts those images."""

    exit_code = 0

    def __init__(self, message: str, up_to_date: int = 0):
        super().__init__(message)
        self.up_to_date = up_to_date


class SourceError(JobError, FileNotFoundError):
    """Raised when SRC is missing, or a file where a folder of images was expected."""


class DestinationError(JobError, PermissionError):
    """Raised when DST does not take a write (a probe under ``DST/_jobs/``)."""


class ShardFormatError(JobError, ValueError):
    """Raised when a WebDataset shard is not a whole tar (cut off, or a header that cannot be
    read), or a Parquet shard not whole Parquet (cut off, a row group that cannot be decoded, no
    image column). ``offset`` is the byte where it went wrong; the message names it, so that the
    shard can be written again from its source."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


class PlanningBusyError(JobError, RuntimeError):
    """Raised by ``clipmask resume`` while the job's planner is still alive."""


class IncompleteJobError(JobError, RuntimeError):
    """Raised when a chunk has no result file yet, so the manifest cannot be written."""


class ServiceUnavailableError(JobError, ConnectionError):
    """Raised when Redis or the broker does not answer; the message names the variable to check."""


class StorageProblem(JobError, OSError):
    """Raised when storage refuses or fails a request after its retries (a missing object, no
    permission, an outage), or a storage URL is malformed."""


def explain(err: BaseException) -> ClipmaskError | None:
    """``err`` as a ``ClipmaskError`` whose message says what to do, or None when it is none of
    the failures a user can fix (a bug: let it raise)."""
    from kombu.exceptions import OperationalError
    from redis import RedisError

    from tasks.redact import redact_url
    from tasks.settings import redis_url

    if isinstance(err, ClipmaskError):
        return err
    if isinstance(err, RedisError):
        return ServiceUnavailableError(
            f"cannot reach Redis at {redact_url(redis_url())} ({err}); check CLIPMASK_REDIS_URL (else "
            "CELERY_RESULT_BACKEND, then CELERY_BROKER_URL) and that redis-server is running")
    if isinstance(err, OperationalError):
        from worker.celery_app import app

        return ServiceUnavailableError(
            f"cannot reach the broker at {redact_url(str(app.conf.broker_url))} ({err}); check CELERY_BROKER_URL "
            "and that the broker (redis-server or rabbitmq-server) is running")
    if isinstance(err, OSError):
        return StorageProblem(str(err))
    if isinstance(err, (ValueError, LookupError)):  # a malformed URL or setting, an unknown name: said
        return UsageError(str(err))
    return None
