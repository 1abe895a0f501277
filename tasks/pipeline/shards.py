"""Masking one shard (WebDataset tar or Parquet) into one output shard (either format, by the
extension of its key): a shard source's unit of work, whole in itself, so that ``clipmask run``
calls it shard after shard and a task can call it for one.

The shard is read as one stream (``ObjectStore.read_stream``) and its samples are fed to the
``Pipeline`` as they are read, through two small stores in memory: ``_Members`` holds each
sample's image bytes from when the reader gives them until the pipeline reads them (so memory holds
what the pipeline's window holds, not the shard), and ``_Collected`` holds each sample's outputs
from when the pipeline writes them until the sample's outcome comes, in input order, and the
sample is appended to the output shard. The output shard is written as one stream
(``ObjectStore.write_stream``: a multipart upload on S3, a temporary file renamed on a local disk)
and appears only once whole: a shard that fails leaves no output shard (an old one stays).

A sample whose image fails (corrupt, or none in the sample) fails alone and is left out of the
output shard. A sample its shard says holds no image (``Sample.left_out``: a Parquet row
img2dataset could not fetch) is not masked: it is ``skipped``, with that reason, in its place.
A shard that cannot be read whole (cut off, a corrupt header, storage failing) fails as a whole:
the samples read before the fault fail with its reason and byte offset, or, if none was, one
outcome without a key says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from storage import ObjectStore
from tasks.errors import ShardFormatError
from tasks.pipeline.stream import Outcome, Pipeline
from tasks.shards.formats import OUTPUT_MEMBERS, content_type, open_reader, open_writer
from tasks.shards.tar import IMAGE_EXTENSIONS
from worker.engine import MaskEngine
from worker.spec import MaskSpec

__all__ = ["TIME_LIMIT", "ShardResult", "mask_shard"]

#: How the reason of a shard that passed its deadline begins.
TIME_LIMIT = "time limit reached"

log = logging.getLogger(__name__)

@dataclass
class ShardResult:
    """What became of one shard: ``outcomes`` one per sample in shard order (``key`` the sample
    key; one without a key when the shard failed before its first sample), ``output`` the output
    shard's URL once written, ``error`` the shard's own failure."""

    shard: str
    output: str | None = None
    error: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def rows(self) -> Iterator[dict]:
        """The manifest rows: each outcome's, with ``shard`` and ``key``."""
        for outcome in self.outcomes:
            yield {**outcome.row(), "shard": self.shard, "key": outcome.key}


def mask_shard(engine: MaskEngine, spec: MaskSpec, source: ObjectStore, key: str, dest: ObjectStore,
               out_key: str | None = None, context: str = "", *, image_column: str | None = None,
               deadline: float | None = None) -> ShardResult:
    """Mask the shard ``key`` of ``source`` into the shard ``out_key`` (default: the same key)
    of ``dest``, each in the format its extension says (``.parquet``, else a tar);
    ``image_column`` names a Parquet shard's image column (default ``jpg``, else ``image``).
    ``deadline`` (a ``time.monotonic()`` value: a task's soft time limit) fails the shard, unwritten,
    at the first sample that ends past it. Never raises for the shard's content or for storage:
    a failure is in the result."""
    out_key = out_key or key
    result = ShardResult(source.url_for(key))
    members, collected = _Members(result.shard), _Collected(dest.url_for(out_key))
    pipeline = Pipeline(engine, members, collected, spec, False, context)
    feed = _Feed(source, key, members, image_column)
    writer = open_writer(out_key, spec.outputs, time.time())
    try:
        dest.write_stream(out_key, _shard_chunks(pipeline.run(feed.keys()), collected, feed, result, writer,
                                                 deadline), content_type(out_key))
        result.output = dest.url_for(out_key)
    except Exception as err:  # noqa: BLE001 - whatever it is, it fails this shard alone
        _shard_failed(result, str(err) if isinstance(err, _ShardUnreadable) else feed.error or _reason(err))
    return result


def _shard_chunks(outcomes: Iterator[Outcome], collected: "_Collected", feed: "_Feed", result: ShardResult,
                  writer, deadline: float | None) -> Iterator[bytes]:
    """The output shard's bytes, sample by sample in input order; raises at the end, before the
    end of the shard (a tar's end-of-archive blocks, a Parquet footer), when the input shard could
    not be read whole, and at the first sample past ``deadline`` (so it is not written)."""
    for outcome in outcomes:
        if deadline is not None and time.monotonic() > deadline:
            raise _ShardUnreadable(f"{TIME_LIMIT}, after {len(result.outcomes)} of its samples: a shard must be "
                                   "masked within one task's time limit (CLIPMASK_TASK_TIME_LIMIT); raise it, "
                                   "or write smaller shards")
        blobs = collected.take(outcome.key)
        if outcome.status == "succeeded":
            writer.add(outcome.key, blobs)
        result.outcomes.extend(feed.left_out_before(outcome.key))
        result.outcomes.append(outcome)
        if chunk := writer.take():
            yield chunk
    result.outcomes.extend(feed.left_out_before(None))
    if feed.error:
        raise _ShardUnreadable(feed.error)
    yield writer.close()


class _ShardUnreadable(Exception):
    """The input shard could not be read whole, or not in time: its output is not written."""


