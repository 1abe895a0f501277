"""The mask engine: images + ``MaskSpec`` -> masks, on one device.

Shaped like a transformers pipeline: ``preprocess`` (CPU, per profile), ``_forward`` (the only
code touching the device, under ``inference_mode``), ``postprocess`` (back to plain arrays). The
engine knows nothing of Celery or object storage; ``clipmask run`` and the Celery task both use it.
``load_input`` + ``predict_prepared`` are the same from file bytes, with JPEGs decoded and
preprocessed on the device when it is a GPU (``gpu_decode``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from functools import partial
from itertools import groupby

import numpy as np
import torch
from PIL import Image

from worker import gpu_decode, postprocess, postprocess_batch, preprocess, settings
from worker.codecs import Decoded, decode_scaled
from worker.devices import cpu_streams, default_batch_size, resolve_device, resolve_dtype
from worker.forward import SplitCLIPSeg
from worker.gpu_decode import Prepared
from worker.model import LoadedModel, load_model, model_reference
from worker.result import MaskResult, output_roles  # noqa: F401 - part of the engine's API
from worker.spec import MaskSpec

log = logging.getLogger(__name__)

#: Distinct prompt strings whose text embeddings stay cached on the device.
TEXT_CACHE_SIZE = 1024


class MaskEngine:
    """CLIPSeg on one device with a bounded cache of text embeddings."""

    def __init__(self, loaded: LoadedModel, device: torch.device, batch_size: int | None = None,
                 device_decode: bool | None = None):
        self.loaded = loaded
        self.device = device
        self.dtype = next(loaded.model.parameters()).dtype
        self.batch_size = batch_size or default_batch_size(device)
        self.split = SplitCLIPSeg(loaded.model)
        self.max_prompt_tokens = loaded.model.config.text_config.max_position_embeddings
        #: JPEGs keep at least this many times the processor's input size when decoded for the
        #: default profile (``preprocess.DECODE_MARGIN``); 0 decodes at full resolution, as
        #: ``CLIPMASK_REDUCED_DECODE=0`` asks.
        self.decode_margin = preprocess.DECODE_MARGIN if settings.REDUCED_DECODE.get() else 0
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()
        #: Forward passes run side by side by the device loop: several on the CPU, each on its
        #: share of torch's threads (``devices.cpu_streams``), one on a GPU.
        self.streams, self._threads = 1, (0, 0)
        if device.type == "cpu":
            self.streams, share, total = cpu_streams()
            self._threads = (share, total)
            torch.set_num_threads(share)
        #: ``load_input`` leaves JPEGs encoded for the device (``gpu_decode``): on CUDA unless
        #: ``CLIPMASK_DEVICE_DECODE=0``; the tests turn it on for the CPU.
        self.device_decode = (device.type == "cuda" and settings.DEVICE_DECODE.get()
                              if device_decode is None else device_decode)
        #: ``CLIPMASK_COMPILE=1``: the backbone under ``torch.compile`` (CUDA only; bench_gpu.py).
        self.compiled = device.type == "cuda" and settings.COMPILE.get()
        if self.compiled:
            self.split.backbone = torch.compile(self.split.backbone)

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", precision: str = "auto",
             batch_size: int | None = None, device_decode: bool | None = None) -> "MaskEngine":
        """Resolve device and precision, load the model (``CLIPMASK_MODEL`` by default)."""
        torch_device = resolve_device(device)
        loaded = load_model(model_reference(model), torch_device, resolve_dtype(torch_device, precision))
        return cls(loaded, torch_device, batch_size, device_decode)

    @property
    def model_info(self) -> dict:
        info = {"id": self.loaded.model_id, "revision": self.loaded.revision, "precision": self.loaded.precision}
        return {**info, "random": True} if self.loaded.random else info

    def share_threads(self, alone: bool) -> None:
        """Called by the device loop in the thread about to run a batch: on the CPU, a batch
        running alone (a partial batch, none other running or waiting) gets every torch thread,
        so a lone request is as quick as without side-by-side passes; otherwise its stream's
        share. Torch's thread count is per thread once a thread has run an operator, so this
        sets the caller's."""
        if self.streams > 1:
            torch.set_num_threads(self._threads[1] if alone else self._threads[0])

    def decode(self, data: bytes, spec: MaskSpec) -> Decoded:
        """Decode an image file for this spec: upright RGB, a JPEG at the smallest DCT scale the
        profile's preprocessing allows (``preprocess.decode_size``), with its full (W, H)."""
        return decode_scaled(data, preprocess.decode_size(spec, self.loaded.processor, self.decode_margin))

    def check(self, image: Image.Image, spec: MaskSpec) -> None:
        """Raise an ``ImageError`` before any work if ``image`` is outside the spec's bounds."""
        preprocess.check_image(image, spec, self.loaded.model.config.vision_config.patch_size)

    def prepare(self, image: Image.Image, spec: MaskSpec) -> torch.Tensor:
        """The (3, S, S) CPU pixel tensor of one image. Thread-safe: loader threads call it so
        that preprocessing overlaps inference instead of delaying it."""
        return preprocess.pixel_values([image], spec, self.loaded.processor)[0]

    def predict(self, images: list[Image.Image], spec: MaskSpec, pixels: list[torch.Tensor] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> list[MaskResult]:
        """Masks for ``images`` in order. ``pixels`` are their ``prepare`` tensors, if already
        made; images whose tensors have one shape share backbone batches. ``sizes`` are the
        (W, H) the masks are made at (``Decoded.size``, for reduced decodes); default: each
        image's own size."""
        if pixels is None:
            return self._prepare_and_predict(images, spec, sizes)
        return self._predict_pixels(pixels, [image.size for image in images] if sizes is None else sizes, spec)

    def load_input(self, data: bytes, spec: MaskSpec) -> Prepared:
        """One file, ready for ``predict_prepared``; thread-safe, for loader threads. With
        ``device_decode``, a JPEG the device can decode stays encoded (header read only); other
        files are decoded, checked and prepared as ``decode``, ``check`` and ``prepare`` do.
        Raises their per-image errors (``ImageDecodeError``, ``ImageTooLargeError``, ...)."""
        return gpu_decode.load_input(self, data, spec)

    def predict_prepared(self, items: list[Prepared], spec: MaskSpec) -> list[MaskResult | Exception]:
        """Masks for ``load_input`` results, in order: encoded JPEGs decoded and preprocessed on
        the device in one batch, then ``predict``'s batches. A file the device (and then Pillow)
        cannot decode gets its exception in its place; a failed forward raises, as in ``predict``."""
        return gpu_decode.predict_prepared(self, items, spec)

    def _predict_pixels(self, pixels: list[torch.Tensor], sizes: list[tuple[int, int]],
                        spec: MaskSpec) -> list[MaskResult]:
        results: list[MaskResult | None] = [None] * len(pixels)
        shape = lambda i: tuple(pixels[i].shape)  # noqa: E731
        for _, group in groupby(sorted(range(len(pixels)), key=shape), key=shape):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                indices = group[start:start + self.batch_size]
                batch = torch.stack([pixels[i] for i in indices])
                for i, result in zip(indices, self._predict_batch([sizes[i] for i in indices], batch, spec),
                                     strict=True):
                    results[i] = result
        return results

    def _prepare_and_predict(self, images: list[Image.Image], spec: MaskSpec,
                             sizes: list[tuple[int, int]] | None) -> list[MaskResult]:
        started = time.perf_counter()
        pixels = preprocess.pixel_values(images, spec, self.loaded.processor)
        prepare_ms = (time.perf_counter() - started) * 1000.0 / max(1, len(images))
        results = self.predict(images, spec, pixels, sizes)
        for result in results:
            result.timings_ms["preprocess"] = prepare_ms
        return results

    def _predict_batch(self, sizes: list[tuple[int, int]], pixels: torch.Tensor, spec: MaskSpec) -> list[MaskResult]:
        started = time.perf_counter()
        logits = self._forward(pixels, spec)
        share = (time.perf_counter() - started) * 1000.0 / len(sizes)
        if postprocess_batch.batchable(spec, self.device):
            results = self._postprocess_many(sizes, logits, spec)
        elif self.device.type == "cpu":
            # Made when first read: by the pipeline's encoder threads, side by side with the next
            # forward pass, instead of in the device loop's thread between two passes.
            results = [MaskResult.deferred(partial(self._postprocess, size, image_logits, spec))
                       for size, image_logits in zip(sizes, logits, strict=True)]
        else:
            results = [self._postprocess(size, image_logits, spec)
                       for size, image_logits in zip(sizes, logits, strict=True)]
        for result in results:
            result.timings_ms["inference"] = share
            result.batch_images = len(sizes)  # images in this forward pass, for the metadata record
        return results

    @torch.inference_mode()
    def _forward(self, pixels: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
        """(N, 3, S, S) pixels -> (N, prompts, S', S') logits on the device."""
        images = pixels.shape[0]
        prompts = spec.all_prompts
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()  # lets the copy below overlap with the host
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        reduced = self.split.reduce(self.split.backbone(pixels))
        conditionals = self.text_embeddings(prompts).repeat(images, 1)
        image_index = torch.arange(images, device=self.device).repeat_interleave(len(prompts))
        logits = self.split.decode(reduced, image_index, conditionals)
        return logits.reshape(images, len(prompts), *logits.shape[1:])

    @torch.inference_mode()
    def _postprocess(self, size: tuple[int, int], logits: torch.Tensor, spec: MaskSpec) -> MaskResult:
        """The output pixels of one image of (W, H) ``size``, made on the engine's device."""
        started = time.perf_counter()
        shape = (size[1], size[0])
        rendered = postprocess.render(logits, spec, shape, raw="raw" in output_roles(spec))
        raw_pixels = {}
        if rendered.raw_pixels is not None:
            raw_pixels[spec.raw_bits] = rendered.raw_pixels.cpu().numpy().astype(
                np.uint8 if spec.raw_bits == 8 else np.uint16, copy=False)
        if rendered.mask is not None:
            floats, compute = (rendered.mask.cpu().numpy(), rendered.binary.cpu().numpy()), None
        else:
            floats, compute = (None, None), lambda: self._float_masks(logits, spec, shape)
        result = MaskResult(*floats, raw_pixels=raw_pixels, binary_pixels=rendered.binary_pixels.cpu().numpy(),
                            compute=compute)
        result.timings_ms["postprocess"] = (time.perf_counter() - started) * 1000.0
        return result

    @torch.inference_mode()
    def _postprocess_many(self, sizes: list[tuple[int, int]], logits: torch.Tensor, spec: MaskSpec) -> list[MaskResult]:
        """``_postprocess`` for a batch on a GPU: images of one size together (``postprocess_batch``)."""
        started = time.perf_counter()
        results: list[MaskResult | None] = [None] * len(sizes)
        raw = "raw" in output_roles(spec)
        for (width, height), group in groupby(sorted(range(len(sizes)), key=sizes.__getitem__), key=sizes.__getitem__):
            group, done = list(group), 0
            for raw_block, binary_block in postprocess_batch.render_many(logits[group], spec, (height, width), raw):
                raw_block = None if raw_block is None else raw_block.numpy().astype(
                    np.uint8 if spec.raw_bits == 8 else np.uint16, copy=False)
                binary_block = binary_block.numpy()
                for offset in range(binary_block.shape[0]):
                    i = group[done + offset]
                    results[i] = MaskResult(
                        raw_pixels={} if raw_block is None else {spec.raw_bits: raw_block[offset]},
                        binary_pixels=binary_block[offset],
                        compute=partial(self._float_masks, logits[i], spec, (height, width)))
                done += binary_block.shape[0]
        share = (time.perf_counter() - started) * 1000.0 / max(1, len(sizes))
        for result in results:
            result.timings_ms["postprocess"] = share
        return results

    @torch.inference_mode()
    def _float_masks(self, logits: torch.Tensor, spec: MaskSpec, shape: tuple[int, int]):
        """The straightforward float masks (``MaskResult.raw`` / ``binary`` on first use)."""
        raw, binary = postprocess.finish(postprocess.combine(logits, spec, shape), spec)
        return raw.cpu().numpy(), binary.cpu().numpy()

    @torch.inference_mode()
    def text_embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
        """(len(prompts), projection_dim) conditional embeddings, cached per prompt string."""
        with self._text_lock:  # the CPU's forward passes run side by side
            return self._text_embeddings(prompts)

    def _text_embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
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
