"""Logits -> masks (``worker/postprocess.py``) against straightforward hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from worker.postprocess import blur, combine, finish, grow, normalize
from worker.spec import MaskSpec

SIZE = (37, 53)  # (H, W): not square, not a multiple of the 22x22 logits


def _logits(prompts: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(prompts, 22, 22, generator=generator) * 3


def _reference_combine(logits, n_positive, profile, size):
    """docs/design.md, "Mask semantics", steps 3-4, one prompt at a time, spelled out."""
    probabilities = []
    for prompt_logits in logits:
        x = prompt_logits[None, None].float()
        if profile == "default":
            up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(x, size=size, mode="nearest")
        probabilities.append(torch.sigmoid(up[0, 0]))
    positive = torch.stack(probabilities[:n_positive]).max(dim=0).values
    if len(probabilities) == n_positive:
        return positive
    negative = torch.stack(probabilities[n_positive:]).max(dim=0).values
    return torch.minimum(positive, 1 - negative)


def _spec(**options) -> MaskSpec:
    return MaskSpec.from_text("thing", **options)


# --- combine -------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "masquerade"])
def test_combine_positives_and_negatives_matches_reference(profile):
    # Given logits for 3 positive and 2 negative prompts
    spec = MaskSpec.from_text("a|b|c", "x|y", profile=profile)
    logits = _logits(5)
    # When combined to the image's size
    mask = combine(logits, spec, SIZE)
    # Then it is the reference: resize, sigmoid, max positives, min with 1 - max negatives
    assert mask.shape == SIZE
    assert mask.dtype == torch.float32
    torch.testing.assert_close(mask, _reference_combine(logits, 3, profile, SIZE), rtol=0, atol=1e-6)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0


@pytest.mark.parametrize("profile", ["default", "masquerade"])
def test_combine_positives_only_is_max_probability(profile):
    spec = MaskSpec.from_text("a|b", profile=profile)
    logits = _logits(2, seed=1)
    mask = combine(logits, spec, SIZE)
    torch.testing.assert_close(mask, _reference_combine(logits, 2, profile, SIZE), rtol=0, atol=1e-6)


def test_combine_profiles_upsample_differently():
    # The two profiles must not silently share one resize: bilinear vs nearest differ visibly
    logits = _logits(1, seed=2)
    default = combine(logits, MaskSpec.from_text("a"), SIZE)
    masquerade = combine(logits, MaskSpec.from_text("a", profile="masquerade"), SIZE)
    assert (default - masquerade).abs().max() > 0.05
    # nearest only ever produces values that exist in the sigmoid of the logits
    allowed = torch.sigmoid(logits[0]).flatten()
    assert torch.isin(masquerade.flatten(), allowed).all()


def test_combine_accepts_half_precision_logits():
    spec = MaskSpec.from_text("a", "b")
    logits = _logits(2, seed=3)
    mask = combine(logits.half(), spec, SIZE)
    assert mask.dtype == torch.float32
    expected = _reference_combine(logits.half().float(), 1, "default", SIZE)
    torch.testing.assert_close(mask, expected, rtol=0, atol=1e-5)


def test_negative_prompt_removes_what_it_covers():
    # Given a positive that is sure everywhere and a negative that is sure on the left half only
    logits = torch.full((2, 22, 22), -20.0)
    logits[0] = 20.0
    logits[1, :, :11] = 20.0
    mask = combine(logits, MaskSpec.from_text("a", "b", profile="masquerade"), (22, 22))
    # Then the left half is off and the right half on
    assert float(mask[:, :11].max()) < 1e-6
    assert float(mask[:, 11:].min()) > 1 - 1e-6


# --- normalize -------------------------------------------------------------------------


def test_normalize_maps_min_to_0_and_max_to_1_linearly():
    generator = torch.Generator().manual_seed(4)
    mask = torch.rand(SIZE, generator=generator) * 0.3 + 0.2
    result = normalize(mask)
    assert float(result.min()) == 0.0
    assert float(result.max()) == pytest.approx(1.0, abs=1e-6)
    expected = (mask - mask.min()) / (mask.max() - mask.min())
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
def test_normalize_constant_mask_becomes_zeros_not_nan(value):
    mask = torch.full(SIZE, value)
    result = normalize(mask)
    assert not torch.isnan(result).any()
    assert torch.equal(result, torch.zeros(SIZE))


# --- threshold (through finish) --------------------------------------------------------


def test_threshold_is_inclusive():
    # Given a mask with a pixel exactly at the threshold, one just below and one above
    mask = torch.tensor([[0.5, 0.49999, 0.75, 0.0]])
    # When finished with threshold 0.5
    raw, binary = finish(mask, _spec(threshold=0.5))
    # Then the pixel at exactly 0.5 is on (>=), the one just below is off
    assert binary.dtype == torch.bool
    assert binary.tolist() == [[True, False, True, False]]
    assert torch.equal(raw, mask)


def test_threshold_zero_turns_everything_on_and_one_only_the_certain():
    mask = torch.tensor([[0.0, 0.3, 1.0]])
    assert finish(mask, _spec(threshold=0.0))[1].all()
    assert finish(mask, _spec(threshold=1.0))[1].tolist() == [[False, False, True]]


# --- grow / shrink -----------------------------------------------------------------------


def test_grow_by_2_turns_a_single_pixel_into_a_5x5_square():
    # Given one on pixel away from the borders
    binary = torch.zeros(11, 13, dtype=torch.bool)
    binary[4, 7] = True
    # When grown by 2
    grown = grow(binary, 2)
    # Then exactly the 5x5 square around it is on
    expected = torch.zeros(11, 13, dtype=torch.bool)
    expected[2:7, 5:10] = True
    assert grown.dtype == torch.bool
    assert torch.equal(grown, expected)


def test_grow_through_finish_applies_after_threshold():
    mask = torch.zeros(9, 9)
    mask[4, 4] = 0.9
    raw, binary = finish(mask, _spec(grow=1))
    assert int(binary.sum()) == 9
    assert bool(binary[3:6, 3:6].all())
    assert torch.equal(raw, mask), "grow edits the thresholded mask only"


def test_shrink_by_1_removes_a_one_pixel_line():
    binary = torch.zeros(9, 15, dtype=torch.bool)
    binary[4, 2:13] = True  # horizontal line, 1 pixel thick
    binary[:, 7] = True  # vertical line touching the borders
    assert not grow(binary, -1).any()


def test_shrink_by_1_turns_a_5x5_square_into_3x3():
    binary = torch.zeros(11, 11, dtype=torch.bool)
    binary[3:8, 2:7] = True
    expected = torch.zeros(11, 11, dtype=torch.bool)
    expected[4:7, 3:6] = True
    assert torch.equal(grow(binary, -1), expected)


def test_grow_zero_is_identity():
    generator = torch.Generator().manual_seed(5)
    binary = torch.rand(12, 12, generator=generator) > 0.5
    assert torch.equal(grow(binary, 0), binary)


# --- invert --------------------------------------------------------------------------------


def test_invert_flips_raw_and_binary():
    generator = torch.Generator().manual_seed(6)
    mask = torch.rand(SIZE, generator=generator)
    raw, binary = finish(mask, _spec(threshold=0.4))
    raw_inv, binary_inv = finish(mask, _spec(threshold=0.4, invert=True))
    torch.testing.assert_close(raw_inv, 1 - raw)
    assert torch.equal(binary_inv, ~binary)
    assert binary.any() and (~binary).any(), "test mask must have both on and off pixels"


def test_invert_applies_after_grow():
    # A grown blob, inverted, leaves a 3x3 hole (not the inverse of the ungrown pixel, grown)
    mask = torch.zeros(9, 9)
    mask[4, 4] = 1.0
    _, binary = finish(mask, _spec(grow=1, invert=True))
    assert int((~binary).sum()) == 9
    assert not bool(binary[3:6, 3:6].any())


# --- blur ------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    return torch.outer(k1, k1)


def test_blur_spreads_a_single_spike_into_a_gaussian():
    # Given a single spike in the middle of an empty mask
    mask = torch.zeros(25, 25)
    mask[12, 12] = 1.0
    sigma = 1.5
    # When blurred
    result = blur(mask, sigma)
    # Then the spike becomes the Gaussian kernel centred on it, and its mass is kept
    kernel = _gaussian_kernel(sigma)
    r = kernel.shape[0] // 2
    expected = torch.zeros(25, 25, dtype=torch.float64)
    expected[12 - r : 12 + r + 1, 12 - r : 12 + r + 1] = kernel
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    assert float(result[12, 12]) < 0.2
    assert float(result[12, 13]) > 0 and float(result[10, 12]) > 0
    assert float(result.sum()) == pytest.approx(1.0, abs=1e-4)


def test_blur_keeps_the_mean_and_smooths():
    generator = torch.Generator().manual_seed(7)
    mask = torch.rand(64, 64, generator=generator)
    result = blur(mask, 2.0)
    assert result.shape == mask.shape
    interior = (slice(8, -8), slice(8, -8))
    assert float(result[interior].mean()) == pytest.approx(float(mask[interior].mean()), abs=0.01)
    assert float(result.std()) < 0.5 * float(mask.std())


def test_blur_sigma_zero_is_identity_through_finish():
    generator = torch.Generator().manual_seed(8)
    mask = torch.rand(SIZE, generator=generator)
    raw, binary = finish(mask, _spec(blur_sigma=0.0))
    assert torch.equal(raw, mask)
    assert torch.equal(binary, mask >= 0.5)


def test_blur_through_finish_changes_raw_mask():
    mask = torch.zeros(21, 21)
    mask[10, 10] = 1.0
    raw, _ = finish(mask, _spec(blur_sigma=1.0))
    torch.testing.assert_close(raw, blur(mask, 1.0))
    assert float(raw.max()) < 0.5


# --- order of the edits -------------------------------------------------------------------------


def test_normalize_runs_after_blur():
    # Given a spike that blur would flatten well below 1
    mask = torch.zeros(21, 21)
    mask[10, 10] = 0.8
    # When finished with blur and normalize
    raw, binary = finish(mask, _spec(blur_sigma=1.5, normalize=True, threshold=0.5))
    # Then normalize came last: the raw mask still spans exactly [0, 1]
    assert float(raw.max()) == pytest.approx(1.0, abs=1e-6)
    assert float(raw.min()) == 0.0
    expected = normalize(blur(mask, 1.5))
    torch.testing.assert_close(raw, expected)
    assert torch.equal(binary, expected >= 0.5)


def test_threshold_runs_after_normalize():
    # Given a mask whose values all lie below the threshold
    mask = torch.linspace(0.2, 0.4, 10).reshape(1, 10)  # normalized: steps of 1/9
    # Without normalize nothing is on; with normalize the upper half is (it was rescaled first)
    assert not finish(mask, _spec(threshold=0.5))[1].any()
    _, binary = finish(mask, _spec(threshold=0.5, normalize=True))
    assert binary.tolist() == [[False] * 5 + [True] * 5]


# --- many images of one size at once (worker/postprocess_batch.py), as a GPU batch runs them ----

BATCH_SPECS = [
    dict(),
    dict(negative="bg"),
    dict(invert=True, raw_bits=16),
    dict(threshold=0.3, outputs=("mask",)),  # threshold applied in logit space
]


@pytest.mark.parametrize("options", BATCH_SPECS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_rendering_a_block_of_images_matches_rendering_each(options, device):
    from worker.postprocess import render
    from worker.postprocess_batch import render_many

    spec = MaskSpec.from_text("a|b|c", **options)
    prompts = len(spec.prompts) + len(spec.negative_prompts)
    logits = torch.stack([_logits(prompts, seed) for seed in range(5)]).to(device)
    logits[3] = 0.7  # a flat mask
    raw = "raw" in spec.outputs
    blocks = list(render_many(logits, spec, SIZE, raw))
    raws = torch.cat([r for r, _ in blocks]) if raw else None
    binaries = torch.cat([b for _, b in blocks])
    for i in range(5):
        expected = render(logits[i], spec, SIZE, raw=raw)
        reference, _ = finish(combine(logits[i].cpu(), spec, SIZE), spec)  # the float mask, spelled out
        if spec.invert:
            reference = 1.0 - reference
        near = (reference - spec.threshold).abs() < 1e-5  # within float noise of the threshold
        differ = binaries[i] != expected.binary_pixels.cpu()
        assert not (differ & ~near).any(), i
        if raw:
            assert (raws[i].long() - expected.raw_pixels.cpu().long()).abs().max() <= 1, i


def test_a_block_too_large_for_memory_is_rendered_in_parts(monkeypatch):
    from worker import postprocess_batch

    monkeypatch.setattr(postprocess_batch, "BLOCK_VALUES", 2 * 4 * SIZE[0] * SIZE[1])  # 2 images a block
    spec = MaskSpec.from_text("a|b|c", "bg")
    logits = torch.stack([_logits(4, seed) for seed in range(5)])
    blocks = list(postprocess_batch.render_many(logits, spec, SIZE, raw=True))
    assert [b.shape[0] for _, b in blocks] == [2, 2, 1]
