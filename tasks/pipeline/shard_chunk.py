"""A job's chunk over a WebDataset shard: ``mask_shard``, with the storage errors that ended the
shard kept, so that the chunk's task can tell an outage (the chunk runs again later) from a shard
that is not a whole tar (its samples fail, for good).

``mask_shard`` never raises: a shard that fails is in its result, with the reason and byte
offset as text. The stores it is given here are the job's own, watched: every error their
streams raise (the input's GET, read as it arrives; the output's upload) is noted on the way
through, and the caller judges those.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from storage import ObjectStore
from tasks.pipeline.shards import ShardResult, mask_shard
from worker.engine import MaskEngine
from worker.spec import MaskSpec

__all__ = ["mask_shard_chunk"]


def mask_shard_chunk(engine: MaskEngine, spec: MaskSpec, source: ObjectStore, key: str, dest: ObjectStore,
                     context: str = "", image_column: str | None = None,
                     deadline: float | None = None) -> tuple[ShardResult, list[BaseException]]:
    """Mask the shard ``key`` of ``source`` into the shard of the same key in ``dest`` (a Parquet
    shard's images from ``image_column``; failed, unwritten, past ``deadline``: the task's soft
    time limit); returns its result and, when the shard failed, the errors that storage raised
    meanwhile (in order)."""
    watched_source, watched_dest = _Watched(source), _Watched(dest)
    result = mask_shard(engine, spec, watched_source, key, watched_dest, context=context,  # type: ignore[arg-type]
                        image_column=image_column, deadline=deadline)
    return result, (watched_source.errors + watched_dest.errors if result.error is not None else [])


class _Watched:
    """``store`` as it is, but for noting every error that its ``read_stream`` (the stream's
    reads included) and ``write_stream`` raise, in ``errors``."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self.errors: list[BaseException] = []

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def read_stream(self, key: str) -> BinaryIO:
        try:
            return _WatchedStream(self._store.read_stream(key), self.errors)  # type: ignore[return-value]
        except Exception as err:
            self.errors.append(err)
            raise

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> int:
        try:
            return self._store.write_stream(key, chunks, content_type)
        except Exception as err:
            self.errors.append(err)
            raise


class _WatchedStream:
    """A stream whose read errors are noted in ``errors`` before they go on."""

    def __init__(self, stream: BinaryIO, errors: list[BaseException]) -> None:
        self._stream, self._errors = stream, errors

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def __enter__(self) -> "_WatchedStream":
        self._stream.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stream.__exit__(*exc)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except Exception as err:
            self._errors.append(err)
            raise

    def readinto(self, buffer) -> int:
        try:
            return self._stream.readinto(buffer)
        except Exception as err:
            self._errors.append(err)
            raise
