"""A Parquet shard's samples, read row group by row group, and an output shard written as a stream.

Reading: Parquet keeps its schema and the place of each row group in a footer at the end of the
file, so pyarrow needs a file it can seek. A stream that can seek (a local file) is read in
place; any other (S3's one GET) is first copied to an unnamed temporary file on disk, 1 MiB at a
time, then read from there. Memory holds one batch of rows of the image column (``BATCH_ROWS``,
decoded from one row group), never the file; the disk holds the file until the shard is read.

A sample is a row: its key from a ``key`` column when the file has one (img2dataset's), else the
row's index zero-padded to ``ROW_KEY_WIDTH`` digits (as webdataset keys are); its image from the
image column, ``jpg`` or else ``image`` unless one is named: binary, or a struct with a ``bytes``
field as Hugging Face datasets store an image. A row without image bytes fails alone, unless
the file says why it has none: img2dataset keeps a row for each URL it could not fetch, with its
``status`` (``failed_to_download``, ...) and ``error_message``; such a row is left out
(``Sample.left_out``: skipped, with that reason), as img2dataset's own tar shards leave it out.

Writing: ``ParquetShardWriter`` writes columns ``key``, ``mask`` and ``raw`` (PNG bytes, as
``--outputs`` asks) and ``json`` (the metadata record as text), a row group every
``ROWS_PER_GROUP`` samples, and hands over the bytes written so far (``take``) as the tar writer
does, so the output shard goes out through ``write_stream`` and appears only once whole.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import ShardFormatError
from tasks.shards.tar import ByteSink, Sample

__all__ = ["IMAGE_COLUMNS", "ParquetReader", "ParquetShardWriter"]

#: The image column looked for when none is named: img2dataset's, then Hugging Face datasets'.
IMAGE_COLUMNS = ("jpg", "image")
#: The column that names a row's sample, when the file has it (img2dataset writes it).
KEY_COLUMN = "key"
#: img2dataset's columns saying whether a row's image was fetched, and why not.
STATUS_COLUMN, STATUS_OK, ERROR_COLUMN = "status", "success", "error_message"
#: Digits of a key made from a row's index: img2dataset's keys are 9 digits (shard and row).
ROW_KEY_WIDTH = 9
#: Rows decoded at a time from a row group: the images held in memory while reading.
BATCH_ROWS = 64
#: Bytes copied at a time from a stream that cannot seek into the temporary file.
SPOOL_CHUNK = 1 << 20
#: Samples per row group of an output shard: about 2 MB of PNGs at 256x256, a few hundred at 12 MP.
ROWS_PER_GROUP = 256


class ParquetReader:
    """The samples of one Parquet stream, in row order (``samples()``). ``offset`` is how far the
    reading got, in bytes: while copying, the bytes copied; then the current row group's start."""

    def __init__(self, stream: BinaryIO, image_column: str | None = None) -> None:
        self._stream, self._column, self.offset = stream, image_column, 0

    def samples(self) -> Iterator[Sample]:
        """Yield each row as a ``Sample``. Raises ShardFormatError (with the byte offset) for a
        file that is not whole Parquet (cut off: its footer is gone), has no image column, or a
        row group that cannot be decoded; the stream's own errors (storage's) unchanged."""
        with self._seekable() as file:
            parquet = self._open(file)
            column = _image_column(parquet.schema_arrow, self._column)
            extra = _extra_columns(parquet.schema_arrow, column)
            row = 0
            for group in range(parquet.num_row_groups):
                self.offset = _group_offset(parquet.metadata.row_group(group))
                for data, problem, values in self._rows(parquet, group, column, extra):
                    key = values.get(KEY_COLUMN)
                    key = str(key) if key is not None else f"{row:0{ROW_KEY_WIDTH}d}"
                    yield Sample(key, self.offset, column if data is not None else None, data, [column], problem,
                                 _left_out(values) if data is None else None)
                    row += 1

    @contextmanager
    def _seekable(self) -> Iterator[BinaryIO]:
        if _can_seek(self._stream):
            yield self._stream
            return
        with tempfile.TemporaryFile(prefix="clipmask-shard-") as spool:
            while chunk := self._stream.read(SPOOL_CHUNK):
                spool.write(chunk)
                self.offset += len(chunk)
            spool.seek(0)
            yield spool

    def _open(self, file: BinaryIO) -> pq.ParquetFile:
        size = file.seek(0, 2)
        file.seek(0)
        self.offset = size
        try:
            return pq.ParquetFile(file)
        except pa.ArrowException as err:
            raise ShardFormatError(f"not a whole Parquet file ({size} bytes; cut off, or not Parquet): {err}",
                                   size) from err

    def _rows(self, parquet: pq.ParquetFile, group: int, column: str, extra: list[str]) -> Iterator[tuple]:
        """``(image bytes or None, why none, {extra column: value})`` for each row of ``group``."""
        try:
            for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=[column, *extra]):
                images = _image_values(batch.column(0), column)
                values = {name: batch.column(i + 1).to_pylist() for i, name in enumerate(extra)}
                for i, (data, problem) in enumerate(images):
                    yield data, problem, {name: found[i] for name, found in values.items()}
        except pa.ArrowException as err:
            raise ShardFormatError(f"corrupt Parquet: row group {group} of {parquet.num_row_groups} (at byte "
                                   f"{self.offset}) cannot be read: {err}", self.offset) from err