def _shard_failed(result: ShardResult, reason: str) -> None:
    """Every sample of a shard that was not written fails with the shard's ``reason``."""
    result.error = reason
    log.warning("shard %s failed: %s", result.shard, reason)
    if not result.outcomes:
        result.outcomes.append(Outcome(None, result.shard, "failed", error=reason))
        return
    for outcome in result.outcomes:
        if outcome.status == "skipped":  # never to be masked: the shard's fault changes nothing
            continue
        if outcome.status == "succeeded":
            outcome.outputs, outcome.metadata = None, None
        outcome.status, outcome.error = "failed", outcome.error or f"shard not written: {reason}"


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class _Feed:
    """The sample keys of one input shard, read from its stream as the pipeline asks for them;
    each sample's image put into ``members`` first. A fault ends the keys and is kept in
    ``error`` (with the byte offset) rather than raised through the pipeline, so that the
    samples already in flight finish. A sample left out (``Sample.left_out``) is not given to the
    pipeline: its ``skipped`` outcome waits until the outcome of the next sample given comes
    (``left_out_before``), so that the outcomes stay in shard order."""

    def __init__(self, source: ObjectStore, key: str, members: "_Members", image_column: str | None) -> None:
        self._source, self._key, self._members = source, key, members
        self._image_column = image_column
        self.error: str | None = None
        self._left_out: list[Outcome] = []  # since the last sample given
        self._before: dict[str | None, list[Outcome]] = {}  # by the key of the sample given next

    def left_out_before(self, key: str | None) -> list[Outcome]:
        """The skipped outcomes of the samples left out just before the sample ``key`` (None: after
        the last sample given; only once the keys are all read)."""
        if key is None:
            left, self._left_out = self._left_out, []
            return left
        return self._before.pop(key, [])

    def keys(self) -> Iterator[str]:
        reader = None
        seen: set[str] = set()
        try:
            with self._source.read_stream(self._key) as stream:
                reader = open_reader(self._key, stream, self._image_column)
                for sample in reader.samples():
                    if sample.key in seen:
                        log.warning("shard %s: sample %s appears twice; the second is left out",
                                    self._source.url_for(self._key), sample.key)
                        continue
                    seen.add(sample.key)
                    if sample.left_out:
                        self._left_out.append(Outcome(sample.key, self._members.url_for(sample.key), "skipped",
                                                      error=sample.left_out))
                        continue
                    if self._left_out:
                        self._before[sample.key], self._left_out = self._left_out, []
                    self._members.put(sample)
                    yield sample.key
        except ShardFormatError as err:
            self.error = _reason(err)
        except Exception as err:  # noqa: BLE001 - storage failing mid-shard: the shard fails
            where = f" at byte {reader.offset}" if reader is not None else ""
            self.error = f"{_reason(err)}{where}"


class _Members(ObjectStore):
    """The images of the samples being masked, by sample key, handed over once: a source for
    the ``Pipeline`` whose objects are already read. ``url_for`` is ``SHARD#KEY``."""

    networked = False  # already in memory: the pipeline reads two batches ahead, no more

    def __init__(self, shard_url: str) -> None:
        self._shard_url = shard_url
        self._held: dict[str, bytes | Exception] = {}
        self._lock = threading.Lock()

    def put(self, sample) -> None:
        if sample.image is None and sample.problem:
            held = LookupError(f"sample {sample.key}: {sample.problem}")
        elif sample.image is None:
            found = ", ".join(sample.members) or "none"
            held = LookupError(f"sample {sample.key} has no image member ({', '.join(IMAGE_EXTENSIONS)}); "
                               f"its members: {found}")
        else:
            held = sample.data
        with self._lock:
            self._held[sample.key] = held

    def read_object(self, key: str) -> tuple[bytes, str | None]:
        with self._lock:
            held = self._held.pop(key)
        if isinstance(held, Exception):
            raise held
        return held, None

    def read_bytes(self, key: str) -> bytes:
        return self.read_object(key)[0]

    @property
    def url(self) -> str:
        return self._shard_url

    def url_for(self, key: str) -> str:
        return f"{self._shard_url}#{key}"

    def write_bytes(self, key, data, content_type=None):
        raise PermissionError(f"{self._shard_url} is read only")

    def write_stream(self, key, chunks, content_type=None):
        raise PermissionError(f"{self._shard_url} is read only")

    def delete(self, key):
        raise PermissionError(f"{self._shard_url} is read only")

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._held

    def list(self, prefix="", start_after=None):
        return iter(())

    def list_entries(self, prefix="", start_after=None):
        return iter(())


class _Collected(ObjectStore):
    """The outputs the ``Pipeline`` writes, by sample key and role, until the sample is appended
    to the output shard (``take``). ``url_for`` is ``OUTPUT_SHARD#MEMBER``."""

    networked = False  # a write is a dict entry

    def __init__(self, shard_url: str) -> None:
        self._shard_url = shard_url
        self._held: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        for role, suffix in OUTPUT_MEMBERS:
            if key.endswith(suffix):
                with self._lock:
                    self._held.setdefault(key[:-len(suffix)], {})[role] = bytes(data)
                return
        raise ValueError(f"{key} is not a sample output ({', '.join(s for _, s in OUTPUT_MEMBERS)})")

    def take(self, sample_key: str | None) -> dict[str, bytes]:
        with self._lock:
            return self._held.pop(sample_key, {})

    @property
    def url(self) -> str:
        return self._shard_url

    def url_for(self, key: str) -> str:
        return f"{self._shard_url}#{key}"

    def read_bytes(self, key):
        raise FileNotFoundError(key)

    def write_stream(self, key, chunks, content_type=None):
        raise PermissionError(f"{self._shard_url} takes sample outputs only")

    def delete(self, key):
        pass

    def exists(self, key: str) -> bool:
        return False

    def list(self, prefix="", start_after=None):
        return iter(())

    def list_entries(self, prefix="", start_after=None):
        return iter(())
