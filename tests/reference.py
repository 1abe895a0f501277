"""The straightforward reference the engine is checked against: one full CLIPSeg forward per
prompt (the seed node's way), then resize, sigmoid, max over positives, min with one minus the
max over negatives, normalize. Slow and obvious on purpose."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torchvision import transforms

from worker.spec import MaskSpec


def full_forward_probabilities(engine, image, prompts, *, masquerade: bool) -> torch.Tensor:
    """One complete CLIPSeg forward per prompt -> (prompts, H, W) probabilities."""
    model, processor = engine.loaded.model, engine.loaded.processor
    tokens = processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
    if masquerade:  # the seed node: Normalize, then square antialiased Resize to max(W, H)
        side = max(image.size)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None].permute(0, 3, 1, 2)
        transform = transforms.Compose([
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            transforms.Resize((side, side), antialias=True)])
        pixels = transform(tensor)
    else:
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    logits = []
    with torch.no_grad():
        for i in range(len(prompts)):
            out = model(input_ids=tokens["input_ids"][i:i + 1], attention_mask=tokens["attention_mask"][i:i + 1],
                        pixel_values=pixels).logits
            logits.append(out.reshape(1, *out.shape[-2:]))
    logits = torch.cat(logits)
    mode = {"mode": "nearest"} if masquerade else {"mode": "bilinear", "align_corners": False}
    return torch.sigmoid(F.interpolate(logits[:, None], size=(image.height, image.width), **mode)[:, 0])


def reference_mask(engine, image, spec: MaskSpec) -> np.ndarray:
    masquerade = spec.profile == "masquerade"
    mask = full_forward_probabilities(engine, image, spec.prompts, masquerade=masquerade).max(0).values
    if spec.negative_prompts:
        negative = full_forward_probabilities(engine, image, spec.negative_prompts, masquerade=masquerade)
        mask = torch.minimum(mask, 1.0 - negative.max(0).values)
    if spec.normalize:
        low, high = mask.min(), mask.max()
        mask = (mask - low) / (high - low) if high > low else torch.zeros_like(mask)
    return mask.numpy()
