"""A Parquet shard's samples, read row group by row group, and an output shard written as a stream.

Reading: Parquet keeps its schema and the place of each row group in a footer at the end of the
file, so pyarrow needs a file it can seek. A stream that can seek (a local file) is read in
place; any other (S3's one GET) is first copied to an unnamed temporary file on disk, 1 MiB at a
time, then read from there. Rows are handed on ``BATCH_ROWS`` at a time, but pyarrow reads a
row group's column whole: memory holds one row group's images (about 1.7 times their bytes),
never more of the file; a file written as one row group (``pyarrow.parquet.write_table``'s
default, up to a million rows) is held whole. The disk holds the file until the shard is read.

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

``pick_cells`` reads a few cells by row key (``clipmask preview``): the ``key`` column whole,
then only the row groups and columns that hold what is asked for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import ShardFormatError
from tasks.shards.tar import ByteSink, Sample

__all__ = ["IMAGE_COLUMNS", "ParquetReader", "ParquetShardWriter", "pick_cells"]

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

    def _seekable(self) -> AbstractContextManager[BinaryIO]:
        return _seekable(self._stream, self._copied)

    def _copied(self, size: int) -> None:
        self.offset += size

    def _open(self, file: BinaryIO) -> pq.ParquetFile:
        self.offset = file.seek(0, 2)
        return _open(file)

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


def pick_cells(stream: BinaryIO, cells: Collection[tuple[str, str | None]], image_column: str | None = None
               ) -> Iterator[tuple[tuple[str, str | None], bytes]]:
    """The cells of one Parquet stream named in ``cells``, each by its row's key (as
    ``ParquetReader`` keys rows) and its column (None: the image column, as ``ParquetReader``
    finds it, ``image_column`` or the default): ``((key, column), bytes)`` for each one the file
    has and that is not null (text as UTF-8, an image struct's ``bytes``); the others are not
    yielded. The file is opened as ``ParquetReader`` opens it (a stream that cannot seek is
    copied to a temporary file first); the ``key`` column is read whole, then only the row
    groups that hold a wanted row, only the wanted columns, ``BATCH_ROWS`` rows at a time, and
    nothing past the last of them. Raises ShardFormatError as ``ParquetReader.samples`` does."""
    wanted: dict[str, set[str | None]] = {}
    for key, column in cells:
        wanted.setdefault(key, set()).add(column)
    if not wanted:
        return
    with _seekable(stream) as file:
        parquet = _open(file)
        names = parquet.schema_arrow.names
        image = _image_column(parquet.schema_arrow, image_column) if any(None in c for c in wanted.values()) else None
        rows = _rows_of(parquet, wanted, KEY_COLUMN in names and KEY_COLUMN != image)
        first = 0
        for group in range(parquet.num_row_groups):
            if not rows:
                return
            end = first + parquet.metadata.row_group(group).num_rows
            here = {row - first: rows.pop(row) for row in sorted(rows) if row < end}
            if here:
                yield from _group_cells(parquet, group, here, wanted, image)
            first = end


def _rows_of(parquet: pq.ParquetFile, wanted: dict, keyed: bool) -> dict[int, str]:
    """The index of the row of each wanted key that the file has (its first row of that key)."""
    if not keyed:
        count = parquet.metadata.num_rows
        return {int(key): key for key in wanted if key.isdigit() and key == f"{int(key):0{ROW_KEY_WIDTH}d}"
                and int(key) < count}
    try:
        keys = parquet.read(columns=[KEY_COLUMN]).column(0).to_pylist()
    except pa.ArrowException as err:
        raise ShardFormatError(f"corrupt Parquet: its {KEY_COLUMN!r} column cannot be read: {err}", 0) from err
    rows: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key is not None and str(key) in wanted:
            rows.setdefault(str(key), row)
    return {row: key for key, row in rows.items()}


def _group_cells(parquet: pq.ParquetFile, group: int, here: dict[int, str], wanted: dict, image: str | None
                 ) -> Iterator[tuple[tuple[str, str | None], bytes]]:
    """The wanted cells of the rows ``here`` (index in the row group: key) of row group ``group``."""
    names = parquet.schema_arrow.names
    columns = sorted({image if column is None else column for key in here.values() for column in wanted[key]}
                     & set(names))
    if not columns:
        return
    start = 0
    try:
        for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=columns):
            for index in (i for i in here if start <= i < start + batch.num_rows):
                key = here[index]
                for column in wanted[key]:
                    name = image if column is None else column
                    if name in columns:
                        value = _as_bytes(batch.column(columns.index(name))[index - start].as_py())
                        if value is not None:
                            yield (key, column), value
            start += batch.num_rows
            if start > max(here):
                return
    except pa.ArrowException as err:
        offset = _group_offset(parquet.metadata.row_group(group))
        raise ShardFormatError(f"corrupt Parquet: row group {group} of {parquet.num_row_groups} (at byte "
                               f"{offset}) cannot be read: {err}", offset) from err


def _as_bytes(value: object) -> bytes | None:
    """A cell as bytes: binary as it is, text as UTF-8, an image struct's ``bytes``."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, str):
        return value.encode("utf-8")
    return value if isinstance(value, bytes) else None


@contextmanager
def _seekable(stream: BinaryIO, copied=lambda size: None) -> Iterator[BinaryIO]:
    """``stream`` itself when it can seek, else its bytes copied to an unnamed temporary file
    (``copied`` told the size of each chunk), rewound."""
    if _can_seek(stream):
        yield stream
        return
    with tempfile.TemporaryFile(prefix="clipmask-shard-") as spool:
        while chunk := stream.read(SPOOL_CHUNK):
            spool.write(chunk)
            copied(len(chunk))
        spool.seek(0)
        yield spool


def _open(file: BinaryIO) -> pq.ParquetFile:
    """The Parquet file in ``file``; ShardFormatError (with its size) when it is not whole Parquet."""
    size = file.seek(0, 2)
    file.seek(0)
    try:
        return pq.ParquetFile(file)
    except pa.ArrowException as err:
        raise ShardFormatError(f"not a whole Parquet file ({size} bytes; cut off, or not Parquet): {err}",
                               size) from err


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
