"""Logits -> masks: the mask semantics of docs/design.md, then the optional ComfyUI-style mask edits.

Order: resize logits to the image, sigmoid, max over positives, ``min(mask, 1 - max(neg))``;
blur (Gaussian, raw mask); normalize (per image, a constant mask becomes zeros); threshold
(``>=``); grow or shrink the thresholded mask; invert both masks.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from worker.dominant import Dominant
from worker.spec import MaskSpec

#: How each profile resizes logits to the image: the processor's bilinear, or the seed's nearest.
UPSAMPLE_MODE = {"default": "bilinear", "masquerade": "nearest"}
#: ``render`` on the CPU works on bands of about this many values per prompt (1 MiB of float32),
#: so that each band's dozen steps stay in the cache instead of streaming image-sized maps.
BAND_VALUES = 1 << 18


class Rendered(NamedTuple):
    """One image's output pixels, (H, W), on the logits' device.

    ``raw_pixels``: ``round(mask * (2**raw_bits - 1))``, uint8 or 16-bit (uint16 on the CPU, int32
    elsewhere), ``None`` when not asked for; ``binary_pixels``: the thresholded mask, uint8 0/255.
    ``mask`` (float32) and ``binary`` (bool) are there when the path made them, else ``None``.
    """

    raw_pixels: torch.Tensor | None
    binary_pixels: torch.Tensor
    mask: torch.Tensor | None = None
    binary: torch.Tensor | None = None


def render(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int], raw: bool = True) -> Rendered:
    """(prompts, S, S) logits -> the outputs' pixels at ``size`` (H, W): ``finish(combine(...))``,
    quantized, within float noise (a pixel may land one grey level off where ``mask * 255`` is
    within float noise of a half).

    The default profile without blur or grow is fused: the logits are resized along rows once (at
    logit height), then each band of output rows is resized along columns, combined in logit
    space (sigmoid is monotonic, so ``max(sigmoid) = sigmoid(max)`` and ``1 - sigmoid(x) =
    sigmoid(-x)``), thresholded and quantized while it is in the cache; no image-sized float map
    is made. Each prompt is still resized on its own (the max of resized logits is not the resize
    of their max). ``normalize`` adds a first pass for the mask's minimum and maximum; without
    ``raw`` the threshold is applied to the logits (``logit(t)``) and sigmoid is skipped. On the
    CPU, upscaling 3 times or more (photos), the cells of the logits where the same prompts decide
    are resized as one combined map, and only the pixels of cells where prompts cross are mixed
    prompt by prompt (``dominant.py``). Other specs take the straightforward path.
    """
    if spec.profile == "default" and spec.blur_sigma == 0 and spec.grow == 0:
        return _render_bands(logits, spec, size, raw)
    mask, binary = finish(combine(logits, spec, size), spec)
    raw_pixels = quantize(mask, spec.raw_bits) if raw else None
    return Rendered(raw_pixels, binary.to(torch.uint8).mul_(255), mask, binary)


def quantize(mask: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``round(mask * (2**bits - 1))`` as uint8, or for 16 bits uint16 (CPU) / int32 (elsewhere)."""
    out = torch.empty(mask.shape, dtype=_pixel_dtype(bits, mask.device), device=mask.device)
    return out.copy_((mask * ((1 << bits) - 1)).round_())


def _pixel_dtype(bits: int, device: torch.device) -> torch.dtype:
    if bits == 8:
        return torch.uint8
    return torch.uint16 if device.type == "cpu" else torch.int32


def _source_rows(out_size: int, in_size: int, device: torch.device):
    """Bilinear (align_corners=False) source rows and weights of each output row, as
    ``F.interpolate`` computes them in float32: ``src = max(scale * (dst + 0.5) - 0.5, 0)`` with
    ``scale = float(in) / out``, multiply and subtract fused (one rounding, float64 here). A
    weight one float32 step off would move a 16-bit raw mask by several levels on steep logits."""
    scale = float(torch.tensor(in_size, dtype=torch.float32) / out_size)
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    src = (dst.add_(0.5).mul_(scale).sub_(0.5)).float().clamp_(min=0)
    first = src.long().clamp_(max=in_size - 1)
    weight = (src - first).clamp_(0, 1)
    return first, (first + 1).clamp_(max=in_size - 1), weight[:, None]


