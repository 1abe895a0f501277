"""WebDataset shards in, shards out: ``clipmask run`` on a folder and on S3, bad shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import boto3
import pytest
import webdataset as wds
from PIL import Image

from storage import open_store
from tasks.errors import ShardFormatError
from tasks.pipeline.shards import mask_shard
from tasks.shards.names import expand_braces
from tasks.shards.tar import ShardReader, pick_members
from tests.images import encoded, noise_image
from tests.processes import clipmask
from worker.spec import MaskSpec

OPTIONS = ["--prompt", "dog", "--device", "cpu", "--batch-size", "1", "--quiet"]


@pytest.fixture
def run_env(tiny_model):
    return {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}


def samples(shard: int, count: int = 3) -> dict[str, dict[str, bytes]]:
    """img2dataset's sample layout: an image, its caption and its JSON, keyed 000000000..."""
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    out = {}
    for i in range(count):
        key = f"{shard:05d}{i:04d}"
        extension, fmt = formats[i % 3]
        image = noise_image(40 + 8 * i, 32 + 4 * shard, seed=10 * shard + i)
        out[key] = {extension: encoded(image, fmt), "txt": b"a caption", "json": json.dumps({"key": key}).encode()}
    return out


def tar_bytes(content: dict[str, dict[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in content.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name).offset


def read_shard(path) -> dict[str, dict]:
    """The samples of an output shard as webdataset reads them, by ``__key__``."""
    return {sample["__key__"]: sample for sample in wds.WebDataset(str(path), shardshuffle=False)}


def manifest(out) -> list[dict]:
    (job,) = (out / "_jobs").iterdir()
    return [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]


# --- reading a shard's stream ------------------------------------------------------


def test_samples_are_grouped_by_key_in_order():
    content = samples(0)
    reader = ShardReader(io.BytesIO(tar_bytes(content)))
    read = list(reader.samples())
    assert [sample.key for sample in read] == list(content)
    assert [sample.data for sample in read] == [next(iter(members.values())) for members in content.values()]
    assert read[0].members == ["000000000.jpg", "000000000.txt", "000000000.json"]


@pytest.mark.parametrize("cut, message", [
    (lambda data: member_offset(data, "000000001.png") + 700, "member 000000001.png \\(header at byte"),
    (lambda data: member_offset(data, "000000002.webp"), "without its end-of-archive blocks"),
    (lambda data: member_offset(data, "000000002.webp") + 100, "is cut off at byte"),
], ids=["in a member", "at a member boundary", "in a header"])
def test_a_truncated_shard_is_an_error_with_its_offset(cut, message):
    data = tar_bytes(samples(0))
    # Given a shard cut off (stream-mode tarfile alone would end quietly at a header)
    reader = ShardReader(io.BytesIO(data[:cut(data)]))
    keys = []
    # When its samples are read, Then those before the cut come, then an error naming the byte
    with pytest.raises(ShardFormatError, match=message) as info:
        keys.extend(sample.key for sample in reader.samples())
    assert keys[0] == "000000000" and info.value.offset > 0 and "byte" in str(info.value)


def test_a_corrupt_header_is_an_error_with_its_offset():
    data = bytearray(tar_bytes(samples(0)))
    at = member_offset(bytes(data), "000000001.png")
    data[at:at + 512] = b"\x07" * 512
    with pytest.raises(ShardFormatError, match=f"corrupt tar: unreadable header at byte {at}"):
        list(ShardReader(io.BytesIO(bytes(data))).samples())


def test_a_shard_past_its_tasks_time_limit_fails_unwritten_and_says_how_to_fix_it(tmp_path, engine):
    # Given a shard, masked once within its time and once with the time limit already passed
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(tar_bytes(samples(0)))
    source, spec = open_store(str(tmp_path / "in")), MaskSpec.from_text("dog")
    in_time = mask_shard(engine, spec, source, "00000.tar", open_store(str(tmp_path / "ok")),
                         deadline=time.monotonic() + 600)
    late = mask_shard(engine, spec, source, "00000.tar", open_store(str(tmp_path / "late")),
                      deadline=time.monotonic() - 1)
    # Then the first is written whole
    assert in_time.error is None and [o.status for o in in_time.outcomes] == ["succeeded"] * 3
    assert list(read_shard(tmp_path / "ok" / "00000.tar")) == list(samples(0))
    # And the second leaves no output shard, its rows failed with the limit and what to change
    assert late.error is not None and late.error.startswith("time limit reached"), late.error
    assert "CLIPMASK_TASK_TIME_LIMIT" in late.error and "smaller shards" in late.error
    assert not (tmp_path / "late" / "00000.tar").exists()
    assert {row["status"] for row in late.rows()} == {"failed"}


def test_members_are_picked_by_name_and_key_and_the_rest_is_left_unread():
    content = samples(0, count=8)
    data = tar_bytes(content)
    stream = io.BytesIO(data)
    # When a record and two samples' images are asked for, the latest in the third sample
    picked = dict(pick_members(stream, ["000000001.json", "000009999.json"], ["000000002", "000000000"]))
    # Then those members come, the one the shard lacks does not, and the stream stops soon after the last
    assert picked == {"000000000": content["000000000"]["jpg"], "000000001.json": content["000000001"]["json"],
                      "000000002": content["000000002"]["webp"]}
    assert stream.tell() == len(data)  # a name not in the shard: read to its end, which is checked
    stream = io.BytesIO(data)
    assert dict(pick_members(stream, ["000000001.json"], ["000000002"])).keys() == {"000000001.json", "000000002"}
    assert stream.tell() < member_offset(data, "000000005.webp")  # tarfile reads 10 KiB records
    # And a shard cut off before what is asked for is an error with its offset
    with pytest.raises(ShardFormatError, match="without its end-of-archive blocks"):
        list(pick_members(io.BytesIO(data[:member_offset(data, "000000004.png")]), [], ["000000005"]))


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert list(expand_braces("{00000..00002}.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert list(expand_braces("{a,b}/{8..10}.tar")) == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar",
                                                         "b/10.tar"]
    with pytest.raises(ValueError, match="neither a range"):
        list(expand_braces("{x}.tar"))


# --- clipmask run ------------------------------------------------------------------


def test_run_masks_a_folder_of_shards_into_shards_equal_to_file_outputs(tmp_path, run_env):
    # Given img2dataset's layout: shards with parquet and stats beside them; the second shard has a
    # corrupt image, the third is cut off in its second sample
    src, files = tmp_path / "shards", tmp_path / "files"
    src.mkdir()
    content = {shard: samples(shard) for shard in range(3)}
    content[1]["000010001"]["png"] = b"\x89PNG not really"
    for shard, shard_samples in content.items():
        data = tar_bytes(shard_samples)
        if shard == 2:
            data = data[:member_offset(data, "000020001.png") + 700]
        (src / f"{shard:05d}.tar").write_bytes(data)
        (src / f"{shard:05d}.parquet").write_bytes(b"PAR1")
        (src / f"{shard:05d}_stats.json").write_text("{}")
        for key, members in shard_samples.items():  # the same images as plain files
            extension = next(e for e in members if e in ("jpg", "png", "webp"))
            (files / f"{shard:05d}").mkdir(parents=True, exist_ok=True)
            (files / f"{shard:05d}" / f"{key}.{extension}").write_bytes(members[extension])
    out, file_out = tmp_path / "out", tmp_path / "file-out"
    # When both are masked with the same options
    result = clipmask("run", str(src), "--out", str(out), *OPTIONS, env=run_env)
    clipmask("run", str(files), "--out", str(file_out), *OPTIONS, env=run_env)
    # Then the run reports the corrupt image and the cut shard's samples, and goes on past them
    assert result.returncode == 1, result.stderr
    assert "5 succeeded, 2 failed, 0 skipped" in result.stdout, result.stdout + result.stderr
    # And each whole shard has an output shard of its name, samples keyed as the input's, its
    # masks byte-equal to the files a folder run writes, the corrupt image left out
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "_jobs"]  # no partial 00002.tar
    for shard in (0, 1):
        written = read_shard(out / f"{shard:05d}.tar")
        expected_keys = [key for key in content[shard] if key != "000010001"]
        assert list(written) == expected_keys
        for key, sample in written.items():
            extension = next(e for e in content[shard][key] if e in ("jpg", "png", "webp"))
            stem = file_out / f"{shard:05d}" / f"{key}.{extension}"
            assert sample["mask.png"] == stem.with_name(stem.name + ".mask.png").read_bytes()
            assert sample["raw.png"] == stem.with_name(stem.name + ".raw.png").read_bytes()
            record = json.loads(sample["json"])
            assert record["source"].endswith(f"{shard:05d}.tar#{key}")
            assert Image.open(io.BytesIO(sample["mask.png"])).size == (record["width"], record["height"])
    # And the manifest has a row per sample with its shard and key; the cut shard says where
    rows = manifest(out)
    by_key = {row["key"]: row for row in rows}
    assert by_key["000010001"]["status"] == "failed" and "ImageDecodeError" in by_key["000010001"]["error"]
    assert by_key["000010001"]["shard"].endswith("00001.tar")
    cut = [row for row in rows if row["shard"].endswith("00002.tar")]
    assert [row["key"] for row in cut] == ["000020000"]
    assert cut[0]["status"] == "failed" and "truncated tar" in cut[0]["error"] and "byte" in cut[0]["error"]


def test_run_masks_an_s3_brace_pattern_and_skips_a_corrupt_shard(tmp_path, run_env, s3_env, s3_bucket):
    # Given three shards on S3, the middle one with garbage where a header should be
    s3 = boto3.client("s3")
    content = {shard: samples(shard, count=2) for shard in range(3)}
    for shard, shard_samples in content.items():
        data = bytearray(tar_bytes(shard_samples))
        if shard == 1:
            at = member_offset(bytes(data), "000010001.png")
            data[at:at + 512] = b"\x07" * 512
        s3.put_object(Bucket=s3_bucket, Key=f"cc/{shard:05d}.tar", Body=bytes(data))
    # When they are masked by a brace pattern
    result = clipmask("run", f"s3://{s3_bucket}/cc/{{00000..00002}}.tar", "--out", f"s3://{s3_bucket}/masks",
                      *OPTIONS, env={**run_env, **s3_env})
    # Then the corrupt shard fails with the header's offset and the others are written whole
    assert result.returncode == 1, result.stderr
    assert "4 succeeded, 1 failed" in result.stdout, result.stdout + result.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="masks/")["Contents"]}
    assert {"masks/00000.tar", "masks/00002.tar"} <= keys and "masks/00001.tar" not in keys
    for shard in (0, 2):
        local = tmp_path / f"{shard:05d}.tar"
        local.write_bytes(s3.get_object(Bucket=s3_bucket, Key=f"masks/{shard:05d}.tar")["Body"].read())
        written = read_shard(local)
        assert list(written) == list(content[shard])
        assert all({"mask.png", "raw.png", "json"} <= set(sample) for sample in written.values())
    (manifest_key,) = (key for key in keys if key.endswith("manifest.jsonl"))
    rows = [json.loads(line) for line in s3.get_object(Bucket=s3_bucket, Key=manifest_key)["Body"].iter_lines()]
    failed = [row for row in rows if row["status"] == "failed"]
    assert [(row["key"], row["shard"]) for row in failed] == [("000010000", f"s3://{s3_bucket}/cc/00001.tar")]
    assert f"unreadable header at byte {member_offset(tar_bytes(content[1]), '000010001.png')}" in failed[0]["error"]


@pytest.mark.parametrize("source, args, message", [
    ("images", ["--output-format", "webdataset"], "--output-format webdataset needs WebDataset shards"),
    ("shards", ["--output-format", "files"], "leave out --output-format"),
    ("missing", [], "which does not exist"),
])
def test_run_rejects_output_formats_that_do_not_fit_the_source(tmp_path, run_env, source, args, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encoded(noise_image(8, 8, 0), "PNG"))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(tar_bytes(samples(0, 1)))
    src = str(tmp_path / "shards" / "{00003..00004}.tar") if source == "missing" else str(tmp_path / source)
    result = clipmask("run", src, "--out", str(tmp_path / "out"), *OPTIONS, *args, env=run_env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
