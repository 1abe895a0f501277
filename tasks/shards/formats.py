"""A shard's format, told by its key's extension: ``.parquet`` is Parquet, anything else a
WebDataset tar. Readers of both give the same ``Sample``s; writers of both take a sample's
outputs by role and hand over their bytes as they are ready (``add``, ``take``, ``close``)."""

from __future__ import annotations

from typing import BinaryIO

from storage.layout import MASK_SUFFIX, METADATA_SUFFIX, RAW_SUFFIX
from tasks.shards.names import PARQUET_SUFFIX, SHARD_SUFFIX
from tasks.shards.parquet import ParquetReader, ParquetShardWriter
from tasks.shards.tar import ShardReader, ShardWriter

__all__ = ["FORMATS", "OUTPUT_MEMBERS", "content_type", "open_reader", "open_writer", "output_key", "shard_format"]

#: ``--output-format`` of a shard source, and the extension of its shards.
FORMATS = {"webdataset": SHARD_SUFFIX, "parquet": PARQUET_SUFFIX}
#: The output members of a tar sample, in the order they are written: role, name suffix (the
#: suffixes of an image's output files, ``storage.layout``).
OUTPUT_MEMBERS = (("mask", MASK_SUFFIX), ("raw", RAW_SUFFIX), ("metadata", METADATA_SUFFIX))
_CONTENT_TYPES = {"webdataset": "application/x-tar", "parquet": "application/vnd.apache.parquet"}


def shard_format(key: str) -> str:
    """``parquet`` for a ``.parquet`` key, else ``webdataset``."""
    return "parquet" if key.endswith(FORMATS["parquet"]) else "webdataset"


def output_key(key: str, output_format: str | None) -> str:
    """The output shard's key for input shard ``key``: the same, its extension changed to
    ``output_format``'s (None: the input's own format)."""
    own = shard_format(key)
    if output_format is None or output_format == own:
        return key
    stem = key[:-len(FORMATS[own])] if key.endswith(FORMATS[own]) else key
    return stem + FORMATS[output_format]


def content_type(key: str) -> str:
    return _CONTENT_TYPES[shard_format(key)]


def open_reader(key: str, stream: BinaryIO, image_column: str | None = None) -> ShardReader | ParquetReader:
    """The reader of shard ``key`` from ``stream``: ``samples()`` and ``offset``. ``image_column``
    is for Parquet only."""
    if shard_format(key) == "parquet":
        return ParquetReader(stream, image_column)
    return ShardReader(stream)


def open_writer(key: str, roles: tuple[str, ...], mtime: float) -> "_TarSamples | ParquetShardWriter":
    """The writer of output shard ``key``; ``roles`` the outputs asked for (``--outputs``)."""
    if shard_format(key) == "parquet":
        return ParquetShardWriter(roles)
    return _TarSamples(mtime)


class _TarSamples:
    """``ShardWriter`` taking a sample's outputs by role: members ``<key>.mask.png``, ...."""

    def __init__(self, mtime: float) -> None:
        self._tar = ShardWriter(mtime)

    def add(self, key: str, blobs: dict[str, bytes]) -> None:
        for role, suffix in OUTPUT_MEMBERS:
            if role in blobs:
                self._tar.add(key + suffix, blobs[role])

    def take(self) -> bytes:
        return self._tar.take()

    def close(self) -> bytes:
        return self._tar.close()
