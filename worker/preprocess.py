"""Image -> pixel tensor, one function per profile (see DESIGN.md, "Preprocessing profiles").

- ``default``: the model's own CLIPSeg image processor (352x352, ImageNet mean/std), so the
  backbone cost does not depend on the image size and every image batches with every other.
- ``masquerade``: the seed node's recipe: ImageNet mean/std on the float image, then a square
  antialiased bilinear resize to max(W, H). Cost grows with the square of the side, so the side
  is bounded by ``MaskSpec.max_side``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from .errors import ImageTooLargeError, ImageTooSmallError
from .spec import MaskSpec

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


def pixel_values(images: list[Image.Image], spec: MaskSpec, processor) -> list[torch.Tensor]:
    """One (3, S, S) pixel tensor per image, as the profile prepares it."""
    if spec.profile == "default":
        return list(processor(images=images, return_tensors="pt")["pixel_values"]) if images else []
    return [_masquerade_pixels(image) for image in images]


def _masquerade_pixels(image: Image.Image) -> torch.Tensor:
    side = max(image.size)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    tensor = _MASQUERADE_NORMALIZE(tensor)
    return transforms.functional.resize(tensor, [side, side], antialias=True)
