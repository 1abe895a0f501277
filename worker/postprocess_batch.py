"""``postprocess.render`` for many images of one size at once, on a GPU.

Per image, the fused default-profile path costs a dozen small kernel launches and two blocking
copies to the host: about a millisecond, more than the model's forward pass. Here the same steps
run over a (N, prompts, H, W) block (bounded by ``BLOCK_VALUES``, so a batch of 12 MP photos goes
in a few blocks), and each block's pixels come back in one copy into pinned memory.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.nn import functional as F

from worker.postprocess import _pixel_dtype, logit
from worker.spec import MaskSpec

#: Float32 values per block (N x prompts x H x W): 1 GiB.
BLOCK_VALUES = 1 << 28


def batchable(spec: MaskSpec, device: torch.device) -> bool:
    """Whether ``render_many`` serves this spec on this device (else: ``render`` per image)."""
    return (device.type != "cpu" and spec.profile == "default" and spec.blur_sigma == 0 and spec.grow == 0
            and not spec.normalize)  # normalize would stretch the 2-D kernel's float noise on a flat mask


def render_many(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int],
                raw: bool) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """(N, prompts, S, S) logits of N images of (H, W) ``size`` -> per block of images, their
    (raw pixels or ``None``, binary pixels), each (n, H, W) on the host, in order."""
    height, width = size
    images, prompts = logits.shape[:2]
    per_block = max(1, BLOCK_VALUES // (prompts * height * width))
    for start in range(0, images, per_block):
        raw_pixels, binary = render_block(logits[start:start + per_block], spec, size, raw)
        raw_pixels, binary = _to_host(raw_pixels), _to_host(binary)
        if logits.device.type == "cuda":
            torch.cuda.current_stream(logits.device).synchronize()
        yield raw_pixels, binary


def render_block(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int], raw: bool):
    """One block's (raw pixels or ``None``, binary pixels) on the logits' device, (n, H, W).

    The resize is ``F.interpolate``'s bilinear over the whole block, docs/design.md's own definition
    (on a GPU one kernel beats the CPU path's separable passes); then, as ``render``, the prompts
    are combined in logit space (``max(sigmoid) = sigmoid(max)``, ``1 - sigmoid(x) =
    sigmoid(-x)``) and the threshold and quantization follow. Equal to ``render`` within float
    noise (a raw pixel one grey level off where its value is within noise of a half). Not for
    ``normalize`` (``batchable``)."""
    if spec.normalize:
        raise ValueError("render_block does not normalize; use postprocess.render")
    positives = len(spec.prompts)
    resized = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    mask = resized[:, :positives].amax(1)
    if spec.negative_prompts:
        torch.minimum(mask, resized[:, positives:].amin(1).neg_(), out=mask)
    del resized
    in_logits = not raw and 0.0 < spec.threshold < 1.0
    threshold = logit(spec.threshold) if in_logits else spec.threshold
    if not in_logits:
        mask = mask.sigmoid_()
    binary = (torch.lt if spec.invert else torch.ge)(mask, threshold).to(torch.uint8).mul_(255)
    raw_pixels = None
    if raw:
        if spec.invert:
            mask = mask.neg_().add_(1.0)
        raw_pixels = torch.empty(mask.shape, dtype=_pixel_dtype(spec.raw_bits, mask.device), device=mask.device)
        raw_pixels.copy_(mask.mul_((1 << spec.raw_bits) - 1).round_())
    return raw_pixels, binary


def _to_host(pixels: torch.Tensor | None) -> torch.Tensor | None:
    """A copy on the host, queued on the stream: into pinned memory from torch's caching host
    allocator, reused batch after batch, where a fresh pageable buffer per block would page-fault
    its way through tens of megabytes."""
    if pixels is None or pixels.device.type == "cpu":
        return pixels
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    return host.copy_(pixels, non_blocking=True)


