"""``tasks.preview``: the static HTML page of a finished job, from a local folder or S3 (moto)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter

import boto3
import numpy as np
import pytest
from PIL import Image

from tasks.preview import sample_manifest, write_preview
from tests.preview_helpers import (
    GREY,
    Item,
    LocalTarget,
    S3Target,
    encode,
    halves,
    parse_page,
    rows_mask,
    sample_items,
    write_job,
)
from tests.processes import clipmask
from tests.services import FaultyProxy
from tests.test_parquet import images, keyed_table, parquet_bytes
from tests.test_shards import samples, tar_bytes


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    if request.param == "local":
        return LocalTarget(tmp_path / "store")
    return S3Target(request.getfixturevalue("s3_bucket"))


def percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def tiny_items(count: int) -> list[Item]:
    items = []
    for i in range(count):
        image = halves((16, 12), GREY, (i * 8, 0, 255 - i * 8))
        items.append(Item(f"many/{i:03d}.png", image, rows_mask(image.size, (i % 10) / 10), encode(image, "PNG")))
    return items


def test_preview_shows_a_sample_with_upright_thumbnails_overlays_and_failures(target, tmp_path):
    items = sample_items()
    corrupt = Item("c/corrupt.jpg", halves((64, 64), GREY, GREY), rows_mask((64, 64), 0.75), b"")
    job = write_job(target, "job1", items, corrupt=[corrupt])
    out = tmp_path / "page"
    # When a person previews the job's DST
    page = write_preview(job.dest, out_dir=str(out))
    # Then the page is index.html in the folder asked for, and parses
    assert page == out / "index.html"
    html_text = page.read_text(encoding="utf-8")
    parsed = parse_page(page)
    # And every image it references is a JPEG next to it, thumbnail then overlay per good card
    assert all(re.fullmatch(r"(thumbs|overlays)/\d+\.jpg", src) for src in parsed.images), parsed.images
    assert len(parsed.images) == 2 * len(items)
    for item, thumb_src, overlay_src in zip(items, parsed.images[0::2], parsed.images[1::2]):
        thumb, drawn = Image.open(out / thumb_src), Image.open(out / overlay_src)
        assert thumb.format == drawn.format == "JPEG" and thumb.size == drawn.size
        assert max(thumb.size) <= 256
        # upright: same shape and content as the upright image (EXIF orientation applied)
        width, height = item.upright.size
        assert abs(thumb.size[0] / thumb.size[1] - width / height) < 0.03, (item.key, thumb.size)
        expected = np.asarray(item.upright.resize(thumb.size, Image.Resampling.BILINEAR), dtype=float)
        assert np.abs(np.asarray(thumb, dtype=float) - expected).mean() < 12, item.key
        # the overlay is red where the mask is on (edges left aside), unchanged elsewhere
        on = np.asarray(Image.fromarray(item.mask).resize(thumb.size, Image.Resampling.NEAREST)) == 255
        inner_on = on & np.roll(on, 4, 0) & np.roll(on, -4, 0)
        inner_off = ~on & ~np.roll(on, 4, 0) & ~np.roll(on, -4, 0)
        diff = np.asarray(drawn, dtype=float) - np.asarray(thumb, dtype=float)
        assert diff[inner_on][:, 0].mean() > 40, item.key
        assert np.abs(diff[inner_off]).mean() < 8, item.key
    # And each sampled image's coverage, name (escaped) and the prompts are shown
    for item in [*items, corrupt]:
        assert percent(item.coverage) in parsed.all_text, item.key
    assert "big image & <co>.jpg" in parsed.all_text and "big image &amp; &lt;co&gt;.jpg" in html_text
    assert "a <b>cat</b>" in parsed.all_text and "<b>cat</b>" not in html_text
    assert "tree & bush" in parsed.all_text
    # And the model the masks came from, its random weights said
    assert "/models/tiny (revision sha256:0123456789abcdef, fp32) - RANDOM demo weights" in parsed.all_text
    # And the failure's error, escaped
    assert "ImageDecodeError: corrupt <data> & truncated #0" in parsed.all_text
    assert "corrupt &lt;data&gt; &amp; truncated" in html_text and "<data>" not in html_text
    # And the counts and the histogram of the sample's coverage (the corrupt image's metadata is fine)
    for text in ("5 succeeded", "1 failed", "1 skipped", "7 total", "job1"):
        assert text in parsed.all_text
    assert parsed.svgs == 1 and parsed.rects == 20
    assert "coverage of 5 sampled images" in parsed.all_text
    # And the corrupt source is a card with its preview error, not an exception
    assert len(parsed.cards) == 5 and sum("error" in card.split() for card in parsed.cards) == 1
    assert "c/corrupt.jpg" in parsed.all_text
    assert "preview error: cannot preview the image: not an image" in parsed.all_text
    # And the page is self-contained: no script, no external URL
    assert "<script" not in html_text and "http://" not in html_text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html_text


def test_limit_caps_cards_and_failures_with_a_seeded_uniform_sample(tmp_path):
    target = LocalTarget(tmp_path / "store")
    items = tiny_items(30)
    job = write_job(target, "many1", items, failures=8)
    pages = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        page = write_preview(job.dest, out_dir=str(tmp_path / name), limit=5, seed=seed)
        parsed = parse_page(page)
        assert len(parsed.cards) == 5 and len(parsed.images) == 10
        assert parsed.all_text.count("ImageDecodeError: corrupt") == 5 and "5 of 8 shown" in parsed.all_text
        assert "coverage of 5 sampled images" in parsed.all_text
        pages[name] = re.findall(r"many/\d{3}\.png", parsed.all_text)
    assert pages["a"] == pages["b"] and pages["a"] != pages["c"]
    assert pages["a"] == sorted(pages["a"])  # cards come in manifest order
    assert max(pages["a"] + pages["c"]) > "many/004.png"  # a sample, not the first five


def test_sample_manifest_is_uniform_and_keeps_failures():
    rows = [{"source": f"s{i}", "status": "succeeded"} for i in range(10)]
    rows += [{"source": f'f{i} "status": "succeeded"', "status": "failed", "error": "x"} for i in range(4)]
    lines = [json.dumps(row, separators=(",", ":") if i % 2 else None).encode() + b"\n"
             for i, row in enumerate(rows)] + [b"\n", b"not json\n", b'{"status": "lost"}\n']
    seen = Counter()
    for seed in range(2000):
        sample = sample_manifest(iter(lines), limit=3, seed=seed)
        seen.update(row["source"] for row in sample.succeeded)
        assert [row["source"][:2] for row in sample.failed] == ["f0", "f1", "f2"]
    assert sample.counts == {"succeeded": 10, "failed": 4, "skipped": 0} and sample.bad_lines == 2
    assert all(abs(seen[f"s{i}"] / 2000 - 0.3) < 0.05 for i in range(10)), seen


def test_default_job_is_the_most_recently_finished_one(tmp_path, monkeypatch):
    target = LocalTarget(tmp_path / "store")
    items = tiny_items(3)
    write_job(target, "0ld", items, finished_at="2024-05-01T12:00:00+00:00")
    job = write_job(target, "newer", items[:2], finished_at="2024-05-02T08:00:00Z")
    write_job(target, "aaa", items, finished_at="2024-04-01T00:00:00+00:00")
    target.put("masks/_jobs/zzz-running/job.json", b"{}")  # no summary yet: not a candidate
    monkeypatch.chdir(tmp_path)
    page = write_preview(job.dest)
    assert str(page) == "preview-newer/index.html" and (tmp_path / page).exists()
    assert "job newer" in parse_page(tmp_path / page).all_text


def test_unknown_or_unfinished_job_and_empty_dest_say_what_to_fix(target, tmp_path):
    job = write_job(target, "a1b2c3", tiny_items(2))
    with pytest.raises(LookupError, match="jobs there: a1b2c3"):
        write_preview(job.dest, out_dir=str(tmp_path / "p"), job_id="nope")
    with pytest.raises(LookupError, match="a1b2c3"):
        write_preview(job.dest, out_dir=str(tmp_path / "p"), job_id="../../etc")
    target.put("masks/_jobs/d4e5/job.json", b"{}")
    with pytest.raises(FileNotFoundError, match="still running"):
        write_preview(job.dest, out_dir=str(tmp_path / "p"), job_id="d4e5")
    with pytest.raises(FileNotFoundError, match="no job under"):
        write_preview(target.folder("photos"), out_dir=str(tmp_path / "p"))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y --no-install-recommends chromium)")
def test_page_renders_in_a_headless_browser(tmp_path):
    target = LocalTarget(tmp_path / "store")
    job = write_job(target, "shot1", sample_items(), failures=2)
    page = write_preview(job.dest, out_dir=str(tmp_path / "page"))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
                    page.resolve().as_uri()], check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 200  # text, bars and photos, not a blank page
    red = (pixels[:, 0] > 150) & (pixels[:, 1] < 120) & (pixels[:, 0] - pixels[:, 2] > 40)
    assert red.sum() > 500  # the overlays' tint is on screen
    bars = (np.abs(pixels - (59, 130, 196)).sum(axis=1) < 20)
    assert bars.sum() > 100  # the histogram's bars


@pytest.mark.parametrize("shard_format", ["webdataset", "parquet"])
def test_a_job_over_shards_is_previewed_reading_each_needed_shard_once(shard_format, s3_bucket, s3_env, moto_server,
                                                                       tiny_model, tmp_path):
    # Given three input shards on S3 (tar, or Parquet with its images in a column named "img") masked
    # by `clipmask run` into three output shards
    s3 = boto3.client("s3")
    suffix = ".tar" if shard_format == "webdataset" else ".parquet"
    for shard in range(3):
        if suffix == ".tar":
            data = tar_bytes(samples(shard))
        else:
            data = parquet_bytes(keyed_table(images(3, shard), [f"s{shard}r{i}" for i in range(3)], column="img"))
        s3.put_object(Bucket=s3_bucket, Key=f"in/{shard:05d}{suffix}", Body=data)
    env = {**s3_env, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}
    column = ["--image-column", "img"] if suffix == ".parquet" else []
    result = clipmask("run", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "--prompt", "dog",
                      "--device", "cpu", "--quiet", *column, env=env)
    assert result.returncode == 0 and "9 succeeded, 0 failed" in result.stdout, result.stdout + result.stderr
    dest = f"s3://{s3_bucket}/out/"

    # When the job is previewed, four of its nine samples drawn, S3 behind a proxy that logs every request
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        shown = clipmask("preview", dest, "--out", str(tmp_path / "page"), "--limit", "4", "--seed", "3",
                         env={**env, "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        seen = list(proxy.seen)
    assert shown.returncode == 0, shown.stderr
    parsed = parse_page(tmp_path / "page" / "index.html")
    shards = sorted(set(re.findall(rf"\b(\d{{5}}){re.escape(suffix)}#\S+", parsed.all_text)))
    reads = Counter(path.split("?")[0].split(f"/{s3_bucket}/", 1)[-1] for method, path in seen
                    if method == "GET" and path.split("?")[0].endswith(suffix))
    # Then every card has its thumbnail and its overlay, valid JPEGs beside the page
    assert len(parsed.cards) == 4 and not [card for card in parsed.cards if "error" in card.split()]
    assert "cannot preview" not in parsed.all_text and len(parsed.images) == 8
    for src in parsed.images:
        with Image.open(tmp_path / "page" / src) as image:
            assert image.format == "JPEG" and max(image.size) <= 256
            image.load()
    # And each shard the cards come from was read once (one GET) for the images, and its output
    # shard once for the masks and records; no other shard was read
    assert 1 < len(shards) <= 3
    assert reads == {**{f"in/{shard}{suffix}": 1 for shard in shards},
                     **{f"out/{shard}{suffix}": 1 for shard in shards}}, reads

    # When one of those output shards is gone
    gone = shards[0]
    s3.delete_object(Bucket=s3_bucket, Key=f"out/{gone}{suffix}")
    parsed = parse_page(write_preview(dest, out_dir=str(tmp_path / "again"), limit=4, seed=3))
    # Then only its cards are error cards, saying which shard could not be read; the others are drawn
    errors = sum("error" in card.split() for card in parsed.cards)
    assert 0 < errors < 4 and len(parsed.images) == 2 * (4 - errors)
    assert parsed.all_text.count(f"shard {dest}{gone}{suffix} could not be read") == errors
