"""Parquet shards in and out: the reader on its own, then ``clipmask run`` on folders and brace
patterns of ``.parquet`` files, read back with pyarrow."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import ShardFormatError
from tasks.shards.formats import output_key
from tasks.shards.names import find_shards
from tasks.shards.parquet import ParquetReader, pick_cells
from tests.images import encoded, noise_image
from tests.processes import clipmask
from tests.test_shards import OPTIONS, read_shard

CORRUPT = b"\xff\xd8\xff\xe0 not really a jpeg"
EXTENSIONS = ["jpg", "png", "webp"]  # of images(), in turn


@pytest.fixture
def run_env(tiny_model):
    return {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}


def images(count: int, seed: int = 0) -> list[bytes]:
    """JPEG, PNG, WebP, JPEG, ... of sizes that differ."""
    formats = ["JPEG", "PNG", "WEBP"]
    return [encoded(noise_image(40 + 8 * i, 36 + 4 * seed, seed=10 * seed + i), formats[i % 3]) for i in range(count)]


def parquet_bytes(table: pa.Table, row_group_size: int = 2) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def hf_table(data: list[bytes | None]) -> pa.Table:
    """Hugging Face datasets' layout: an ``image`` struct of bytes and path, no key column."""
    return pa.table({"image": [{"bytes": d, "path": f"img{i}.jpg"} for i, d in enumerate(data)],
                     "label": list(range(len(data)))})


def keyed_table(data: list[bytes | None], keys: list[str], column: str = "jpg") -> pa.Table:
    """img2dataset's layout: image bytes in a binary column beside ``key`` and a caption."""
    return pa.table({"key": keys, column: pa.array(data, pa.binary()), "caption": ["a caption"] * len(data)})


