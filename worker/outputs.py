"""One image's outputs: the two PNGs, the mask's RLE and the metadata record (docs/design.md, "Outputs")."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from functools import cache
from importlib import metadata as package_metadata

from worker import rle
from worker.codecs import encode_png
from worker.engine import MaskResult, output_roles
from worker.spec import MaskSpec


@cache
def clipmask_version() -> str:
    """The installed package's version, looked up once per process (``importlib.metadata`` scans
    every distribution on ``sys.path``: 0.3 ms, with the GIL held, for each image's record)."""
    try:
        return package_metadata.version("clipmask")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


def worker_identity(device: str) -> dict:
    """Who made a mask: host, process and device (never credentials)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": device}


def encode_masks(result: MaskResult, spec: MaskSpec) -> dict[str, bytes]:
    """PNG bytes by role, for the roles the spec asks for (``output_roles``): ``mask`` (0/255)
    and ``raw`` (``round(mask * max)``, 8 or 16 bit)."""
    roles = output_roles(spec)
    blobs = {}
    if "mask" in roles:
        blobs["mask"] = encode_png(result.binary_pixels(), binary=True)
    if "raw" in roles:
        blobs["raw"] = encode_png(result.raw_pixels(spec.raw_bits))
    return blobs


def encode_rle(result: MaskResult, spec: MaskSpec) -> dict | None:
    """The thresholded mask as COCO RLE (``worker.rle``) when the spec asks for ``rle``: the very
    pixels ``mask.png`` holds, at the image's full size; else None."""
    return rle.encode(result.binary_pixels()) if "rle" in spec.outputs else None


def metadata_record(*, source: str, size: tuple[int, int], spec: MaskSpec, model: dict,
                    result: MaskResult, outputs: dict[str, str], timings_ms: dict,
                    worker: dict, source_size: int | None = None, source_etag: str | None = None,
                    mask_rle: dict | None = None) -> dict:
    """The ``R.json`` record; ``outputs`` maps role to the full URL of each file written;
    ``source_size`` and ``source_etag`` say which version of the source was masked; ``mask_rle``
    (``encode_rle``) is its ``rle`` field, absent when not asked for."""
    width, height = size
    record = {
        "source": source,
        "source_size": source_size,
        "source_etag": source_etag,
        "width": width,
        "height": height,
        "prompts": list(spec.prompts),
        "negative_prompts": list(spec.negative_prompts),
        "threshold": spec.threshold,
        "normalize": spec.normalize,
        "profile": spec.profile,
        "postprocess": {"blur_sigma": spec.blur_sigma, "grow": spec.grow, "invert": spec.invert},
        "raw_bits": spec.raw_bits,
        "model": model,
        "coverage": result.coverage,
        "outputs": outputs,
        "timings_ms": {name: round(ms, 3) for name, ms in timings_ms.items()},
        "worker": worker,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "version": clipmask_version(),
    }
    if mask_rle is not None:
        record["rle"] = mask_rle
    return record


def encode_metadata(record: dict) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
