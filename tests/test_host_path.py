"""The cheap host path (reduced JPEG decode, EXIF without copies, direct preprocessing, fused
postprocessing, fast PNGs) against straightforward full-resolution references."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_png

from storage import open_store
from tests.reference import reference_mask
from worker import dominant, postprocess, preprocess
from worker.codecs import decode_image, decode_scaled, encode_png, to_rgb
from worker.engine import MaskResult, output_roles
from worker.errors import ImageDecodeError, ImageTooLargeError
from worker.outputs import encode_masks
from worker.postprocess import combine, finish, render
from worker.spec import MaskSpec

EXIF_ORIENTATION = 0x0112
SPEC = MaskSpec.from_text("a cat|dog|the sky", "tree")


# --- helpers ------------------------------------------------------------------


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo stand-in whose quadrants differ (so any flip or turn shows) with smooth detail."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    pixels = np.empty((height, width, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(1, 6, 2).tolist() + [rng.uniform(0, 6)]
        pixels[..., c] = 0.5 + 0.2 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    pixels[: height // 2, : width // 2, 0] += 0.3  # top-left reddish
    pixels[height // 2:, width // 2:, 2] += 0.3  # bottom-right bluish
    pixels += rng.normal(0, 0.03, pixels.shape)
    return np.clip(pixels * 255, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, orientation: int = 1, **options) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_decode(data: bytes) -> Image.Image:
    """The decode as it was: full size, ``ImageOps.exif_transpose``, then RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def grey_levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def assert_masks_match(result: MaskResult, expected: np.ndarray, threshold: float = 0.5) -> None:
    """Raw pixels within one grey level of ``round(expected * 255)``; the thresholded mask equal
    wherever ``expected`` is more than float noise from the threshold."""
    assert result.raw_pixels().shape == expected.shape
    assert grey_levels(result.raw_pixels(), np.rint(expected * 255)) <= 1
    decided = np.abs(expected - threshold) > 1e-4
    assert np.array_equal((result.binary_pixels() == 255)[decided], (expected >= threshold)[decided])
    assert set(np.unique(result.binary_pixels())) <= {0, 255}


