"""``--precision bf16`` and ``int8`` on CPU against fp32, on the tiny random CLIPSeg.

Tolerances, from measuring these images (default and masquerade profiles, 3 prompts + 1 negative):
the raw masks of bf16 and int8 differ from fp32's by at most 0.0017 on average and 0.024 at any
pixel, and no pixel farther than 0.05 from the threshold flips. The bounds below leave about 3x
room on the mean and 2x on the maximum (other CPUs run other kernels: int8 without VNNI, bf16
without AVX512-BF16), and allow one flip in a thousand decided pixels.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.ao.nn.quantized import dynamic as quantized_dynamic

from tests.images import SIZES, noise_image
from tests.processes import clipmask
from worker.devices import resolve_dtype, resolve_precision
from worker.engine import MaskEngine
from worker.errors import DeviceError
from worker.model import _quick_gelu_as_silu
from worker.spec import MaskSpec

MEAN_ABS_TOLERANCE = 0.005
MAX_ABS_TOLERANCE = 0.05
#: Pixels whose fp32 mask is farther than this from the threshold count as decided.
MARGIN = 0.05
DECIDED_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def images():
    return [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def engines(tiny_model):
    return {precision: MaskEngine.load(tiny_model, device="cpu", precision=precision, batch_size=3)
            for precision in ("fp32", "bf16", "int8")}


@pytest.mark.parametrize("profile", ["default", "masquerade"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cpu_precision_masks_stay_close_to_fp32(engines, images, precision, profile):
    # Given three prompts and a negative
    spec = MaskSpec.from_text("a cat|dog|the sky", "tree", threshold=0.5, profile=profile)
    # When fp32 and the lower precision mask the same mixed-size images
    reference = engines["fp32"].predict(images, spec)
    results = engines[precision].predict(images, spec)
    # Then the masks have the images' shapes and stay close to fp32's
    for image, ref, result in zip(images, reference, results, strict=True):
        assert result.raw.shape == result.binary.shape == (image.height, image.width)
        assert result.raw.dtype == np.float32
        difference = np.abs(result.raw - ref.raw)
        assert difference.mean() < MEAN_ABS_TOLERANCE
        assert difference.max() < MAX_ABS_TOLERANCE
        decided = np.abs(ref.raw - spec.threshold) > MARGIN
        assert decided.mean() > 0.5  # the check below covers most of the image
        agreement = (result.binary[decided] == ref.binary[decided]).mean()
        assert agreement >= DECIDED_AGREEMENT


def test_bf16_runs_the_whole_model_in_bfloat16(engines):
    engine = engines["bf16"]
    assert engine.dtype == torch.bfloat16
    assert {p.dtype for p in engine.loaded.model.parameters()} == {torch.bfloat16}
    assert engine.loaded.precision == "bf16"


def test_int8_quantizes_the_vision_encoder_linears_only(engines):
    model = engines["int8"].loaded.model
    encoder = model.clip.vision_model.encoder
    # Every Linear of every vision encoder layer (q, k, v, out, fc1, fc2) is a dynamic int8 Linear
    quantized = [m for m in encoder.modules() if isinstance(m, quantized_dynamic.Linear)]
    assert len(quantized) == 6 * len(encoder.layers)
    assert not [m for m in encoder.modules() if type(m) is torch.nn.Linear]
    for module in quantized:
        assert module.weight().dtype == torch.qint8
        assert module.weight().qscheme() == torch.per_channel_affine
    # The text encoder and the decoder keep their float Linear layers
    for part in (model.clip.text_model, model.decoder):
        assert not [m for m in part.modules() if isinstance(m, quantized_dynamic.Linear)]
        assert [m for m in part.modules() if type(m) is torch.nn.Linear]
    assert engines["int8"].dtype == torch.float32  # activations and the rest stay fp32
    assert engines["int8"].loaded.precision == "int8"


def test_quick_gelu_as_silu_is_the_same_function(tiny_model, images):
    # Given a fp32 engine whose vision MLPs get the rewrite that int8 applies before quantizing
    spec = MaskSpec.from_text("a cat|dog", "tree")
    reference = MaskEngine.load(tiny_model, device="cpu").predict(images, spec)
    engine = MaskEngine.load(tiny_model, device="cpu")
    for layer in engine.loaded.model.clip.vision_model.encoder.layers:
        _quick_gelu_as_silu(layer.mlp)
        assert isinstance(layer.mlp.activation_fn, torch.nn.SiLU)
    # Then its masks equal the untouched model's within float noise
    for ref, result in zip(reference, engine.predict(images, spec), strict=True):
        np.testing.assert_allclose(result.raw, ref.raw, atol=1e-5)


def test_auto_is_fp32_on_cpu_and_fp16_on_cuda():
    assert resolve_precision(torch.device("cpu")) == "fp32"
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.float32
    assert resolve_precision(torch.device("cuda", 0)) == "fp16"
    assert resolve_dtype(torch.device("cpu"), "int8") == torch.qint8
    assert resolve_dtype(torch.device("cuda", 0), "bf16") == torch.bfloat16


def test_fp16_on_cpu_is_refused_naming_the_alternatives(tiny_model):
    with pytest.raises(DeviceError, match="fp16 is not supported on cpu.*use fp32 \\(auto\\), int8"):
        MaskEngine.load(tiny_model, device="cpu", precision="fp16")


def test_int8_on_cuda_is_refused_saying_to_use_fp16():
    # resolve_precision only reads device.type: no GPU is needed to check the rule
    with pytest.raises(DeviceError, match="int8 is CPU-only.*use fp16"):
        resolve_precision(torch.device("cuda", 0), "int8")


@pytest.mark.parametrize("precision", ["int4", "half", ""])
def test_unknown_precision_lists_the_accepted_values(precision):
    with pytest.raises(DeviceError, match="auto, fp32, fp16, bf16, int8"):
        resolve_precision(torch.device("cpu"), precision)


def test_clipmask_run_with_int8(tmp_path, tiny_model, engines):
    # Given a small folder of images
    source, out = tmp_path / "images", tmp_path / "out"
    source.mkdir()
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES[:3])]
    for i, image in enumerate(images):
        image.save(source / f"img{i}.png")
    env = {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}
    # When a user runs clipmask with --precision int8 on the CPU
    result = clipmask("run", str(source), "--out", str(out), "--prompt", "a cat|dog", "--negative", "tree",
                      "--device", "cpu", "--precision", "int8", "--quiet", env=env)
    # Then it succeeds without torch's quantization deprecation noise, and its raw masks are close to fp32's
    assert result.returncode == 0, result.stderr
    assert "3 succeeded, 0 failed" in result.stdout
    assert "deprecated" not in result.stderr, result.stderr
    spec = MaskSpec.from_text("a cat|dog", "tree")
    for i, ref in enumerate(engines["fp32"].predict(images, spec)):
        raw = np.asarray(Image.open(out / f"img{i}.png.raw.png")).astype(float) / 255.0
        assert raw.shape == ref.raw.shape
        assert np.abs(raw - ref.raw).mean() < MEAN_ABS_TOLERANCE
        assert json.loads((out / f"img{i}.png.json").read_text())["prompts"] == ["a cat", "dog"]


def test_clipmask_run_refuses_fp16_on_cpu(tmp_path, tiny_model):
    source = tmp_path / "images"
    source.mkdir()
    noise_image(40, 30, 0).save(source / "a.png")
    env = {**os.environ, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}
    result = clipmask("run", str(source), "--out", str(tmp_path / "out"), "--prompt", "dog",
                      "--device", "cpu", "--precision", "fp16", "--quiet", env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--precision fp16 is not supported on cpu" in result.stderr
