"""``--outputs rle``: the thresholded mask as COCO RLE in each record, read by pycocotools itself.

Real ``clipmask run`` processes on the tiny model, on a local folder and on S3 (moto) behind a
proxy that logs every request; the preview of a job that wrote no PNG.
"""

from __future__ import annotations

import io
import json
import re

import boto3
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from tasks.preview import write_preview
from tests.images import encoded, noise_image, png
from tests.processes import clipmask
from tests.services import FaultyProxy

#: Upright sizes (W, H), odd ones among them, and an image stored sideways with EXIF orientation 6.
SIZES = [(64, 48), (33, 33), (51, 77), (97, 13)]
ROTATED = ("rotated.jpg", (60, 40))  # stored 60x40, upright 40x60


@pytest.fixture
def run_env(tiny_model):
    import os

    return {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}


def sideways_jpeg(size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    out = io.BytesIO()
    noise_image(*size, seed=9).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.fixture
def sized_images(tmp_path):
    """A folder of PNGs of ``SIZES`` and the sideways JPEG; their upright (W, H) by relative key."""
    root = tmp_path / "images"
    upright = {}
    for i, (width, height) in enumerate(SIZES):
        key = f"sizes/{width}x{height}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(encoded(noise_image(width, height, seed=i), "PNG"))
        upright[key] = (width, height)
    name, (width, height) = ROTATED
    (root / name).write_bytes(sideways_jpeg((width, height)))
    upright[name] = (height, width)
    return root, upright


def test_each_records_rle_decodes_to_the_mask_png_of_the_same_run(sized_images, tmp_path, run_env):
    root, upright = sized_images
    out = tmp_path / "out"
    # When a folder is masked with the PNG mask and its RLE
    result = clipmask("run", str(root), "--out", str(out), "--prompt", "a cat", "--outputs", "mask,rle", "--quiet",
                      env=run_env)
    assert result.returncode == 0, result.stderr
    for key, (width, height) in upright.items():
        record = json.loads((out / f"{key}.json").read_text())
        mask = np.asarray(Image.open(out / f"{key}.mask.png"))
        # Then pycocotools decodes each record's RLE to exactly the mask.png's pixels, upright, full size
        decoded = coco_mask.decode(record["rle"])
        assert mask.shape == (height, width) and record["rle"]["size"] == [height, width]
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, (mask == 255).astype(np.uint8)), key
        # And the record lists the files written; the RLE is in it, not beside it
        assert set(record["outputs"]) == {"mask", "metadata"} and isinstance(record["rle"]["counts"], str)
        assert record["coverage"] == pytest.approx(decoded.mean())
    assert not list(out.rglob("*.raw.png"))


def test_rle_alone_on_s3_costs_one_get_and_one_put_per_image_and_no_png(s3_bucket, s3_env, moto_server,
                                                                         tiny_model):
    s3 = boto3.client("s3")
    keys = [f"in/set{i % 2}/img{i:02d}.png" for i in range(6)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png(i, size=(24 + i, 16 + 2 * i)))
    args = ["run", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "--prompt", "a cat",
            "--outputs", "rle", "--device", "cpu", "--quiet"]
    # Given S3 behind a proxy that logs every request
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}
        # When the images are masked with --outputs rle alone
        result = clipmask(*args, env=env)
        seen = list(proxy.seen)
    assert result.returncode == 0 and "6 succeeded, 0 failed" in result.stdout, result.stderr
    # Then each image cost exactly one GET (itself) and one PUT (its record), and nothing else named it
    for key in keys:
        name = key.removeprefix("in/")
        about = [(method, path.split("?")[0].split(f"/{s3_bucket}/", 1)[-1]) for method, path in seen
                 if re.search(rf"/{re.escape(name)}(\.|$|\?)", path.split("?")[0])]
        assert sorted(about) == [("GET", key), ("PUT", f"out/{name}.json")], about
    # And no PNG was written; each record says so, and holds the mask at the image's size
    written = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert not {key for key in written if key.endswith(".png")}
    for i, key in enumerate(keys):
        record = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"out/{key[3:]}.json")["Body"].read())
        assert set(record["outputs"]) == {"metadata"}
        assert coco_mask.decode(record["rle"]).shape == (record["height"], record["width"]) == (16 + 2 * i, 24 + i)
    # And a run that skips what exists finds every image up to date from its record
    again = clipmask(*args, "--skip-existing", env={**s3_env, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and "6 up to date" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("command", ["run", "submit"])
def test_bad_outputs_are_refused_naming_what_the_option_takes(sized_images, tmp_path, run_env, command):
    root, _ = sized_images
    result = clipmask(command, str(root), "--out", str(tmp_path / "out"), "--prompt", "cat", "--outputs", "rle,foo",
                      env=run_env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--outputs must be one or more of mask, raw, rle, comma-separated (e.g. mask,raw or mask,rle), " \
           "got 'rle,foo'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_preview_of_an_rle_only_job_draws_the_decoded_masks(sized_images, tmp_path, run_env):
    root, upright = sized_images
    out, page_dir = tmp_path / "out", tmp_path / "page"
    # Given a job that wrote records with RLE and no PNG
    result = clipmask("run", str(root), "--out", str(out), "--prompt", "a cat", "--outputs", "rle", "--quiet",
                      env=run_env)
    assert result.returncode == 0 and not list(out.rglob("*.png")), result.stderr
    # When it is previewed
    html = write_preview(str(out), out_dir=str(page_dir)).read_text()
    # Then every image has its overlay, drawn from the decoded mask: no card says it could not
    assert "cannot preview" not in html
    overlays = sorted((page_dir / "overlays").iterdir())
    assert len(overlays) == len(upright)
    for path in overlays:
        thumb = Image.open(page_dir / "thumbs" / path.name)
        assert Image.open(path).size == thumb.size