def _render_bands(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int], raw: bool) -> Rendered:
    height, width = size
    prompts, logit_height, _ = logits.shape
    device = logits.device
    on_cpu = device.type == "cpu"
    # Negatives enter as -logits (negation commutes exactly with the interpolation): the mask is
    # sigmoid(min(max over positives, min over negated negatives)). Along rows once, for every
    # prompt: the horizontal half of the bilinear resize; 1-D linear interpolation computes exactly
    # what the 2-D kernel computes along a row (whose vertical weights are (1, 0)), in half the time.
    positives = len(spec.prompts)
    signed = signed_logits(logits, positives)
    first, second, weight = _source_rows(height, logit_height, device)
    # Upscaling by 3 or more, output rows come in runs that share their two source rows: each run
    # is one broadcast lerp, with no gathered copy of the source rows.
    runs = _runs(first) if on_cpu and height >= 3 * logit_height else None
    # There too, where the same prompts decide a whole cell, one combined map stands for them all.
    dominant = None
    if runs is not None and 1 < prompts < 63:  # (dominant.py keeps one bit per prompt in an int64)
        dominant = shortcut(signed, positives, spec, size, raw)
        dominant = dominant if dominant.pays else None
    maps = signed if dominant is None else dominant.combined[None]
    rows = F.interpolate(maps.reshape(len(maps) * logit_height, 1, -1), size=width, mode="linear",
                         align_corners=False).reshape(len(maps), logit_height, width)
    band_rows = max(1, BAND_VALUES // (len(maps) * width)) if on_cpu else height
    bands = [(start, min(height, start + band_rows)) for start in range(0, height, band_rows)]
    values = torch.empty((len(maps), min(band_rows, height), width), device=device)

    def band_logits(start: int, stop: int) -> torch.Tensor:
        """The combined mask of output rows start..stop, before sigmoid."""
        out = values[:, : stop - start]
        if runs is None:
            torch.lerp(rows.index_select(1, first[start:stop]), rows.index_select(1, second[start:stop]),
                       weight[start:stop], out=out)
        else:
            for run_start, run_stop, row in _runs_in(runs, start, stop):
                below = min(row + 1, logit_height - 1)
                torch.lerp(rows[:, row:row + 1], rows[:, below:below + 1], weight[run_start:run_stop],
                           out=out[:, run_start - start:run_stop - start])
        if dominant is not None:
            dominant.fix(out[0], start, stop)
            return out[0]
        mask = _reduce_into_first(out[:positives], torch.maximum)
        if spec.negative_prompts:
            torch.minimum(mask, _reduce_into_first(out[positives:], torch.minimum), out=mask)
        return mask

    low = span = None
    if spec.normalize:
        lows, highs = zip(*(torch.aminmax(band_logits(start, stop).sigmoid_()) for start, stop in bands))
        low, high = torch.stack(lows).min(), torch.stack(highs).max()
        span = high - low if bool(high > low) else None  # constant: all zeros, as normalize()
    # Only the thresholded mask wanted: compare the logits with logit(threshold), no sigmoid (equal
    # up to float noise at the threshold; not for 0 or 1, where sigmoid's rounding to 0 or 1 counts).
    in_logits = not raw and not spec.normalize and 0.0 < spec.threshold < 1.0
    threshold = logit(spec.threshold) if in_logits else spec.threshold
    raw_pixels = torch.empty(size, dtype=_pixel_dtype(spec.raw_bits, device), device=device) if raw else None
    binary_pixels = torch.empty(size, dtype=torch.uint8, device=device)
    tail = _tail_numpy if on_cpu else _tail_torch
    for start, stop in bands:
        mask = band_logits(start, stop)
        if not in_logits:
            mask = mask.sigmoid_()
        if spec.normalize:
            mask = mask.sub_(low).div_(span) if span is not None else mask.zero_()
        raw_band = None if raw_pixels is None else raw_pixels[start:stop]
        tail(mask, threshold, spec, binary_pixels[start:stop], raw_band)
    return Rendered(raw_pixels, binary_pixels)


def logit(probability: float) -> float:
    """The inverse of sigmoid, for 0 < probability < 1."""
    return math.log(probability / (1.0 - probability))


def signed_logits(logits: torch.Tensor, positives: int) -> torch.Tensor:
    """(prompts, h, w) float32 logits with the negatives' negated, positives first."""
    return torch.cat([logits[:positives].float(), -logits[positives:].float()])


def shortcut(signed: torch.Tensor, positives: int, spec: MaskSpec, size: tuple[int, int],
             raw: bool) -> Dominant:
    """``dominant.py``'s combined map for ``signed_logits`` rendered at ``size`` (H, W); use it
    where ``.pays``."""
    device = signed.device
    rows = _source_rows(size[0], signed.shape[1], device)[::2]
    columns = _source_rows(size[1], signed.shape[2], device)[::2]
    return Dominant(signed, positives, rows, columns, _floor(spec, raw))


def _floor(spec: MaskSpec, raw: bool) -> float | None:
    """A logit below which a mask value gives the same pixels as any lower one (a raw 0 and an
    unset thresholded pixel, or their inverses), less a margin for float noise; ``None`` where
    there is none (``normalize`` rescales every value; a threshold of 0 or 1)."""
    if spec.normalize or not 0.0 < spec.threshold < 1.0:
        return None
    floor = logit(spec.threshold)
    if raw:
        floor = min(floor, logit(0.5 / ((1 << spec.raw_bits) - 1)))
    return floor - 0.01


def _tail_torch(mask: torch.Tensor, threshold: float, spec: MaskSpec, binary: torch.Tensor,
                raw: torch.Tensor | None) -> None:
    """Threshold (then invert) into ``binary`` as 0/255 and quantize into ``raw``; uses up ``mask``."""
    compare = torch.lt if spec.invert else torch.ge  # invert: ~(mask >= t), NaN aside
    compare(mask, threshold, out=binary.view(torch.bool))
    binary.mul_(255)
    if raw is not None:
        if spec.invert:
            mask = mask.neg_().add_(1.0)
        raw.copy_(mask.mul_((1 << spec.raw_bits) - 1).round_())


def _tail_numpy(mask: torch.Tensor, threshold: float, spec: MaskSpec, binary: torch.Tensor,
                raw: torch.Tensor | None) -> None:
    """``_tail_torch`` on the CPU, in numpy: its compare and float-to-integer casts are SIMD, torch's
    take ten times as long. The same float32 arithmetic (NumPy's rint rounds half to even, as
    ``np.rint`` in ``MaskResult.raw_pixels`` and ``torch.round`` do)."""
    values, binary = mask.numpy(), binary.numpy()
    compare = np.less if spec.invert else np.greater_equal
    compare(values, np.float32(threshold), out=binary.view(np.bool_))
    np.multiply(binary, 255, out=binary)
    if raw is not None:
        if spec.invert:
            np.subtract(np.float32(1.0), values, out=values)
        np.multiply(values, np.float32((1 << spec.raw_bits) - 1), out=values)
        np.copyto(raw.numpy(), np.rint(values, out=values), casting="unsafe")


def _runs(first: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, stop, source row) of each run of output rows that share their first source row."""
    rows = first.tolist()
    edges = [0, *(i for i in range(1, len(rows)) if rows[i] != rows[i - 1]), len(rows)]
    return [(a, b, rows[a]) for a, b in zip(edges, edges[1:])]


def _runs_in(runs: list[tuple[int, int, int]], start: int, stop: int):
    """The runs' parts inside rows ``start..stop``."""
    index = bisect.bisect_right(runs, (start, math.inf)) - 1
    while index < len(runs) and runs[index][0] < stop:
        run_start, run_stop, row = runs[index]
        yield max(run_start, start), min(run_stop, stop), row
        index += 1


def _reduce_into_first(values: torch.Tensor, pairwise) -> torch.Tensor:
    """``pairwise`` (torch.maximum, torch.minimum) over the first dimension, written into (and
    returned as) ``values[0]``."""
    result = values[0]
    for other in values[1:]:
        pairwise(result, other, out=result)
    return result


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