def smooth_logits(prompts: int, seed: int, side: int = 44) -> torch.Tensor:
    """Blobs over a sloping background, like CLIPSeg's logits."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, side)
    y, x = grid[:, None], grid[None, :]
    planes = []
    for _ in range(prompts):
        a, b = (torch.rand(2, generator=generator) - 0.5).tolist()
        plane = -5.0 + 3 * a * x + 3 * b * y
        for _ in range(2):
            cx, cy = torch.rand(2, generator=generator).tolist()
            plane = plane + 9.0 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
        planes.append(plane)
    return torch.stack(planes)


# --- decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_full_decode_is_unchanged_for_every_exif_orientation(orientation):
    # Given a JPEG with each EXIF orientation
    data = jpeg(photo(90, 60), orientation)
    # When decoded at full size, Then the pixels are exactly the old exif_transpose decode's
    decoded = decode_image(data)
    expected = reference_decode(data)
    assert decoded.mode == "RGB" and decoded.size == expected.size
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("width, height, scale", [(1600, 1500, 2), (3000, 2900, 4), (6000, 5800, 8), (1400, 1200, 1)])
def test_reduced_jpeg_decode_keeps_the_full_upright_size_and_the_picture(orientation, width, height, scale):
    # Given a stored (un-rotated) JPEG of width x height with an EXIF orientation
    pixels = photo(width, height)
    data = jpeg(pixels, orientation)
    # When decoded for a 704x704 minimum
    image, size = decode_scaled(data, (704, 704))
    # Then the size is the full upright one, taken from the header
    full_w, full_h = upright_size(width, height, orientation)
    assert size == (full_w, full_h)
    # And the image is the largest DCT reduction still at least 704 on each side, upright
    assert image.mode == "RGB"
    assert image.size == (-(-full_w // scale), -(-full_h // scale))
    assert min(image.size) >= 704
    reference = reference_decode(data).resize(image.size, Image.Resampling.BOX)
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert difference.mean() < 4, "the reduced picture is not the upright full one"


def test_reduced_decode_asks_the_rotated_minimum_of_a_rotated_jpeg():
    # Given a landscape JPEG stored 3000x1500 whose EXIF turns it to portrait (1500x3000)
    data = jpeg(photo(3000, 1500), 6)
    # When it must keep 700 wide and 1400 high once upright
    image, size = decode_scaled(data, (700, 1400))
    # Then the reduction honours both sides of the upright image: 1/2, not 1/4
    assert size == (1500, 3000)
    assert image.size == (750, 1500)


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(photo(1600, 1500)[..., 0], "L"),
    lambda: Image.fromarray(np.dstack([photo(1500, 1450), np.full((1450, 1500), 90, np.uint8)]), "RGBA"),
    lambda: Image.fromarray((photo(1500, 1420)[..., 1].astype(np.uint16) * 257)),
], ids=["grey", "rgba", "16-bit"])
def test_pngs_decode_at_full_size_exactly_as_before(make):
    # Given a large grey, RGBA or 16-bit PNG (no DCT scale to use)
    data = png(make())
    # When decoded for the default profile, Then it is the old full decode, pixel for pixel
    image, size = decode_scaled(data, (704, 704))
    expected = reference_decode(data)
    assert size == expected.size == image.size
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_reduced_decode_keeps_the_size_guard_and_decode_errors():
    data = jpeg(photo(1600, 1500))
    with pytest.raises(ImageTooLargeError, match="CLIPMASK_MAX_PIXELS"):
        decode_scaled(data, (704, 704), limit=1600 * 1500 - 1)
    with pytest.raises(ImageDecodeError):
        decode_scaled(data[: len(data) // 2], (704, 704))


def test_decode_size_per_profile(engine):
    processor = engine.loaded.processor
    assert preprocess.decode_size(SPEC, processor) == (704, 704)
    assert preprocess.decode_size(SPEC, processor, margin=1) == (352, 352)
    assert preprocess.decode_size(SPEC, processor, margin=0) is None
    assert preprocess.decode_size(MaskSpec.from_text("a", profile="masquerade"), processor) is None


def test_masquerade_decodes_at_full_resolution(engine):
    data = jpeg(photo(1600, 1200))
    image, size = engine.decode(data, MaskSpec.from_text("a", profile="masquerade"))
    assert image.size == size == (1600, 1200)


# --- preprocessing --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 480), (800, 600), (352, 352), (33, 20), (2000, 90)])
def test_direct_preprocessing_equals_the_processor_bit_for_bit(engine, size):
    image = Image.fromarray(photo(*size, seed=3))
    expected = engine.loaded.processor(images=[image], return_tensors="pt")["pixel_values"][0]
    got = preprocess.pixel_values([image], SPEC, engine.loaded.processor)[0]
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_model_input_from_a_reduced_jpeg_stays_within_a_few_grey_levels(engine):
    # Given a 3000x2250 photo: decoded at 1/4 (750x563 is not >= 704 on both sides, so 1/2)
    data = jpeg(photo(3000, 2250, seed=5))
    reduced, _ = engine.decode(data, SPEC)
    full = reference_decode(data)
    assert reduced.size == (1500, 1125)
    # When both are preprocessed, Then the 352x352 inputs differ by a few grey levels at most
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    difference = (engine.prepare(reduced, SPEC) - engine.prepare(full, SPEC)).abs() * std * 255
    assert float(difference.mean()) < 0.75
    assert float(difference.max()) < 8


# --- postprocessing ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 53), (6, 10), (44, 44), (150, 97), (300, 220)])
@pytest.mark.parametrize("negative, normalize, invert, bits", list(itertools.product(
    [False, True], [False, True], [False, True], [8, 16])))
def test_render_matches_combine_then_finish(size, negative, normalize, invert, bits, monkeypatch):
    # Small bands, so that every image spans several (normalize's extremes come from all of them)
    monkeypatch.setattr(postprocess, "BAND_VALUES", 3 * 4 * 64)
    spec = MaskSpec.from_text("a|b|c", "d" if negative else None, normalize=normalize, invert=invert,
                              raw_bits=bits, threshold=0.4)
    for logits in (smooth_logits(4, seed=1), torch.randn(4, 44, 44, generator=torch.Generator().manual_seed(2)) * 4):
        logits = logits if negative else logits[:3]
        rendered = render(logits, spec, size)
        mask, binary = finish(combine(logits, spec, size), spec)
        top = (1 << bits) - 1
        assert rendered.raw_pixels.dtype == (torch.uint8 if bits == 8 else torch.uint16)
        assert grey_levels(rendered.raw_pixels.numpy(), np.rint(mask.numpy() * top)) <= 1
        before_invert = 1 - mask if invert else mask
        decided = (before_invert - 0.4).abs() > 1e-5
        assert torch.equal((rendered.binary_pixels == 255)[decided], binary[decided])
        assert set(rendered.binary_pixels.unique().tolist()) <= {0, 255}


@pytest.mark.parametrize("bits", [8, 16])
def test_render_torch_tail_used_off_the_cpu_matches_too(monkeypatch, bits):
    # The CUDA path's steps (one band, torch's compare and casts), run here on the CPU
    monkeypatch.setattr(postprocess, "_tail_numpy", postprocess._tail_torch)
    monkeypatch.setattr(postprocess, "BAND_VALUES", 1 << 30)
    assert postprocess._pixel_dtype(16, torch.device("cuda")) == torch.int32  # no uint16 kernels there
    for invert, normalize in ((False, False), (True, True)):
        spec = MaskSpec.from_text("a|b", "c", invert=invert, normalize=normalize, raw_bits=bits)
        logits = smooth_logits(3, seed=8)
        rendered = render(logits, spec, (90, 70))
        mask, binary = finish(combine(logits, spec, (90, 70)), spec)
        assert grey_levels(rendered.raw_pixels.numpy(), np.rint(mask.numpy() * ((1 << bits) - 1))) <= 1
        assert torch.equal(rendered.binary_pixels == 255, binary)


def test_render_runs_of_rows_on_large_upscales():
    # Upscaling 22 rows to 300 takes the per-run path: same result as combine + finish
    logits = smooth_logits(3, seed=4, side=22)
    spec = MaskSpec.from_text("a|b", "c")
    rendered = render(logits, spec, (300, 410))
    mask = finish(combine(logits, spec, (300, 410)), spec)[0]
    assert grey_levels(rendered.raw_pixels.numpy(), np.rint(mask.numpy() * 255)) <= 1


def _shortcut(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int], raw: bool):
    """The shortcut ``render`` builds for these logits (to check that a test goes through it)."""
    return postprocess.shortcut(postprocess.signed_logits(logits, len(spec.prompts)), len(spec.prompts), spec,
                                size, raw)


@pytest.mark.parametrize("negative, normalize, invert, bits, raw, columns", [
    (True, False, False, 8, True, 40), (True, False, False, 8, False, 40), (True, False, True, 16, True, 40),
    (False, True, False, 8, True, 40), (True, True, True, 16, True, 40), (False, False, False, 16, False, 40),
    (True, False, False, 8, True, 29)])
def test_render_takes_one_map_where_the_same_prompts_decide_and_stays_exact(negative, normalize, invert,
                                                                            bits, raw, columns, monkeypatch):
    # Given smooth logits upscaled 7 to 14 times, in bands of a few rows (each cuts runs of rows),
    # and the shortcut taken whatever share of cells cross (a limit on cost, not on exactness)
    monkeypatch.setattr(postprocess, "BAND_VALUES", 3 * 4 * 64)
    monkeypatch.setattr(dominant, "MAX_CROSSING", 1.0)
    logits = smooth_logits(4, seed=6, side=40)[:, :, :columns].contiguous()
    logits = logits if negative else logits[:3]
    spec = MaskSpec.from_text("a|b|c", "d" if negative else None, normalize=normalize, invert=invert,
                              raw_bits=bits, threshold=0.4)
    size = (300, 410)
    # (the shortcut is taken, and prompts cross in some cells, which are computed prompt by prompt)
    shortcut = _shortcut(logits, spec, size, raw)
    assert shortcut.pays and shortcut.share > 0.01 and len(shortcut.y) > 0
    # When rendered, Then both masks are those of combine + finish
    rendered = render(logits, spec, size, raw=raw)
    mask, binary = finish(combine(logits, spec, size), spec)
    if raw:
        assert grey_levels(rendered.raw_pixels.numpy(), np.rint(mask.numpy() * ((1 << bits) - 1))) <= 1
    else:
        assert rendered.raw_pixels is None
    before_invert = 1 - mask if invert else mask
    decided = (before_invert - 0.4).abs() > 1e-5
    assert torch.equal((rendered.binary_pixels == 255)[decided], binary[decided])
    assert 0 < int(binary.sum()) < binary.numel()


@pytest.mark.parametrize("raw", [True, False])
def test_render_below_the_floor_any_prompt_may_decide(raw):
    # Given three prompts of noisy background far below 0.5/255, where the largest changes from
    # one logit to the next, and one bright blob in the first
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 30, 30, generator=generator) * 0.5 - 12.0
    grid = torch.linspace(0, 1, 30)
    logits[0] += 18.0 * torch.exp(-((grid[:, None] - 0.4) ** 2 + (grid[None, :] - 0.6) ** 2) / 0.03)
    logits[3] = -12.0  # the negative never wins
    spec = MaskSpec.from_text("a|b|c", "d")
    size = (240, 330)
    # (only the floor makes the shortcut pay: without it nearly every cell crosses)
    assert not _shortcut(logits, dataclasses.replace(spec, normalize=True), size, raw).pays  # no floor
    assert _shortcut(logits, spec, size, raw).pays
    # When rendered, Then the pixels are those of combine + finish: the background all 0
    rendered = render(logits, spec, size, raw=raw)
    mask, binary = finish(combine(logits, spec, size), spec)
    if raw:
        assert grey_levels(rendered.raw_pixels.numpy(), np.rint(mask.numpy() * 255)) <= 1
    decided = (mask - 0.5).abs() > 1e-5
    assert torch.equal((rendered.binary_pixels == 255)[decided], binary[decided])
    assert 0 < int(binary.sum()) < binary.numel() // 4


@pytest.mark.parametrize("options", [dict(blur_sigma=1.5), dict(grow=2), dict(profile="masquerade"),
                                     dict(grow=-1, invert=True, normalize=True)])
def test_render_of_other_specs_is_the_straightforward_path(options):
    spec = MaskSpec.from_text("a|b", "c", **options)
    logits = smooth_logits(3, seed=5)
    rendered = render(logits, spec, (61, 47))
    mask, binary = finish(combine(logits, spec, (61, 47)), spec)
    assert torch.equal(rendered.raw_pixels, (mask * 255).round().to(torch.uint8))
    assert torch.equal(rendered.binary_pixels, binary.to(torch.uint8) * 255)
    assert torch.equal(rendered.mask, mask)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("invert, normalize", [(False, False), (True, False), (False, True)])
def test_render_without_raw_makes_only_the_thresholded_mask(threshold, invert, normalize):
    # Given logits whose mask reaches exactly 1.0 in float32 somewhere (sigmoid of 20 and of -20)
    scale, offset = torch.tensor([2.0, 3.0])[:, None, None], torch.tensor([12.0, -8.0])[:, None, None]
    logits = smooth_logits(2, seed=6) * scale + offset
    spec = MaskSpec.from_text("a", "b", threshold=threshold, invert=invert, normalize=normalize)
    # When only the thresholded mask is made (compared in logit space where that is exact)
    rendered = render(logits, spec, (40, 30), raw=False)
    # Then it is the reference's, away from float noise at the threshold
    assert rendered.raw_pixels is None
    mask, binary = finish(combine(logits, spec, (40, 30)), spec)
    before_invert = 1 - mask if invert else mask
    decided = (before_invert - threshold).abs() > 1e-5
    assert torch.equal((rendered.binary_pixels == 255)[decided], binary[decided])
    assert bool((before_invert == 1.0).any()) and bool((before_invert < 0.3).any())


# --- the engine end to end ------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("width, height", [(120, 80), (700, 500)])
def test_engine_masks_of_small_jpegs_match_the_full_resolution_reference(engine, orientation, width, height):
    # Given a JPEG too small to decode reduced (less than 704 on a side), with an EXIF orientation
    data = jpeg(photo(width, height, seed=orientation), orientation)
    # When the engine decodes, prepares and masks it
    image, size = engine.decode(data, SPEC)
    (result,) = engine.predict([image], SPEC, [engine.prepare(image, SPEC)], [size])
    # Then its masks are the reference's (old decode, processor, one forward per prompt)
    reference = reference_decode(data)
    assert size == reference.size == upright_size(width, height, orientation)
    assert_masks_match(result, reference_mask(engine, reference, SPEC))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_engine_masks_of_a_reduced_jpeg_have_the_full_size(engine, orientation, monkeypatch):
    # Given a 1600x1500 JPEG, decoded at 1/2 for the default profile
    data = jpeg(photo(1600, 1500, seed=10 + orientation), orientation)
    image, size = engine.decode(data, SPEC)
    assert image.size == upright_size(800, 750, orientation) and size == upright_size(1600, 1500, orientation)
    # When masked, Then the masks are at the full upright size, and equal to the reference
    # computed at full size from the same model input
    (result,) = engine.predict([image], SPEC, [engine.prepare(image, SPEC)], [size])
    assert result.raw_pixels().shape == (size[1], size[0])
    logits = engine._forward(engine.prepare(image, SPEC)[None], SPEC)[0]
    mask = finish(combine(logits, SPEC, (size[1], size[0])), SPEC)[0].numpy()
    assert_masks_match(result, mask)
    # And with reduction off, the engine is the full-resolution reference itself
    monkeypatch.setattr(engine, "decode_margin", 0)
    full_image, full_size = engine.decode(data, SPEC)
    assert full_image.size == full_size == size
    (exact,) = engine.predict([full_image], SPEC, [engine.prepare(full_image, SPEC)], [full_size])
    reference = reference_mask(engine, reference_decode(data), SPEC)
    assert_masks_match(exact, reference)
    # And reduced decoding moves the raw mask by little on average (the tiny random model
    # amplifies input differences far more than a trained one; see docs/performance.md, "Speed")
    assert np.abs(result.raw_pixels().astype(float) - exact.raw_pixels()).mean() < 2


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(photo(90, 70)[..., 0], "L"),
    lambda: Image.fromarray(np.dstack([photo(80, 64), np.full((64, 80), 0, np.uint8)]), "RGBA"),
    lambda: Image.fromarray(photo(72, 96)[..., 2].astype(np.uint16) * 257),
], ids=["grey", "rgba", "16-bit"])
def test_engine_masks_of_pngs_match_the_reference(engine, make):
    data = png(make())
    image, size = engine.decode(data, SPEC)
    (result,) = engine.predict([image], SPEC, [engine.prepare(image, SPEC)], [size])
    assert_masks_match(result, reference_mask(engine, reference_decode(data), SPEC))


def test_mask_result_floats_are_made_on_first_use_and_agree_with_the_pixels(engine):
    image = Image.fromarray(photo(64, 48))
    (result,) = engine.predict([image], SPEC)
    assert result._raw is None  # the fused path made pixels only
    assert grey_levels(result.raw_pixels(), np.rint(result.raw * 255)) <= 1
    assert result.raw.dtype == np.float32 and result.binary.dtype == bool
    assert np.array_equal(result.binary, result.binary_pixels() == 255)
    assert result.coverage == pytest.approx(float(result.binary.mean()))
    assert grey_levels(result.raw_pixels(16), np.rint(result.raw * 65535)) == 0  # from the floats


# --- encoding and outputs ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io, for libpng
@pytest.mark.parametrize("bits", [8, 16])
def test_output_pngs_decode_exactly_with_pillow_and_libpng(engine, bits):
    spec = MaskSpec.from_text("a cat", "dog", raw_bits=bits)
    (result,) = engine.predict([Image.fromarray(photo(70, 50))], spec)
    blobs = encode_masks(result, spec)
    assert set(blobs) == {"mask", "raw"}
    for role, expected in (("mask", result.binary_pixels()), ("raw", result.raw_pixels(bits))):
        with Image.open(io.BytesIO(blobs[role])) as decoded:
            assert decoded.format == "PNG" and decoded.size == (70, 50)
            assert decoded.mode == "L" if role == "mask" or bits == 8 else decoded.mode.startswith("I")
            assert np.array_equal(np.asarray(decoded).astype(np.int64), expected.astype(np.int64))
        libpng = decode_png(torch.frombuffer(bytearray(blobs[role]), dtype=torch.uint8))
        assert np.array_equal(libpng[0].numpy().astype(np.int64), expected.astype(np.int64))


def test_encode_png_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8 or uint16"):
        encode_png(np.zeros((3, 3), dtype=np.float32))


def test_a_spec_asking_only_for_the_mask_encodes_only_the_mask(engine):
    mask_only = dataclasses.replace(SPEC, outputs=("mask",))
    assert output_roles(mask_only) == ("mask",) and output_roles(SPEC) == ("mask", "raw")
    (result,) = engine.predict([Image.fromarray(photo(60, 40))], mask_only)
    assert result._raw_pixels == {}  # no raw quantization was made
    assert set(encode_masks(result, mask_only)) == {"mask"}


def test_pipeline_records_the_full_size_of_a_reduced_rotated_jpeg(engine, tmp_path):
    from tasks.pipeline import Pipeline

    # Given a folder with a 1600x1500 JPEG (decoded at 1/2) that EXIF turns to portrait
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.jpg").write_bytes(jpeg(photo(1600, 1500, seed=7), 6))
    source, dest = open_store(str(tmp_path / "in")), open_store(str(tmp_path / "out"))
    # When the pipeline masks it
    (outcome,) = list(Pipeline(engine, source, dest, SPEC).run(["big.jpg"]))
    # Then the masks and the record have the full upright size
    assert outcome.status == "succeeded", outcome.error
    record = json.loads((tmp_path / "out" / "big.jpg.json").read_text())
    assert (record["width"], record["height"]) == (1500, 1600)
    for suffix in ("mask", "raw"):
        with Image.open(tmp_path / "out" / f"big.jpg.{suffix}.png") as mask:
            assert mask.size == (1500, 1600) and mask.mode == "L"