class Unseekable(io.RawIOBase):
    """A stream that reads but cannot seek, as S3's body is."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def manifest(out) -> list[dict]:
    (job,) = (out / "_jobs").iterdir()
    return [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]


# --- reading a shard's stream ------------------------------------------------------


@pytest.mark.parametrize("stream", [io.BytesIO, Unseekable], ids=["seekable", "copied to a temporary file"])
def test_rows_are_samples_in_order_keyed_by_row_index(stream):
    data = images(3) + [None]
    samples = list(ParquetReader(stream(parquet_bytes(hf_table(data)))).samples())
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    assert [s.data for s in samples] == data
    assert samples[0].image == "image" and samples[3].image is None
    assert samples[3].problem == "no image bytes in column 'image' (path: img3.jpg)"
    assert samples[2].offset > samples[0].offset  # the third row is in the second row group


def test_a_key_column_names_the_samples_and_a_column_can_be_named():
    table = keyed_table(images(2), ["a7", "b9"], column="photo")
    samples = list(ParquetReader(io.BytesIO(parquet_bytes(table)), "photo").samples())
    assert [(s.key, s.image) for s in samples] == [("a7", "photo"), ("b9", "photo")]
    with pytest.raises(ShardFormatError, match="no image column \\(jpg or image\\): its columns are key, photo, "
                                               "caption; name the one"):
        list(ParquetReader(io.BytesIO(parquet_bytes(table))).samples())


@pytest.mark.parametrize("stream", [io.BytesIO, Unseekable], ids=["seekable", "copied to a temporary file"])
def test_a_truncated_file_is_an_error_naming_its_size(stream):
    data = parquet_bytes(hf_table(images(3)))
    cut = data[:len(data) - 100]
    with pytest.raises(ShardFormatError, match=f"not a whole Parquet file \\({len(cut)} bytes; cut off") as info:
        list(ParquetReader(stream(cut)).samples())
    assert info.value.offset == len(cut)


def test_shards_are_found_by_extension_and_img2dataset_metadata_is_not_one(tmp_path):
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "both").mkdir()
    for name in ("00000.parquet", "00000.tar"):
        (tmp_path / "both" / name).write_bytes(b"")
    assert list(find_shards(str(tmp_path / "pq")).keys()) == ["00000.parquet"]
    assert list(find_shards(str(tmp_path / "both")).keys()) == ["00000.tar"]  # webdataset output: tar + metadata
    assert find_shards(str(tmp_path / "pq" / "{00000..00001}.parquet")).suffix == ".parquet"
    assert output_key("a/00000.tar", "parquet") == "a/00000.parquet"
    assert output_key("00000.parquet", "webdataset") == "00000.tar"
    assert output_key("00000.parquet", None) == "00000.parquet"


@pytest.mark.parametrize("stream", [io.BytesIO, Unseekable], ids=["seekable", "copied to a temporary file"])
def test_cells_are_picked_by_row_key_and_column(stream):
    data = images(5)
    # Given a Hugging Face table (keys: row indexes, images in a struct) and an img2dataset one (a key column)
    unkeyed = parquet_bytes(hf_table(data), row_group_size=2)
    keyed = parquet_bytes(keyed_table(data, [f"k{i}" for i in range(5)], column="photo"), row_group_size=2)
    # When a few cells are asked for by key and column (None: the image column)
    picked = dict(pick_cells(stream(unkeyed), [("000000003", None), ("000000001", "label"), ("3", None),
                                               ("000000009", None)]))
    # Then the image bytes and other values come as bytes; keys the file lacks do not
    assert picked == {("000000003", None): data[3]}  # label is an int: not a value pick_cells hands over
    picked = dict(pick_cells(stream(keyed), [("k4", None), ("k0", "caption"), ("k9", None)], "photo"))
    assert picked == {("k4", None): data[4], ("k0", "caption"): b"a caption"}
    with pytest.raises(ShardFormatError, match="no column 'jpg'"):
        list(pick_cells(stream(keyed), [("k4", None)], "jpg"))


# --- clipmask run ------------------------------------------------------------------


def test_run_masks_parquet_shards_into_parquet_equal_to_file_outputs(tmp_path, run_env):
    # Given a folder of Hugging Face style shards: the first with a corrupt image, the second cut off
    src, files = tmp_path / "shards", tmp_path / "files"
    src.mkdir(), files.mkdir()
    data = images(3)
    data[1] = CORRUPT
    (src / "00000.parquet").write_bytes(parquet_bytes(hf_table(data)))
    whole = parquet_bytes(hf_table(images(2, seed=1)))
    (src / "00001.parquet").write_bytes(whole[:len(whole) // 2])
    for i, image in enumerate(data):
        (files / f"{i:09d}.{EXTENSIONS[i % 3]}").write_bytes(image)
    # When they are masked (Parquet out, the source's format) and the same images as files
    out, file_out = tmp_path / "out", tmp_path / "file-out"
    result = clipmask("run", str(src), "--out", str(out), *OPTIONS, env=run_env)
    clipmask("run", str(files), "--out", str(file_out), *OPTIONS, env=run_env)
    # Then the corrupt row fails alone and the cut shard fails whole, with a reason
    assert result.returncode == 1, result.stderr
    assert "2 succeeded, 2 failed, 0 skipped" in result.stdout, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["00000.parquet", "_jobs"]  # no partial 00001.parquet
    rows = {(row["shard"].rsplit("/", 1)[1], row["key"]): row for row in manifest(out)}
    assert "ImageDecodeError" in rows["00000.parquet", "000000001"]["error"]
    cut = rows["00001.parquet", None]
    assert cut["status"] == "failed" and f"not a whole Parquet file ({len(whole) // 2} bytes; cut off" in cut["error"]
    # And the output shard has a row per masked sample, its masks byte-equal to a folder run's
    table = pq.read_table(out / "00000.parquet")
    assert table.column_names == ["key", "mask", "raw", "json"]
    assert table.column("key").to_pylist() == ["000000000", "000000002"]
    for row in table.to_pylist():
        stem = file_out / f"{row['key']}.{EXTENSIONS[int(row['key']) % 3]}"
        assert row["mask"] == stem.with_name(stem.name + ".mask.png").read_bytes()
        assert row["raw"] == stem.with_name(stem.name + ".raw.png").read_bytes()
        record = json.loads(row["json"])
        assert record["source"] == f"{src / '00000.parquet'}#{row['key']}"
        assert record["outputs"]["mask"] == f"{out / '00000.parquet'}#{row['key']}.mask.png"


def test_run_masks_a_brace_pattern_of_keyed_parquet_into_webdataset(tmp_path, run_env):
    # Given img2dataset-like shards whose images are in a column named otherwise, keyed
    src = tmp_path / "shards"
    src.mkdir()
    keys = {shard: [f"{shard:05d}{i:04d}" for i in range(2)] for shard in range(2)}
    for shard in range(2):
        table = keyed_table(images(2, seed=shard), keys[shard], column="photo")
        (src / f"{shard:05d}.parquet").write_bytes(parquet_bytes(table, row_group_size=1))
    # When the pattern is masked into tar shards, the mask alone
    out = tmp_path / "out"
    result = clipmask("run", str(src / "{00000..00001}.parquet"), "--out", str(out), "--image-column", "photo",
                      "--output-format", "webdataset", "--outputs", "mask", *OPTIONS, env=run_env)
    # Then each shard has a tar shard of its name, samples under the key column's keys
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "_jobs"]
    for shard in range(2):
        written = read_shard(out / f"{shard:05d}.tar")
        assert list(written) == keys[shard]
        assert all(set(sample) >= {"mask.png", "json"} and "raw.png" not in sample for sample in written.values())


@pytest.mark.parametrize("source, args, message", [
    ("images", ["--output-format", "parquet"], "--output-format parquet needs WebDataset shards (.tar) or Parquet"),
    ("images", ["--image-column", "jpg"], "--image-column is for Parquet shards"),
    ("parquet", ["--output-format", "files"], "--output-format webdataset or parquet"),
])
def test_run_rejects_parquet_options_that_do_not_fit_the_source(tmp_path, run_env, source, args, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encoded(noise_image(8, 8, 0), "PNG"))
    (tmp_path / "parquet").mkdir()
    (tmp_path / "parquet" / "00000.parquet").write_bytes(parquet_bytes(hf_table(images(1))))
    result = clipmask("run", str(tmp_path / source), "--out", str(tmp_path / "out"), *OPTIONS, *args, env=run_env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
