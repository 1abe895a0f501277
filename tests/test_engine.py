"""The mask engine against straightforward references, on a tiny random CLIPSeg.

The references are written out here the slow, obvious way: one full model forward per prompt
(the seed node's way), then resize, sigmoid, max, min. The engine shares one backbone pass
across prompts and batches images and prompts; its masks must match within float noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.images import SIZES, noise_image
from tests.reference import reference_mask
from worker.engine import MaskEngine
from worker.errors import DeviceError, ImageTooLargeError, ImageTooSmallError, ModelUnavailableError
from worker.spec import MaskSpec

TOLERANCE = 1e-4
@pytest.fixture(scope="module")
def images():
    return [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


@pytest.mark.parametrize("profile", ["default", "masquerade"])
@pytest.mark.parametrize("normalize", [False, True])
def test_masks_match_one_full_forward_per_prompt(engine, images, profile, normalize):
    # Given mixed-size images and three positive prompts plus a negative
    spec = MaskSpec.from_text("a cat|dog|the sky", "tree", threshold=0.5, normalize=normalize, profile=profile)
    # When the engine masks them in one call (shared backbone, batched decoder)
    results = engine.predict(images, spec)
    # Then every raw mask equals the per-prompt reference and the threshold is >=
    for image, result in zip(images, results, strict=True):
        expected = reference_mask(engine, image, spec)
        assert result.raw.shape == (image.height, image.width)
        np.testing.assert_allclose(result.raw, expected, atol=TOLERANCE)
        assert 0.0 < result.raw.std()  # the tiny model gives masks with structure
        decided = np.abs(expected - spec.threshold) > TOLERANCE
        assert np.array_equal(result.binary[decided], (expected >= spec.threshold)[decided])


@pytest.mark.parametrize("profile", ["default", "masquerade"])
def test_another_model_layout_matches_its_reference(tmp_path_factory, images, profile):
    # Given a CLIPSeg with 32-pixel patches, extract_layers out of order and late conditioning
    from worker.random_model import build_random_clipseg

    path = tmp_path_factory.mktemp("models") / "tiny32"
    other = MaskEngine.load(str(build_random_clipseg(path, shape="tiny32")), device="cpu")
    spec = MaskSpec.from_text("a cat|dog", "tree", profile=profile)
    # When / Then its masks match its own full forward too
    for image, result in zip(images, other.predict(images, spec), strict=True):
        np.testing.assert_allclose(result.raw, reference_mask(other, image, spec), atol=TOLERANCE)


def test_an_image_gets_the_same_mask_alone_or_in_a_batch(engine, images):
    spec = MaskSpec.from_text("a cat", "dog")
    together = engine.predict(images, spec)
    for image, batched in zip(images, together):
        alone = engine.predict([image], spec)[0]
        np.testing.assert_allclose(alone.raw, batched.raw, atol=TOLERANCE)


def test_backbone_stops_at_the_deepest_layer_the_decoder_reads(engine, images):
    # Given hooks counting how often each vision encoder layer runs
    layers = engine.loaded.model.clip.vision_model.encoder.layers
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    try:
        # When four prompts are masked on two images of different sizes (one backbone batch)
        engine.predict(images[:2], MaskSpec.from_text("a|b|c", "d"))
    finally:
        for hook in hooks:
            hook.remove()
    # Then layers up to max(extract_layers) ran once, and deeper ones never
    deepest = max(engine.loaded.model.config.extract_layers)
    assert deepest < len(layers) - 1
    assert calls == [1] * (deepest + 1) + [0] * (len(layers) - deepest - 1)


def test_text_embeddings_are_cached_per_prompt_and_bounded(engine, images, monkeypatch):
    text_model = engine.loaded.model.clip.text_model
    seen = []
    hook = text_model.register_forward_hook(lambda _m, args, kwargs, _o: seen.append(1), with_kwargs=True)
    try:
        engine.predict(images[:1], MaskSpec.from_text("cache me|and me"))
        first = len(seen)
        engine.predict(images[1:2], MaskSpec.from_text("and me|cache me"))
        assert first == 1 and len(seen) == 1  # second call: no text forward at all
        monkeypatch.setattr("worker.engine.TEXT_CACHE_SIZE", 2)
        engine.predict(images[:1], MaskSpec.from_text("x|y|z"))
        assert len(engine._text_cache) == 2
    finally:
        hook.remove()


def test_masquerade_refuses_images_over_max_side_naming_the_option(engine):
    spec = MaskSpec.from_text("a cat", profile="masquerade", max_side=100)
    with pytest.raises(ImageTooLargeError, match="--max-side"):
        engine.check(noise_image(101, 20, 0), spec)
    engine.check(noise_image(100, 20, 0), spec)  # at the bound: accepted
    engine.check(noise_image(4000, 20, 0), MaskSpec.from_text("a cat", max_side=100))  # default: unbounded


def test_masquerade_refuses_images_smaller_than_a_patch_and_default_takes_them(engine):
    tiny_image = noise_image(10, 6, 0)
    with pytest.raises(ImageTooSmallError, match="--profile default"):
        engine.check(tiny_image, MaskSpec.from_text("a cat", profile="masquerade"))
    (result,) = engine.predict([tiny_image], MaskSpec.from_text("a cat"))
    assert result.raw.shape == (6, 10)


def test_missing_model_directory_says_how_to_provide_weights(tmp_path):
    with pytest.raises(ModelUnavailableError, match="CLIPMASK_MODEL"):
        MaskEngine.load(str(tmp_path / "no-such-model"), device="cpu")


def test_unreachable_hub_model_says_how_to_provide_weights(monkeypatch):
    # HF_HUB_OFFLINE is read at import; set the parsed value (an empty cache, no network)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="hf download"):
        MaskEngine.load("CIDAS/clipseg-rd64-refined", device="cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_malformed_device_is_rejected_with_the_accepted_forms(tiny_model, device):
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        MaskEngine.load(tiny_model, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_on_a_machine_without_gpus_is_a_clear_error(tiny_model):
    with pytest.raises(DeviceError, match="use cpu or auto"):
        MaskEngine.load(tiny_model, device="cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cuda_stays_close_to_fp32(tiny_model, images, precision):
    spec = MaskSpec.from_text("a cat|dog", "tree")
    cpu = MaskEngine.load(tiny_model, device="cpu").predict(images, spec)
    gpu = MaskEngine.load(tiny_model, device="cuda", precision=precision).predict(images, spec)
    for a, b in zip(cpu, gpu):
        assert np.abs(a.raw - b.raw).mean() < 0.01
