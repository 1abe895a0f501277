"""Image -> pixel tensor, one function per profile (docs/design.md, "Preprocessing profiles").

- ``default``: the model's own CLIPSeg image processor (352x352, ImageNet mean/std), so the
  backbone cost does not depend on the image size and every image batches with every other.
- ``masquerade``: the seed node's recipe: ImageNet mean/std on the float image, then a square
  antialiased bilinear resize to max(W, H). Cost grows with the square of the side, so the side
  is bounded by ``MaskSpec.max_side``.
"""

from __future__ import annotations

import weakref
from itertools import groupby
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2 import functional as tvF

from worker.errors import ImageTooLargeError, ImageTooSmallError
from worker.spec import MaskSpec

#: The seed node hard-codes ImageNet statistics; so does the ``masquerade`` profile.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MASQUERADE_NORMALIZE = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def check_image(image: Image.Image, spec: MaskSpec, patch_size: int) -> None:
    """Raise ``ImageTooLargeError`` or ``ImageTooSmallError`` if outside the profile's bounds."""
    side = max(image.size)
    if spec.profile == "masquerade" and side < patch_size:
        raise ImageTooSmallError(
            f"image side {side}px is below the model's {patch_size}px patch, which the masquerade "
            "profile cannot mask (it does not upscale); use --profile default"
        )
    if spec.profile == "masquerade" and side > spec.max_side:
        raise ImageTooLargeError(
            f"image side {side}px is over --max-side {spec.max_side} for the masquerade profile, "
            f"whose memory grows with the square of the side; raise --max-side (CLIPMASK_MAX_SIDE) "
            "or use --profile default"
        )


#: The default profile decodes a JPEG at a reduced DCT scale, but keeps at least this many times the
#: processor's input size on each side, so that the processor's antialiased resize still does most
#: of the reduction (docs/performance.md, "Speed": 2 keeps the 352x352 input within a few grey levels of the
#: full decode's; 1 is faster still, and further off). 0 decodes every image at full resolution.
DECODE_MARGIN = 2


