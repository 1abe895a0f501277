"""``MaskSpec``: everything that decides what a mask looks like, validated once at the edge.

A spec travels inside Celery messages as a plain JSON dict (``to_dict`` / ``from_dict``), and is
recorded verbatim in every metadata file so that a mask can be reproduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from worker import settings
from worker.errors import InvalidSpecError

PROMPT_DELIMITER = "|"
PROFILES = ("default", "masquerade")
#: Largest image side the ``masquerade`` profile accepts by default, in pixels. Its backbone runs
#: at max(W, H) squared, so attention memory grows with the fourth power of the side.
DEFAULT_MAX_SIDE = settings.MAX_SIDE.default
#: The image files, by role: the thresholded mask and the raw mask.
IMAGE_OUTPUTS = ("mask", "raw")
#: Every output a spec may ask for: the image files, and ``rle``, the thresholded mask run-length
#: encoded (COCO) in the metadata record, which writes no file of its own.
OUTPUTS = IMAGE_OUTPUTS + ("rle",)


def split_prompts(text: str | None) -> tuple[str, ...]:
    """Split ``a|b| |c`` into ``("a", "b", "c")``: stripped, empties dropped."""
    if not text:
        return ()
    return tuple(p.strip() for p in text.split(PROMPT_DELIMITER) if p.strip())


def split_outputs(value: str | list | tuple) -> tuple:
    """``mask, rle`` (as the CLI, a form field or a scheduled entry gives it) or a list of roles,
    as the tuple ``MaskSpec.outputs`` takes; anything else is left for the spec to refuse."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class MaskSpec:
    """What to mask and how. Raises ``InvalidSpecError`` on construction when invalid."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] = ()
    threshold: float = 0.5
    normalize: bool = False
    profile: str = "default"
    blur_sigma: float = 0.0  # Gaussian sigma in pixels, on the raw mask, before thresholding
    grow: int = 0  # pixels; negative shrinks the thresholded mask
    invert: bool = False
    raw_bits: int = 8  # bit depth of the raw mask PNG: 8 or 16
    max_side: int = DEFAULT_MAX_SIDE  # masquerade only: longest image side accepted, in pixels
    outputs: tuple[str, ...] = IMAGE_OUTPUTS  # any of OUTPUTS: "mask", "raw" (files), "rle" (in the record)

    @classmethod
    def from_text(cls, prompt: str, negative: str | None = None, **options) -> "MaskSpec":
        """Build a spec from the ``a|b`` prompt strings users type (``outputs`` as ``split_outputs``
        takes it)."""
        if "outputs" in options:
            options["outputs"] = split_outputs(options["outputs"])
        return cls(prompts=split_prompts(prompt), negative_prompts=split_prompts(negative), **options)

    @classmethod
    def from_dict(cls, data: dict) -> "MaskSpec":
        """Inverse of ``to_dict``; unknown keys raise ``InvalidSpecError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpecError(f"unknown mask option(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("prompts", "negative_prompts", "outputs"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prompts"] = list(self.prompts)
        data["negative_prompts"] = list(self.negative_prompts)
        data["outputs"] = list(self.outputs)
        return data

    def __post_init__(self):
        _check(bool(self.prompts), "no positive prompt: pass --prompt, e.g. --prompt 'a cat|dog'")
        _check(0.0 <= self.threshold <= 1.0, f"--threshold must be in [0, 1], got {self.threshold}")
        _check(self.profile in PROFILES, f"--profile must be one of {PROFILES}, got {self.profile!r}")
        _check(self.blur_sigma >= 0, f"--blur must be >= 0 pixels, got {self.blur_sigma}")
        _check(isinstance(self.grow, int), f"--grow must be a whole number of pixels, got {self.grow!r}")
        _check(self.raw_bits in (8, 16), f"--raw-bits must be 8 or 16, got {self.raw_bits}")
        _check(isinstance(self.outputs, tuple) and bool(self.outputs) and set(self.outputs) <= set(OUTPUTS),
               f"--outputs must be one or more of {', '.join(OUTPUTS)}, comma-separated (e.g. mask,raw or "
               f"mask,rle), got {','.join(map(str, self.outputs))!r}")
        _check(self.max_side > 0, f"--max-side must be a positive number of pixels, got {self.max_side}")

    @property
    def all_prompts(self) -> tuple[str, ...]:
        """Positives then negatives: the order in which the decoder sees them."""
        return self.prompts + self.negative_prompts


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSpecError(message)
