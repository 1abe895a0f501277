"""JPEG decoding on the engine's device (nvJPEG on CUDA), batched, for the default profile.

The host path decodes each file with Pillow in a loader thread and prepares its (3, S, S) pixel
tensor there. On a GPU that host work, not the model, sets the pace, so a JPEG can instead go to
the device still encoded:

1. ``load_input`` (loader threads) reads only the header with Pillow: format, size, the
   decompression-bomb limit and the EXIF orientation. A baseline or progressive YCbCr JPEG whose
   data ends with its EOI marker is kept encoded (``Prepared.encoded``); anything else (PNG,
   WebP, CMYK, grey, MPO, a truncated file, the masquerade profile) takes the host path and
   arrives as ``Prepared.pixels``, exactly as ``decode`` + ``check`` + ``prepare`` make them.
2. ``predict_prepared`` (the inference thread) decodes a batch's encoded files in one
   ``torchvision.io.decode_jpeg`` call on the device, applies each orientation there (flips,
   transposes), runs the default profile's direct preprocessing on the device
   (``preprocess.tensor_pixel_values``) and hands all pixels to the engine's batched forward and
   postprocess. If the batched call fails (it fails as a whole), each file is decoded alone; a file
   the device decoder rejects is decoded by Pillow instead, and only if that fails too is it that
   image's error (the same ``ImageDecodeError`` as the host path's).

Full-resolution device decoding differs from the host path only where the host decodes a large
JPEG at a reduced DCT scale (docs/performance.md, "Speed"), and by the decoders' own rounding (nvJPEG's IDCT
and chroma upsampling are not libjpeg's). On the CPU, torchvision's decoder is libjpeg-turbo like
Pillow's, so the tests run this code with ``device="cpu"``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from worker import codecs, preprocess
from worker.errors import ImageError
from worker.spec import MaskSpec

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, with a warning per call.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")

#: A JPEG is kept for the device only if its EOI marker is within this many bytes of the end: a
#: truncated file then goes to Pillow, which refuses it, where nvJPEG might decode garbage.
EOI_WINDOW = 1024


class Encoded(NamedTuple):
    """A JPEG file left encoded for the device, and the EXIF orientation to apply after decoding."""

    data: bytes
    orientation: int


class Prepared(NamedTuple):
    """One input, ready for ``MaskEngine.predict_prepared``.

    ``size`` is the (W, H) of the upright full-resolution image (the masks' size). Exactly one of
    ``pixels`` (the CPU (3, S, S) tensor of the host path) and ``encoded`` is set. ``timings_ms``:
    what ``load_input`` spent (``decode`` and ``preprocess`` on the host path, ``header`` when
    the file was left encoded).
    """

    size: tuple[int, int]
    pixels: torch.Tensor | None = None
    encoded: Encoded | None = None
    timings_ms: dict | None = None


def load_input(engine, data: bytes, spec: MaskSpec) -> Prepared:
    """``MaskEngine.load_input``: header only for a device-decodable JPEG, else the host path."""
    started = time.perf_counter()
    if engine.device_decode and spec.profile == "default" and preprocess.has_direct(engine.loaded.processor):
        header = codecs.read_header(data)
        if device_decodable(header, data):
            return Prepared(header.size, encoded=Encoded(data, header.orientation),
                            timings_ms={"header": _ms(started)})
    image, size = engine.decode(data, spec)
    engine.check(image, spec)
    decoded = time.perf_counter()
    pixels = engine.prepare(image, spec)
    return Prepared(size, pixels=pixels, timings_ms={"decode": _ms(started, decoded), "preprocess": _ms(decoded)})


def device_decodable(header: codecs.Header, data: bytes) -> bool:
    """A JPEG whose decode on the device equals (within the decoders' rounding) Pillow's: three
    YCbCr components (Pillow's "RGB" without an Adobe marker saying the components are RGB),
    not a multi-picture file, and complete (its EOI marker at the end)."""
    return (header.format == "JPEG" and header.mode == "RGB" and header.info.get("adobe_transform", 1) != 0
            and data.rfind(b"\xff\xd9", max(0, len(data) - EOI_WINDOW)) >= 0)


def decode_batch(items: list[Prepared], device: torch.device) -> list[torch.Tensor | Exception]:
    """Upright uint8 (3, H, W) RGB tensors on ``device`` for ``items`` (each with ``encoded``),
    or each one's error. One batched decoder call; one call per file if that fails."""
    buffers = [torch.frombuffer(bytearray(item.encoded.data), dtype=torch.uint8) for item in items]
    try:
        decoded: list = _decode(buffers, device)
    except Exception:  # noqa: BLE001 - nvJPEG fails a batch as a whole: find the culprit
        decoded = []
        for buffer in buffers:
            try:
                decoded.append(_decode([buffer], device)[0])
            except Exception as err:  # noqa: BLE001 - this file alone
                decoded.append(err)
    out: list[torch.Tensor | Exception] = []
    for item, image in zip(items, decoded, strict=True):
        if not isinstance(image, Exception):
            image = upright(image, item.encoded.orientation)
            if tuple(image.shape) != (3, item.size[1], item.size[0]):
                image = ValueError(f"decoded {tuple(image.shape)}, the header says {item.size}")
        out.append(_host_decode(item.encoded.data, device, image) if isinstance(image, Exception) else image)
    return out


def _decode(buffers: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)


def _host_decode(data: bytes, device: torch.device, error: Exception) -> torch.Tensor | Exception:
    """Pillow's decode of a file the device decoder refused, moved to ``device``; or the error."""
    try:
        image = codecs.decode_scaled(data, None).image
    except ImageError as err:
        return err
    log.debug("device decoder refused a JPEG Pillow reads (%s); decoded on the host", error)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for EXIF orientation 1 to 8 (``codecs._UPRIGHT``'s
    transposes: 2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise,
    7 transverse, 8 quarter turn counter-clockwise)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


def predict_prepared(engine, items: list[Prepared], spec: MaskSpec) -> list:
    """``MaskEngine.predict_prepared``: device-decode the encoded items, then the engine's batches."""
    results: list = [None] * len(items)
    pixels = [item.pixels for item in items]
    timings: list[dict] = [{} for _ in items]
    encoded = [i for i, item in enumerate(items) if item.pixels is None]
    for i in encoded:
        if items[i].encoded is None:
            results[i] = ValueError("a Prepared input has neither pixels nor encoded data")
        elif spec.profile != "default":
            results[i] = ValueError(f"device decoding serves the default profile, not {spec.profile!r}")
    encoded = [i for i in encoded if results[i] is None]
    if encoded:
        started = time.perf_counter()
        images = decode_batch([items[i] for i in encoded], engine.device)
        decoded = time.perf_counter()
        good = [(i, image) for i, image in zip(encoded, images, strict=True) if not isinstance(image, Exception)]
        for i, image in zip(encoded, images, strict=True):
            if isinstance(image, Exception):
                results[i] = image
        prepared = preprocess.tensor_pixel_values([image for _, image in good], engine.loaded.processor)
        share = {"decode": _ms(started, decoded) / len(encoded), "preprocess": _ms(decoded) / max(1, len(good))}
        for (i, _), tensor in zip(good, prepared, strict=True):
            pixels[i], timings[i] = tensor, dict(share)
    live = [i for i, result in enumerate(results) if result is None]
    if encoded:  # device tensors and host tensors in one batch: all on the device
        pixels = [p.to(engine.device, non_blocking=True) if p is not None else None for p in pixels]
    masks = engine._predict_pixels([pixels[i] for i in live], [items[i].size for i in live], spec)
    for i, result in zip(live, masks, strict=True):
        result.timings_ms.update(timings[i])
        results[i] = result
    return results


def _ms(start: float, end: float | None = None) -> float:
    return ((time.perf_counter() if end is None else end) - start) * 1000.0