def _extra_columns(schema: pa.Schema, image_column: str) -> list[str]:
    """The columns read beside the images: the key, and img2dataset's status and error where the
    file has them as text."""
    wanted = [KEY_COLUMN] + [name for name in (STATUS_COLUMN, ERROR_COLUMN)
                             if name in schema.names and pa.types.is_string(schema.field(name).type)]
    return [name for name in wanted if name in schema.names and name != image_column]


def _left_out(values: dict) -> str | None:
    """Why a row without an image is left out, when the file says its image was never fetched."""
    status = values.get(STATUS_COLUMN)
    if status is None or status == STATUS_OK:
        return None
    error = values.get(ERROR_COLUMN)
    return f"not fetched by the shard's maker (status {status!r}" + (f": {error})" if error else ")")


def _can_seek(stream: BinaryIO) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, ValueError):
        return False


def _group_offset(group: pq.RowGroupMetaData) -> int:
    """The byte where a row group's first column chunk starts."""
    first = group.column(0)
    return first.dictionary_page_offset or first.data_page_offset


def _image_column(schema: pa.Schema, named: str | None) -> str:
    """The column holding the images: ``named``, or the first of ``IMAGE_COLUMNS`` the file has."""
    wanted = (named,) if named else IMAGE_COLUMNS
    column = next((name for name in wanted if name in schema.names), None)
    if column is None:
        what = f"no column {named!r}" if named else f"no image column ({' or '.join(IMAGE_COLUMNS)})"
        raise ShardFormatError(f"{what}: its columns are {', '.join(schema.names)}; name the one that holds "
                               "the image bytes with --image-column", 0)
    kind = schema.field(column).type
    if not (_is_bytes(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                and _is_bytes(kind.field("bytes").type))):
        raise ShardFormatError(f"column {column!r} holds {kind}, not image bytes (binary, or a struct with a "
                               "'bytes' field as Hugging Face datasets write images)", 0)
    return column


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _image_values(array: pa.Array, column: str) -> list[tuple[bytes | None, str | None]]:
    """Each row's image bytes, or None and why."""
    if pa.types.is_struct(array.type):
        paths = array.field("path").to_pylist() if array.type.get_field_index("path") >= 0 else None
        values = array.field("bytes").to_pylist()
        return [(data, None) if data is not None else
                (None, f"no image bytes in column {column!r}" + (f" (path: {paths[i]})" if paths and paths[i]
                                                                  else ""))
                for i, data in enumerate(values)]
    return [(data, None if data is not None else f"no image bytes in column {column!r}")
            for data in array.to_pylist()]


class ParquetShardWriter:
    """An output shard as Parquet bytes, sample by sample: ``add`` a sample's outputs (by role:
    ``mask``, ``raw``, ``metadata``), ``take`` the bytes ready so far (a row group is written every
    ``ROWS_PER_GROUP`` samples); ``close`` writes the last row group and the footer and returns the
    last bytes. ``roles``: the PNG columns to write (``mask``, ``raw``; others are ignored)."""

    def __init__(self, roles: tuple[str, ...], rows_per_group: int = ROWS_PER_GROUP) -> None:
        self._roles = tuple(role for role in ("mask", "raw") if role in roles)
        fields = [pa.field("key", pa.string())] + [pa.field(role, pa.binary()) for role in self._roles]
        self._schema = pa.schema(fields + [pa.field("json", pa.string())])
        self._rows: list[dict] = []
        self._rows_per_group = rows_per_group
        self._sink = ByteSink()
        self._writer = pq.ParquetWriter(self._sink, self._schema)

    def add(self, key: str, blobs: dict[str, bytes]) -> None:
        row = {"key": key, **{role: blobs.get(role) for role in self._roles}}
        row["json"] = blobs["metadata"].decode("utf-8") if "metadata" in blobs else None
        self._rows.append(row)
        if len(self._rows) >= self._rows_per_group:
            self._flush()

    def take(self) -> bytes:
        return self._sink.take()

    def close(self) -> bytes:
        self._flush()
        self._writer.close()
        return self.take()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []
