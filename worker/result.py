"""One image's masks as the engine returns them (``MaskResult``), and the outputs a spec asks for.

Kept apart from ``engine`` so that the engine module stays about the device; ``worker.engine``
re-exports both names.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from worker.spec import IMAGE_OUTPUTS, MaskSpec


def output_roles(spec: MaskSpec) -> tuple[str, ...]:
    """The image files ``spec`` asks for (``MaskSpec.outputs``), in ``IMAGE_OUTPUTS`` order; ``rle``
    is no file, but a field of the record."""
    return tuple(role for role in IMAGE_OUTPUTS if role in spec.outputs)


class MaskResult:
    """One image's masks, (H, W).

    ``raw_pixels(bits)`` (``round(raw * (2**bits - 1))``) and ``binary_pixels()`` (0/255) are what
    the output PNGs hold; the engine makes them directly (``postprocess.render``). ``raw``
    (float32 in [0, 1]) and ``binary`` (bool) are kept when the path made them; otherwise ``raw``
    is computed from the logits on first use (the straightforward path, equal within float
    noise) and ``binary`` is read from the pixels. A ``deferred`` result is made when first read.
    """

    def __init__(self, raw: np.ndarray | None = None, binary: np.ndarray | None = None,
                 timings_ms: dict | None = None, *, raw_pixels: dict[int, np.ndarray] | None = None,
                 binary_pixels: np.ndarray | None = None,
                 compute: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None):
        self._raw, self._binary, self._compute = raw, binary, compute
        self._raw_pixels = dict(raw_pixels or {})
        self._binary_pixels = binary_pixels
        self.timings_ms = {} if timings_ms is None else timings_ms
        self.batch_images = 1  # images in the forward pass that made this result
        self._coverage: float | None = None
        self._render: Callable[[], MaskResult] | None = None
        self._render_lock: threading.Lock | None = None

    @classmethod
    def deferred(cls, render: Callable[[], "MaskResult"]) -> "MaskResult":
        """A result that ``render`` makes when it is first read, in the thread that reads it
        (once, whichever thread comes first). Its ``timings_ms`` gain ``render``'s then."""
        result = cls()
        result._render, result._render_lock = render, threading.Lock()
        return result

    def _made(self) -> None:
        if self._render is None:
            return
        with self._render_lock:
            if self._render is None:
                return
            made = self._render()
            self._raw, self._binary, self._compute = made._raw, made._binary, made._compute
            self._raw_pixels, self._binary_pixels = made._raw_pixels, made._binary_pixels
            self.timings_ms.update(made.timings_ms)
            self._render = None

    @property
    def raw(self) -> np.ndarray:
        self._made()
        if self._raw is None:
            self._raw, binary = self._compute()
            if self._binary is None and self._binary_pixels is None:
                self._binary = binary
        return self._raw

    @property
    def binary(self) -> np.ndarray:
        self._made()
        if self._binary is None:
            self._binary = self._binary_pixels != 0 if self._binary_pixels is not None else self._compute()[1]
        return self._binary

    @property
    def coverage(self) -> float:
        """Fraction of pixels on in the thresholded mask (counted once: the record, the outcome
        and the log line each ask)."""
        if self._coverage is None:
            pixels = self.binary_pixels()
            self._coverage = float(np.count_nonzero(pixels)) / pixels.size if pixels.size else 0.0
        return self._coverage

    def raw_pixels(self, bits: int = 8) -> np.ndarray:
        """``round(raw * (2**bits - 1))`` as uint8 or uint16."""
        self._made()
        if bits not in self._raw_pixels:
            top = (1 << bits) - 1
            self._raw_pixels[bits] = np.rint(self.raw * top).astype(np.uint8 if bits == 8 else np.uint16)
        return self._raw_pixels[bits]

    def binary_pixels(self) -> np.ndarray:
        self._made()
        if self._binary_pixels is None:
            self._binary_pixels = self.binary.astype(np.uint8) * 255
        return self._binary_pixels
