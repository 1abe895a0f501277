"""The mask engine: images + ``MaskSpec`` -> masks, on one device.

Shaped like a transformers pipeline: ``preprocess`` (CPU, per profile), ``_forward`` (the only
code touching the device, under ``inference_mode``), ``postprocess`` (back to plain arrays). The
engine knows nothing of Celery or object storage; ``clipmask run`` and the Celery task both use it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import torch
from PIL import Image

from . import postprocess, preprocess
from .devices import default_batch_size, resolve_device, resolve_dtype
from .forward import SplitCLIPSeg
from .model import LoadedModel, load_model, model_reference
from .spec import MaskSpec

log = logging.getLogger(__name__)

#: Distinct prompt strings whose text embeddings stay cached on the device.
TEXT_CACHE_SIZE = 1024


@dataclass
class MaskResult:
    """One image's masks: ``raw`` float32 in [0, 1] and ``binary`` bool, both (H, W)."""

    raw: np.ndarray
    binary: np.ndarray
    timings_ms: dict = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Fraction of pixels on in the thresholded mask."""
        return float(self.binary.mean()) if self.binary.size else 0.0

    def raw_pixels(self, bits: int = 8) -> np.ndarray:
        """``round(raw * (2**bits - 1))`` as uint8 or uint16."""
        top = (1 << bits) - 1
        return np.rint(self.raw * top).astype(np.uint8 if bits == 8 else np.uint16)

    def binary_pixels(self) -> np.ndarray:
        return self.binary.astype(np.uint8) * 255


class MaskEngine:
    """CLIPSeg on one device with a bounded cache of text embeddings."""

    def __init__(self, loaded: LoadedModel, device: torch.device, batch_size: int | None = None):
        self.loaded = loaded
        self.device = device
        self.dtype = next(loaded.model.parameters()).dtype
        self.batch_size = batch_size or default_batch_size(device)
        self.split = SplitCLIPSeg(loaded.model)
        self.max_prompt_tokens = loaded.model.config.text_config.max_position_embeddings
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", precision: str = "auto",
             batch_size: int | None = None) -> "MaskEngine":
        """Resolve device and precision, load the model (``CLIPMASK_MODEL`` by default)."""
        torch_device = resolve_device(device)
        loaded = load_model(model_reference(model), torch_device, resolve_dtype(torch_device, precision))
        return cls(loaded, torch_device, batch_size)

    @property
    def model_info(self) -> dict:
        return {"id": self.loaded.model_id, "revision": self.loaded.revision}

    def check(self, image: Image.Image, spec: MaskSpec) -> None:
        """Raise an ``ImageError`` before any work if ``image`` is outside the spec's bounds."""
        preprocess.check_image(image, spec, self.loaded.model.config.vision_config.patch_size)

    def prepare(self, image: Image.Image, spec: MaskSpec) -> torch.Tensor:
        """The (3, S, S) CPU pixel tensor of one image. Thread-safe: loader threads call it so
        that preprocessing overlaps inference instead of delaying it."""
        return preprocess.pixel_values([image], spec, self.loaded.processor)[0]

    def predict(self, images: list[Image.Image], spec: MaskSpec,
                pixels: list[torch.Tensor] | None = None) -> list[MaskResult]:
        """Masks for ``images`` in order. ``pixels`` are their ``prepare`` tensors, if already
        made; images whose tensors have one shape share backbone batches."""
        if pixels is None:
            return self._prepare_and_predict(images, spec)
        results: list[MaskResult | None] = [None] * len(images)
        shape = lambda i: tuple(pixels[i].shape)  # noqa: E731
        for _, group in groupby(sorted(range(len(images)), key=shape), key=shape):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                indices = group[start:start + self.batch_size]
                batch = torch.stack([pixels[i] for i in indices])
                for i, result in zip(indices, self._predict_batch([images[i] for i in indices], batch, spec),
                                     strict=True):
                    results[i] = result
        return results

    def _prepare_and_predict(self, images: list[Image.Image], spec: MaskSpec) -> list[MaskResult]:
        started = time.perf_counter()
        pixels = preprocess.pixel_values(images, spec, self.loaded.processor)
        prepare_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(images))
        results = self.predict(images, spec, pixels)
        for result in results:
            result.timings_ms["preprocess"] = prepare_ms
        return results

    def _predict_batch(self, images: list[Image.Image], pixels: torch.Tensor, spec: MaskSpec) -> list[MaskResult]:
        started = time.perf_counter()
        logits = self._forward(pixels, spec)
        share = (time.perf_counter() - started) * 1000.0 / len(images)
        results = [self._postprocess(image, image_logits, spec)
                   for image, image_logits in zip(images, logits, strict=True)]
        for result in results:
            result.timings_ms["inference"] = share
        return results

    @torch.inference_mode()
    def _forward(self, pixels: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
        """(N, 3, S, S) pixels -> (N, prompts, S', S') logits on the device."""
        images = pixels.shape[0]
        prompts = spec.all_prompts
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()  # lets the copy below overlap with the host
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        reduced = self.split.reduce(self.split.backbone(pixels))
        conditionals = self.text_embeddings(prompts).repeat(images, 1)
        image_index = torch.arange(images, device=self.device).repeat_interleave(len(prompts))
        logits = self.split.decode(reduced, image_index, conditionals)
        return logits.reshape(images, len(prompts), *logits.shape[1:])

    @torch.inference_mode()
    def _postprocess(self, image: Image.Image, logits: torch.Tensor, spec: MaskSpec) -> MaskResult:
        started = time.perf_counter()
        mask = postprocess.combine(logits, spec, (image.height, image.width))
        raw, binary = postprocess.finish(mask, spec)
        result = MaskResult(raw.cpu().numpy(), binary.cpu().numpy())
        result.timings_ms["postprocess"] = (time.perf_counter() - started) * 1000.0
        return result

    @torch.inference_mode()
    def text_embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
        """(len(prompts), projection_dim) conditional embeddings, cached per prompt string."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            tokens = self.loaded.processor.tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt"
            ).to(self.device)
            embeddings = self.split.encode_text(tokens["input_ids"], tokens["attention_mask"])
            for prompt, embedding in zip(missing, embeddings, strict=True):
                self._text_cache[prompt] = embedding
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        embeddings = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings
