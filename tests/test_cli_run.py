"""``clipmask run``: the embedded default, no broker, from the shell."""

from __future__ import annotations

import json
import time

import boto3
import numpy as np
import pytest
from PIL import Image

from tests.images import encoded, noise_image, sample_inputs
from tests.processes import clipmask
from tests.reference import reference_mask
from worker.codecs import decode_image
from worker.spec import MaskSpec


@pytest.fixture
def run_env(tiny_model):
    import os

    return {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("profile", ["default", "masquerade"])
@pytest.mark.parametrize("normalize", [False, True])
def test_run_writes_masks_that_match_the_seed_semantics(image_dir, tmp_path, run_env, engine, normalize, profile):
    out = tmp_path / "out"
    # When a user masks a folder with the documented command
    args = ["run", str(image_dir), "--out", str(out), "--prompt", "a cat|dog", "--negative", "tree",
            "--threshold", "0.5", "--device", "cpu", "--quiet", "--profile", profile]
    args += ["--normalize"] if normalize else []
    result = clipmask(*args, env=run_env)
    # Then it reports the corrupt image (exit 1) and writes the rest next to their relative paths
    assert result.returncode == 1, result.stderr
    assert "4 succeeded, 1 failed, 0 skipped" in result.stdout
    spec = MaskSpec.from_text("a cat|dog", "tree", normalize=normalize, profile=profile)
    for key, data in sample_inputs().items():
        if key in ("photos/broken.jpg", "notes.txt"):
            assert not (out / f"{key}.mask.png").exists()
            continue
        image = decode_image(data)
        expected = reference_mask(engine, image, spec)
        raw = np.asarray(Image.open(out / f"{key}.raw.png")).astype(int)
        mask = np.asarray(Image.open(out / f"{key}.mask.png"))
        assert np.abs(raw - np.rint(expected * 255)).max() <= 1
        decided = np.abs(expected - 0.5) > 1e-4
        assert np.array_equal(mask[decided] == 255, (expected >= 0.5)[decided])
        assert json.loads((out / f"{key}.json").read_text())["normalize"] is normalize
    (job_dir,) = (out / "_jobs").iterdir()
    rows = [json.loads(line) for line in (job_dir / "manifest.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows].count("failed") == 1
    assert "ImageDecodeError" in next(row["error"] for row in rows if row["status"] == "failed")


def test_run_reads_and_writes_s3_urls(image_dir, tmp_path, run_env, s3_env, s3_bucket):
    env = {**run_env, **s3_env}
    result = clipmask("run", str(image_dir), "--out", f"s3://{s3_bucket}/masks", "--prompt", "dog",
                      "--quiet", env=env)
    assert result.returncode == 1, result.stderr
    back = tmp_path / "back"
    result = clipmask("run", f"s3://{s3_bucket}/masks/", "--out", str(back), "--prompt", "dog", "--quiet",
                      env=env)
    # the second run reads the first run's outputs: it must skip its own .mask/.raw files
    assert result.returncode == 2 and "no images under" in result.stderr
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "masks/photos/cat.jpg.mask.png" in keys and "masks/alpha.png.json" in keys


def test_run_shows_progress_against_the_images_counted(image_dir, tmp_path, run_env):
    # The images are counted beside the work, not before it: the bar learns its total as it goes
    result = clipmask("run", str(image_dir), "--out", str(tmp_path / "out"), "--prompt", "dog", "--device", "cpu",
                      env=run_env)
    assert result.returncode == 1  # the corrupt input
    assert "5/5 [" in result.stderr, result.stderr


def test_run_skip_existing_masks_new_and_changed_images_only(image_dir, tmp_path, run_env):
    out = tmp_path / "out"
    args = ["run", str(image_dir), "--out", str(out), "--prompt", "dog", "--quiet", "--device", "cpu"]
    assert clipmask(*args, env=run_env).returncode == 1  # the corrupt image
    kept = {key: (out / key).stat().st_mtime_ns for key in ("alpha.png.json", "alpha.png.mask.png")}
    # Given one image replaced with new content and one added, after the outputs were written
    time.sleep(1.1)
    encoded_new = encoded(noise_image(128, 96, 3), "JPEG")
    (image_dir / "photos/cat.jpg").write_bytes(encoded_new)
    (image_dir / "photos/new.jpg").write_bytes(encoded_new)
    # When run again with --skip-existing
    again = clipmask(*args, "--skip-existing", env=run_env)
    # Then the two are masked (and the corrupt one tried again), the rest left alone
    assert "2 succeeded, 1 failed, 0 skipped, 3 up to date" in again.stdout, again.stdout + again.stderr
    record = json.loads((out / "photos/cat.jpg.json").read_text())
    assert (record["width"], record["height"]) == (128, 96)
    assert Image.open(out / "photos/cat.jpg.mask.png").size == (128, 96)
    assert {key: (out / key).stat().st_mtime_ns for key in kept} == kept


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "--threshold must be in [0, 1]"),
    (["--prompt", " | "], "no positive prompt: pass --prompt"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--model", "/no/such/model"], "CLIPMASK_MODEL"),
    (["--profile", "fast"], "invalid choice: 'fast'"),
])
def test_run_rejects_bad_options_with_a_fix(image_dir, tmp_path, run_env, args, message):
    base = ["run", str(image_dir), "--out", str(tmp_path / "out"), "--prompt", "dog", "--quiet"]
    result = clipmask(*base, *args, env=run_env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_the_commands(run_env):
    result = clipmask("--help", env=run_env)
    assert result.returncode == 0
    for word in ("run", "submit", "status", "worker", "CLIPMASK_MODEL", "CELERY_BROKER_URL"):
        assert word in result.stdout


def test_post_processing_options_shape_the_outputs_and_are_recorded(image_dir, tmp_path, run_env, engine):
    plain, edited = tmp_path / "plain", tmp_path / "edited"
    base = ["run", str(image_dir), "--prompt", "dog", "--quiet", "--device", "cpu"]
    clipmask(*base, "--out", str(plain), env=run_env)
    # When the user asks for a blurred, grown, inverted mask with a 16-bit raw PNG
    clipmask(*base, "--out", str(edited), "--blur", "1.5", "--grow", "2", "--invert", "--raw-bits", "16",
             env=run_env)
    meta = json.loads((edited / "photos/cat.jpg.json").read_text())
    # Then the metadata records every option
    assert meta["postprocess"] == {"blur_sigma": 1.5, "grow": 2, "invert": True} and meta["raw_bits"] == 16
    # And the raw mask is 16-bit, inverted and smoother than the plain one
    raw16 = np.asarray(Image.open(edited / "photos/cat.jpg.raw.png")).astype(float) / 65535
    raw8 = np.asarray(Image.open(plain / "photos/cat.jpg.raw.png")).astype(float) / 255
    assert Image.open(edited / "photos/cat.jpg.raw.png").mode.startswith("I")
    from PIL import ImageFilter

    blurred8 = Image.open(plain / "photos/cat.jpg.raw.png").filter(ImageFilter.GaussianBlur(1.5))
    assert np.corrcoef((1 - raw16).ravel(), np.asarray(blurred8, dtype=float).ravel())[0, 1] > 0.9
    assert np.abs(np.diff(1 - raw16, axis=1)).mean() < np.abs(np.diff(raw8, axis=1)).mean()
    # And the thresholded mask is the inverse of a grown mask: fewer "on" pixels than plain inverted
    on_edited = np.asarray(Image.open(edited / "photos/cat.jpg.mask.png")) == 255
    on_plain = np.asarray(Image.open(plain / "photos/cat.jpg.mask.png")) == 255
    assert on_edited.mean() <= (~on_plain).mean()


def test_outputs_mask_writes_only_the_thresholded_mask(image_dir, tmp_path, run_env):
    out = tmp_path / "out"
    result = clipmask("run", str(image_dir), "--out", str(out), "--prompt", "dog", "--quiet", "--outputs", "mask",
                      env=run_env)
    assert result.returncode == 1, result.stderr  # the corrupt input
    assert (out / "photos/cat.jpg.mask.png").exists() and not (out / "photos/cat.jpg.raw.png").exists()
    meta = json.loads((out / "photos/cat.jpg.json").read_text())
    assert set(meta["outputs"]) == {"mask", "metadata"} and meta["model"]["precision"] == "fp32"
    bad = clipmask("run", str(image_dir), "--out", str(out), "--prompt", "dog", "--outputs", "mask,png", env=run_env)
    assert bad.returncode == 2 and "--outputs must be one or more of mask, raw, rle" in bad.stderr