def decode_size(spec: MaskSpec, processor, margin: int = DECODE_MARGIN) -> tuple[int, int] | None:
    """The least (W, H) an image must keep when decoded for this profile; ``None``: full size.

    ``masquerade`` resizes to max(W, H) itself, so it needs every pixel. ``default`` needs the
    processor's fixed output size (times ``margin``); a processor that resizes by the shortest
    edge or crops keeps full resolution, as its output size then depends on the input's.
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None) or {}
    if spec.profile != "default" or margin <= 0 or not getattr(image_processor, "do_resize", False):
        return None
    if getattr(image_processor, "do_center_crop", False):
        return None
    width, height = _size_value(size, "width"), _size_value(size, "height")
    if not width or not height:
        return None
    return (width * margin, height * margin)


def _size_value(size, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def pixel_values(images: list[Image.Image], spec: MaskSpec, processor) -> list[torch.Tensor]:
    """One (3, S, S) pixel tensor per image, as the profile prepares it."""
    if spec.profile == "default":
        direct = _direct_processor(processor)
        if direct is not None:
            return [direct(image) for image in images]
        return list(processor(images=images, return_tensors="pt")["pixel_values"]) if images else []
    return [_masquerade_pixels(image) for image in images]


_DIRECT: "weakref.WeakKeyDictionary[object, Callable | None]" = weakref.WeakKeyDictionary()


def _direct_processor(processor) -> Callable[[Image.Image], torch.Tensor] | None:
    """The processor's own steps for one RGB image, without its per-call bookkeeping (about a
    millisecond an image): resize to (H, W) as uint8 with antialiasing, then the fused rescale and
    normalize in float32. Used only for a torchvision-backed processor that configures just these
    steps, and only once its output has been checked to equal the processor's bit for bit (on two
    test images, one shrunk, one enlarged); otherwise ``None``, and the processor runs."""
    try:
        return _DIRECT[processor]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: no cache, so no checked shortcut either
        return None
    direct = None
    try:
        direct = _build_direct(getattr(processor, "image_processor", processor))
        if direct is not None:
            rng = np.random.default_rng(0)
            for size in ((517, 389), (97, 61)):
                image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
                expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
                if not torch.equal(direct(image), expected):
                    direct = None
                    break
    except Exception:  # noqa: BLE001 - anything unexpected: the processor itself is the answer
        direct = None
    _DIRECT[processor] = direct
    return direct


def _direct_steps(image_processor) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
    """(height, width, mean, std) of the direct steps (mean and std (3, 1, 1), on the 0..255
    scale), or ``None`` when the processor configures anything else."""
    get = lambda name: getattr(image_processor, name, None)  # noqa: E731
    size = get("size")
    height, width = (_size_value(size, "height"), _size_value(size, "width")) if size else (None, None)
    simple = (get("do_resize") and height and width and get("do_rescale") and get("do_normalize")
              and int(get("resample") or 0) == int(Image.Resampling.BILINEAR)
              and not get("do_center_crop") and not get("do_pad")
              and any(cls.__name__ == "TorchvisionBackend" for cls in type(image_processor).__mro__))
    if not simple:
        return None
    mean = torch.tensor(get("image_mean")) * (1.0 / get("rescale_factor"))
    std = torch.tensor(get("image_std")) * (1.0 / get("rescale_factor"))
    return height, width, mean.view(-1, 1, 1), std.view(-1, 1, 1)


def _build_direct(image_processor) -> Callable[[Image.Image], torch.Tensor] | None:
    steps = _direct_steps(image_processor)
    if steps is None:
        return None
    height, width, mean, std = steps

    def direct(image: Image.Image) -> torch.Tensor:
        # (1, 3, H, W) over HWC memory: the channels-last layout takes torch's vectorized uint8 path
        pixels = torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB")))
        pixels = tvF.resize(pixels.permute(2, 0, 1)[None], [height, width],
                            interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)[0]
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)

    return direct


#: ``tensor_pixel_values`` resizes images of one shape together, this many pixels at most per call
#: (as float32 on a GPU: 12 bytes a pixel), so that a batch of large photos stays within memory.
GROUP_PIXELS = 1 << 26


def has_direct(processor) -> bool:
    """Whether the default profile's direct steps stand for ``processor`` (checked equal to it),
    which ``tensor_pixel_values`` needs."""
    return _direct_processor(processor) is not None


def tensor_pixel_values(images: list[torch.Tensor], processor) -> list[torch.Tensor]:
    """The default profile's (3, S, S) float32 pixels of upright uint8 (3, H, W) RGB tensors, on
    their own device (a GPU after device decoding): the direct steps (``_build_direct``), images
    of one shape resized in one call. On the CPU this equals ``pixel_values`` bit for bit; on a
    GPU torch resizes uint8 in float32 and rounds, which may move a value by one grey level.
    Raises ``ValueError`` when ``has_direct(processor)`` is false."""
    if not has_direct(processor):
        raise ValueError("this image processor has no direct steps; prepare images with pixel_values")
    height, width, mean, std = _direct_steps(getattr(processor, "image_processor", processor))
    out: list[torch.Tensor | None] = [None] * len(images)
    shape = lambda i: tuple(images[i].shape)  # noqa: E731
    for (_, rows, cols), group in groupby(sorted(range(len(images)), key=shape), key=shape):
        group = list(group)
        step = max(1, GROUP_PIXELS // (rows * cols))
        for start in range(0, len(group), step):
            indices = group[start:start + step]
            batch = torch.stack([images[i] for i in indices])
            if batch.device.type == "cpu":  # the layout ``_build_direct`` resizes in, for equal results
                batch = batch.contiguous(memory_format=torch.channels_last)
            batch = tvF.resize(batch, [height, width], interpolation=tvF.InterpolationMode.BILINEAR,
                               antialias=True)
            batch = batch.to(torch.float32, memory_format=torch.contiguous_format)
            batch = batch.sub_(mean.to(batch.device)).div_(std.to(batch.device))
            for i, pixels in zip(indices, batch, strict=True):
                out[i] = pixels
    return out


def _masquerade_pixels(image: Image.Image) -> torch.Tensor:
    side = max(image.size)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    tensor = _MASQUERADE_NORMALIZE(tensor)
    return transforms.functional.resize(tensor, [side, side], antialias=True)
