"""Device decoding (``worker/gpu_decode.py``): ``load_input`` + ``predict_prepared``.

The logic runs here with ``device="cpu"``: torchvision decodes JPEG on the CPU with libjpeg-turbo,
as Pillow does (same integer IDCT, same fancy chroma upsampling), so a device-decoded image must
equal Pillow's pixel for pixel, and the default profile's pixels must equal ``prepare``'s bit for
bit. The ``gpu`` tests compare a CUDA engine (nvJPEG, fp16) with the CPU engine; they skip
without a GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.codecs import decode_scaled
from worker.engine import MaskEngine, MaskResult
from worker.errors import ImageDecodeError, ImageTooLargeError
from worker.gpu_decode import Prepared, decode_batch
from worker.spec import MaskSpec

SPEC = MaskSpec.from_text("a cat|dog", "tree")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo(width: int, height: int, seed: int, noise: float = 12.0) -> np.ndarray:
    """Smooth gradients plus noise, with a corner marker so orientation mistakes show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = pixels + rng.normal(0, noise, pixels.shape)
    pixels[: height // 4, : width // 5] = (250, 20, 20)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg(width: int = 64, height: int = 48, seed: int = 0, orientation: int = 1, noise: float = 12.0,
         **options) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(photo(width, height, seed, noise))
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def png(width: int = 50, height: int = 70, seed: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(width, height, seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def bogus_huffman(data: bytes) -> bytes:
    """A JPEG whose header Pillow reads but whose Huffman table no decoder accepts."""
    at = data.index(b"\xff\xc4") + 5  # marker, length (2), class/id: then the 16 code counts
    return data[:at] + b"\xff" * 16 + data[at + 16:]


@pytest.fixture(scope="module")
def device_engine(tiny_model):
    """A CPU engine with device decoding forced on: the device is the CPU."""
    return MaskEngine.load(tiny_model, device="cpu", batch_size=3, device_decode=True)


def host_pixels(engine, data: bytes, spec: MaskSpec = SPEC) -> torch.Tensor:
    decoded = engine.decode(data, spec)
    return engine.prepare(decoded.image, spec)


def test_device_decoding_is_off_by_default_on_the_cpu(engine):
    assert engine.device_decode is False
    prepared = engine.load_input(jpeg(), SPEC)
    assert prepared.encoded is None and torch.equal(prepared.pixels, host_pixels(engine, jpeg()))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_like_pillow(device_engine, orientation):
    data = jpeg(64, 48, seed=orientation, orientation=orientation)
    prepared = device_engine.load_input(data, SPEC)
    expected = decode_scaled(data, None)
    assert prepared.encoded is not None and prepared.encoded.orientation == orientation
    assert prepared.size == expected.size
    (image,) = decode_batch([prepared], torch.device("cpu"))
    # Both are libjpeg-turbo with the same settings: measured identical; allow one grey level on
    # a thousandth of the values in case another libjpeg-turbo build rounds a chroma edge apart.
    difference = np.abs(image.permute(1, 2, 0).numpy().astype(int) - np.asarray(expected.image, dtype=int))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000


def test_device_preprocessing_equals_the_host_path(device_engine):
    items = [jpeg(64, 48, 0), jpeg(64, 48, 1), jpeg(200, 120, 2, orientation=6), jpeg(33, 33, 3)]
    prepared = [device_engine.load_input(data, SPEC) for data in items]
    from worker.preprocess import tensor_pixel_values

    tensors = tensor_pixel_values(decode_batch(prepared, torch.device("cpu")), device_engine.loaded.processor)
    for data, tensor in zip(items, tensors):
        assert torch.equal(tensor, host_pixels(device_engine, data))


def test_predict_prepared_equals_predict(device_engine, engine):
    files = [jpeg(64, 48, 0), png(), jpeg(50, 70, 2, orientation=8), jpeg(64, 48, 3, progressive=True),
             jpeg(120, 90, 4)]
    prepared = [device_engine.load_input(data, SPEC) for data in files]
    assert [p.encoded is not None for p in prepared] == [True, False, True, True, True]
    results = device_engine.predict_prepared(prepared, SPEC)
    decoded = [engine.decode(data, SPEC) for data in files]
    expected = engine.predict([d.image for d in decoded], SPEC, [engine.prepare(d.image, SPEC) for d in decoded],
                              [d.size for d in decoded])
    for got, want, data in zip(results, expected, decoded):
        assert isinstance(got, MaskResult) and got.raw.shape == (data.size[1], data.size[0])
        np.testing.assert_allclose(got.raw, want.raw, atol=1e-6)
        assert np.array_equal(got.binary_pixels(), want.binary_pixels())
    assert {"decode", "preprocess", "inference"} <= set(results[0].timings_ms)


def test_predict_prepared_of_host_prepared_inputs_is_predict(engine):
    files = [jpeg(64, 48, 0), png(), jpeg(200, 120, 2)]
    prepared = [engine.load_input(data, SPEC) for data in files]
    assert all(isinstance(p, Prepared) and p.encoded is None for p in prepared)
    assert set(prepared[0].timings_ms) == {"decode", "preprocess"}
    decoded = [engine.decode(data, SPEC) for data in files]
    expected = engine.predict([d.image for d in decoded], SPEC, [p.pixels for p in prepared], [d.size for d in decoded])
    for got, want in zip(engine.predict_prepared(prepared, SPEC), expected):
        assert np.array_equal(got.raw_pixels(), want.raw_pixels())
        assert np.array_equal(got.binary_pixels(), want.binary_pixels())


def test_a_corrupt_jpeg_fails_alone_and_the_batch_goes_on(device_engine):
    bad = bogus_huffman(jpeg(64, 48, 9))
    with pytest.raises(ImageDecodeError) as host_error:
        decode_scaled(bad, None)
    prepared = [device_engine.load_input(data, SPEC) for data in (jpeg(64, 48, 0), bad, jpeg(50, 70, 1))]
    assert prepared[1].encoded is not None  # the header is fine: the decoder finds the fault
    results = device_engine.predict_prepared(prepared, SPEC)
    assert isinstance(results[0], MaskResult) and isinstance(results[2], MaskResult)
    assert isinstance(results[1], ImageDecodeError) and str(results[1]) == str(host_error.value)
    alone = device_engine.predict_prepared([prepared[0]], SPEC)[0]
    assert np.array_equal(alone.raw_pixels(), results[0].raw_pixels())


def test_files_the_device_should_not_decode_take_the_host_path(device_engine):
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    grey = io.BytesIO()
    Image.new("L", (40, 30), 77).save(grey, format="JPEG")
    for data in (png(), cmyk.getvalue(), grey.getvalue()):
        prepared = device_engine.load_input(data, SPEC)
        assert prepared.encoded is None and torch.equal(prepared.pixels, host_pixels(device_engine, data))
    masquerade = MaskSpec.from_text("a cat", profile="masquerade")
    prepared = device_engine.load_input(jpeg(), masquerade)
    assert prepared.encoded is None and torch.equal(prepared.pixels, host_pixels(device_engine, jpeg(), masquerade))


def test_a_truncated_jpeg_fails_in_load_input_as_on_the_host_path(device_engine):
    truncated = jpeg(64, 48, 5)[:-300]
    with pytest.raises(ImageDecodeError) as host_error:
        decode_scaled(truncated, None)
    with pytest.raises(ImageDecodeError) as error:
        device_engine.load_input(truncated, SPEC)
    assert str(error.value) == str(host_error.value)
    with pytest.raises(ImageDecodeError, match="not an image Pillow can read"):
        device_engine.load_input(b"not an image", SPEC)


def test_the_pixel_limit_applies_before_decoding(device_engine, monkeypatch):
    monkeypatch.setenv("CLIPMASK_MAX_PIXELS", "1000")
    data = jpeg(64, 48)
    with pytest.raises(ImageTooLargeError) as host_error:
        decode_scaled(data, None)
    with pytest.raises(ImageTooLargeError, match="CLIPMASK_MAX_PIXELS") as error:
        device_engine.load_input(data, SPEC)
    assert str(error.value) == str(host_error.value)


# --- on a GPU -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_engine(tiny_model):
    return MaskEngine.load(tiny_model, device="cuda")


def gpu_files() -> list[bytes]:
    """Photo-like files: less pixel noise than the CPU tests' images, whose chroma noise is where
    nvJPEG and libjpeg differ most (``test_cuda_decode_is_close_to_pillow`` prints by how much)."""
    return ([jpeg(64, 48, 0, noise=3), jpeg(640, 480, 1, noise=3), jpeg(200, 120, 2, noise=3, progressive=True),
             png()] + [jpeg(96, 64, 10 + o, orientation=o, noise=3) for o in (3, 6, 8)])


@pytest.mark.gpu
@needs_cuda
def test_cuda_defaults_are_fp16_and_device_decoding(cuda_engine, monkeypatch):
    assert cuda_engine.dtype == torch.float16 and cuda_engine.model_info["precision"] == "fp16"
    assert cuda_engine.device_decode is True
    assert cuda_engine.load_input(jpeg(), SPEC).encoded is not None
    monkeypatch.setenv("CLIPMASK_DEVICE_DECODE", "0")
    off = MaskEngine(cuda_engine.loaded, cuda_engine.device)
    assert off.device_decode is False and off.load_input(jpeg(), SPEC).encoded is None


@pytest.mark.gpu
@needs_cuda
def test_cuda_device_decoding_matches_the_cpu_engine(cuda_engine, engine):
    files = gpu_files()
    prepared = [cuda_engine.load_input(data, SPEC) for data in files]
    assert sum(p.encoded is not None for p in prepared) == len(files) - 1  # all but the PNG
    results = cuda_engine.predict_prepared(prepared, SPEC)
    expected = engine.predict_prepared([engine.load_input(data, SPEC) for data in files], SPEC)
    for got, want in zip(results, expected):
        assert isinstance(got, MaskResult) and got.raw.shape == want.raw.shape
        assert np.abs(got.raw - want.raw).mean() < 0.01
        assert np.count_nonzero(got.binary != want.binary) < 0.01 * want.binary.size


@pytest.mark.gpu
@needs_cuda
def test_cuda_decode_is_close_to_pillow(cuda_engine):
    files = [jpeg(640, 480, 1), jpeg(96, 64, 11, orientation=6)]
    prepared = [cuda_engine.load_input(data, SPEC) for data in files]
    for data, image in zip(files, decode_batch(prepared, cuda_engine.device)):
        assert image.is_cuda
        difference = np.abs(image.permute(1, 2, 0).cpu().numpy().astype(int)
                            - np.asarray(decode_scaled(data, None).image, dtype=int))
        print(f"nvJPEG vs Pillow: max {difference.max()}, mean {difference.mean():.3f} grey levels")
        # nvJPEG need not upsample chroma as libjpeg's "fancy" upsampling does: on this noisy image,
        # nearest instead of linear upsampling alone moves pixels by about 2 grey levels on average
        # (simulated); a wrong orientation moves them by tens.
        assert difference.mean() < 6.0


@pytest.mark.gpu
@needs_cuda
def test_host_prepared_batches_are_pinned_on_cuda(cuda_engine, monkeypatch):
    pinned = []
    original = torch.Tensor.pin_memory

    def recording(self, *args, **kwargs):
        pinned.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", recording)
    off = MaskEngine(cuda_engine.loaded, cuda_engine.device, device_decode=False)
    results = off.predict_prepared([off.load_input(data, SPEC) for data in (jpeg(), png())], SPEC)
    assert all(isinstance(r, MaskResult) for r in results) and pinned


@pytest.mark.gpu
@needs_cuda
def test_a_corrupt_jpeg_fails_alone_in_a_cuda_batch(cuda_engine):
    bad = bogus_huffman(jpeg(64, 48, 9))
    prepared = [cuda_engine.load_input(data, SPEC) for data in (jpeg(64, 48, 0), bad, jpeg(640, 480, 1))]
    results = cuda_engine.predict_prepared(prepared, SPEC)
    assert isinstance(results[0], MaskResult) and isinstance(results[2], MaskResult)
    assert isinstance(results[1], ImageDecodeError)
