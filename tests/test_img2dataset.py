"""Shards made by img2dataset itself: it downloads images from a server on loopback (one URL a
corrupt image, one a 404) into WebDataset and Parquet shards, which ``clipmask run`` masks, and
which a real worker masks from moto S3 as a job.

img2dataset needs a webdataset older than the one this project reads shards with, so it lives in
its own environment, ``.venv-img2dataset``, that ``scripts/test.sh`` builds."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import subprocess
import tarfile
import threading

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.images import encoded, noise_image
from tests.processes import REPO, clipmask, wait_for
from tests.test_shards import OPTIONS, read_shard

IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
#: Served under these names, listed in this order: img2dataset keys them 000000000, 000000001, ...
SERVED = ["a.jpg", "b.png", "broken.jpg", "missing.jpg", "c.webp", "d.jpg"]
FAILING = {"000000002": "failed_to_resize", "000000003": "failed_to_download"}  # broken.jpg, the 404


@pytest.fixture
def run_env(tiny_model):
    return {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url_list(tmp_path_factory):
    """A list of URLs on a loopback HTTP server: four images, a corrupt one and one not there."""
    tmp_path = tmp_path_factory.mktemp("served")
    www = tmp_path / "www"
    www.mkdir()
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    for i, name in enumerate(SERVED):
        if name == "broken.jpg":
            (www / name).write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        elif name != "missing.jpg":
            (www / name).write_bytes(encoded(noise_image(48 + 8 * i, 40, seed=i), formats[name.rsplit(".", 1)[1]]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:{server.server_address[1]}/{name}\n" for name in SERVED))
    yield urls
    server.shutdown()
    server.server_close()
    thread.join()


def img2dataset(urls, out, output_format: str) -> None:
    """Run img2dataset's own command line on ``urls`` into the folder ``out``, offline."""
    if not IMG2DATASET.exists():
        pytest.fail(f"{IMG2DATASET} is missing: run scripts/test.sh (or: python3 -m venv .venv-img2dataset && "
                    ".venv-img2dataset/bin/pip install img2dataset==1.47.0)", pytrace=False)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    result = subprocess.run(
        [str(IMG2DATASET), str(urls), "--output_folder", str(out), "--output_format", output_format,
         "--image_size", "32", "--processes_count", "1", "--thread_count", "2", "--enable_wandb", "False"],
        env=env, cwd=out.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def img2dataset_rows(table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def made(url_list, tmp_path_factory):
    """img2dataset's own WebDataset and Parquet shards of the same URLs (made once for the
    module), and the images it wrote, keyed as it keyed them."""
    root = tmp_path_factory.mktemp("img2dataset")
    wds_in, pq_in = root / "i2d-webdataset", root / "i2d-parquet"
    img2dataset(url_list, wds_in, "webdataset")
    img2dataset(url_list, pq_in, "parquet")
    with tarfile.open(wds_in / "00000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    wds_images = {name.split(".")[0]: data for name, data in members if name.endswith(".jpg")}
    pq_rows = img2dataset_rows(pq.read_table(pq_in / "00000.parquet"))
    pq_images = {key: row["jpg"] for key, row in pq_rows.items() if row["jpg"] is not None}
    return wds_in, pq_in, wds_images, pq_rows, pq_images


def test_run_masks_img2dataset_shards_into_shards_equal_to_file_outputs(tmp_path, made, run_env):
    # Given img2dataset's own WebDataset and Parquet shards of the same URLs
    wds_in, pq_in, wds_images, pq_rows, pq_images = made
    assert sorted(os.listdir(wds_in)) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert sorted(os.listdir(pq_in)) == ["00000.parquet", "00000_stats.json"]
    # img2dataset recorded the corrupt image and the 404 itself: no tar sample, a row without image
    for metadata in (pq.read_table(wds_in / "00000.parquet"), pq.read_table(pq_in / "00000.parquet")):
        statuses = {key: row["status"] for key, row in img2dataset_rows(metadata).items()}
        assert {key: status for key, status in statuses.items() if status != "success"} == FAILING
    expected = sorted(set(pq_rows) - set(FAILING))
    assert sorted(wds_images) == sorted(pq_images) == expected
    # And the images img2dataset wrote, as plain files
    files = tmp_path / "files"
    for folder, images in (("webdataset", wds_images), ("parquet", pq_images)):
        (files / folder).mkdir(parents=True)
        for key, data in images.items():
            (files / folder / f"{key}.jpg").write_bytes(data)

    # When each folder of shards is masked, and the files with the same options
    wds_out, pq_out, file_out = tmp_path / "out-webdataset", tmp_path / "out-parquet", tmp_path / "out-files"
    wds_result = clipmask("run", str(wds_in), "--out", str(wds_out), *OPTIONS, env=run_env)
    pq_result = clipmask("run", str(pq_in), "--out", str(pq_out), *OPTIONS, env=run_env)
    files_result = clipmask("run", str(files), "--out", str(file_out), "--output-format", "files", *OPTIONS,
                            env=run_env)
    assert files_result.returncode == 0, files_result.stdout + files_result.stderr

    # Then every sample of img2dataset's tar shard is masked, into a tar shard of the same keys in
    # the same order, its masks byte-equal to the files'
    assert wds_result.returncode == 0, wds_result.stdout + wds_result.stderr
    assert f"{len(wds_images)} succeeded, 0 failed, 0 skipped" in wds_result.stdout, wds_result.stdout
    assert sorted(os.listdir(wds_out)) == ["00000.tar", "_jobs"]
    written = read_shard(wds_out / "00000.tar")
    assert list(written) == list(wds_images)  # as img2dataset wrote them (its threads' order)
    for key, sample in written.items():
        stem = file_out / "webdataset" / f"{key}.jpg"
        assert sample["mask.png"] == stem.with_name(stem.name + ".mask.png").read_bytes()
        assert sample["raw.png"] == stem.with_name(stem.name + ".raw.png").read_bytes()
        assert json.loads(sample["json"])["source"] == f"{wds_in / '00000.tar'}#{key}"

    # And every Parquet row with an image is masked into a Parquet shard of the same keys; the
    # rows img2dataset wrote for images it could not fetch are skipped, with its own reason, and
    # the run succeeds
    assert pq_result.returncode == 0, pq_result.stdout + pq_result.stderr
    assert f"{len(pq_images)} succeeded, 0 failed, {len(FAILING)} skipped" in pq_result.stdout, pq_result.stdout
    assert sorted(os.listdir(pq_out)) == ["00000.parquet", "_jobs"]
    (job,) = (pq_out / "_jobs").iterdir()
    rows = [json.loads(line) for line in (job / "manifest.jsonl").read_text().splitlines()]
    assert [row["key"] for row in rows] == list(pq_rows)  # every row, in the shard's order
    skipped = {row["key"]: row["error"] for row in rows if row["status"] == "skipped"}
    assert set(skipped) == set(FAILING)
    for key, status in FAILING.items():
        assert f"status {status!r}: {pq_rows[key]['error_message']}" in skipped[key], skipped
    table = pq.read_table(pq_out / "00000.parquet")
    assert table.column("key").to_pylist() == [key for key in pq_rows if key in pq_images]
    for row in table.to_pylist():
        stem = file_out / "parquet" / f"{row['key']}.jpg"
        assert row["mask"] == stem.with_name(stem.name + ".mask.png").read_bytes()
        assert row["raw"] == stem.with_name(stem.name + ".raw.png").read_bytes()
        assert json.loads(row["json"])["source"] == f"{pq_in / '00000.parquet'}#{row['key']}"


def test_a_worker_masks_img2dataset_shards_from_s3_as_a_run_does(
        tmp_path, made, run_env, s3_bucket, job_env, start_worker):
    # Given img2dataset's WebDataset output folder on S3, as it wrote it (the tar, its Parquet of
    # metadata and its stats), and the same images masked by `clipmask run` as files
    wds_in, _, wds_images, _, _ = made
    s3 = boto3.client("s3")
    for name in os.listdir(wds_in):
        s3.put_object(Bucket=s3_bucket, Key=f"i2d/{name}", Body=(wds_in / name).read_bytes())
    files, file_out = tmp_path / "files", tmp_path / "out-files"
    files.mkdir()
    for key, data in wds_images.items():
        (files / f"{key}.jpg").write_bytes(data)
    ran = clipmask("run", str(files), "--out", str(file_out), *OPTIONS, env=run_env)
    assert ran.returncode == 0, ran.stdout + ran.stderr

    # When the folder is submitted as a job, and a real worker masks it one image at a time
    worker = start_worker("i2d", CLIPMASK_BATCH_SIZE="1")
    submitted = clipmask("submit", f"s3://{s3_bucket}/i2d/", "--out", f"s3://{s3_bucket}/masks/",
                         "--prompt", "dog", env=job_env)
    assert submitted.returncode == 0, submitted.stderr
    status = wait_for(submitted.stdout.strip().splitlines()[-1], job_env, worker=worker)

    # Then the tar is the job's one shard (its Parquet beside it is metadata, not a shard), every
    # sample masked into an output shard that webdataset reads back with img2dataset's keys, in
    # its order, each mask that of the run over the same image
    assert (status["state"], status["shards"], status["chunks"]) == ("finished", True, 1), status
    assert (status["succeeded"], status["failed"], status["skipped"]) == (len(wds_images), 0, 0), status
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="masks/")["Contents"]
    assert [o["Key"] for o in listed if not o["Key"].startswith("masks/_jobs/")] == ["masks/00000.tar"]
    (tmp_path / "00000.tar").write_bytes(s3.get_object(Bucket=s3_bucket, Key="masks/00000.tar")["Body"].read())
    written = read_shard(tmp_path / "00000.tar")
    assert list(written) == list(wds_images)
    for key, sample in written.items():
        stem = file_out / f"{key}.jpg"
        mask, raw = (np.asarray(Image.open(io.BytesIO(sample[role]))) for role in ("mask.png", "raw.png"))
        assert np.array_equal(mask, np.asarray(Image.open(stem.with_name(stem.name + ".mask.png")))), key
        run_raw = np.asarray(Image.open(stem.with_name(stem.name + ".raw.png"))).astype(int)
        assert np.abs(raw.astype(int) - run_raw).max() <= 1, key  # float noise at most
        assert json.loads(sample["json"])["source"] == f"s3://{s3_bucket}/i2d/00000.tar#{key}"
    assert worker.terminate() == 0, worker.log()
