"""Logits -> masks: DESIGN.md's mask semantics, then the optional ComfyUI-style mask edits.

Order: resize logits to the image, sigmoid, max over positives, ``min(mask, 1 - max(neg))``;
blur (Gaussian, raw mask); normalize (per image, a constant mask becomes zeros); threshold
(``>=``); grow or shrink the thresholded mask; invert both masks.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from .spec import MaskSpec

#: How each profile resizes logits to the image: the processor's bilinear, or the seed's nearest.
UPSAMPLE_MODE = {"default": "bilinear", "masquerade": "nearest"}


def combine(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int]) -> torch.Tensor:
    """(prompts, S, S) logits, positives first -> (H, W) float32 mask in [0, 1].

    Prompts are resized one at a time so memory holds at most three image-sized maps.
    """
    positive = _max_probability(logits[: len(spec.prompts)], spec.profile, size)
    if not spec.negative_prompts:
        return positive
    negative = _max_probability(logits[len(spec.prompts):], spec.profile, size)
    return torch.minimum(positive, 1.0 - negative)


def _max_probability(logits: torch.Tensor, profile: str, size: tuple[int, int]) -> torch.Tensor:
    result = None
    for prompt_logits in logits.float():
        probability = torch.sigmoid(_resize(prompt_logits, size, UPSAMPLE_MODE[profile]))
        result = probability if result is None else torch.maximum(result, probability)
    return result


def _resize(logits: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(logits[None, None], size=size, mode=mode, **extra)[0, 0]


def normalize(mask: torch.Tensor) -> torch.Tensor:
    """Min-max over this one image; a constant mask becomes all zeros (not NaN)."""
    low, high = mask.min(), mask.max()
    if high <= low:
        return torch.zeros_like(mask)
    return (mask - low) / (high - low)


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with ``sigma`` pixels (kernel of 3 sigma each side, reflected edges)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, (min(mask.shape) - 1) // 2) or 0
    if radius == 0:
        return mask
    return TF.gaussian_blur(mask[None], [2 * radius + 1] * 2, [sigma, sigma])[0]


def grow(binary: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (``pixels`` > 0) or erode (< 0) a boolean mask by a square of that radius."""
    if pixels == 0:
        return binary
    size = 2 * abs(pixels) + 1
    values = binary.float()[None, None]
    if pixels > 0:
        return F.max_pool2d(values, size, stride=1, padding=abs(pixels))[0, 0] > 0
    return -F.max_pool2d(-values, size, stride=1, padding=abs(pixels))[0, 0] > 0


def finish(mask: torch.Tensor, spec: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the spec's edits; returns (raw mask in [0, 1], thresholded boolean mask)."""
    if spec.blur_sigma > 0:
        mask = blur(mask, spec.blur_sigma)
    if spec.normalize:
        mask = normalize(mask)
    binary = grow(mask >= spec.threshold, spec.grow)
    if spec.invert:
        return 1.0 - mask, ~binary
    return mask, binary
