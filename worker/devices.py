"""Device selection: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

The parent of a pool of GPU workers must never initialise CUDA (a CUDA context does not survive
``fork``). ``count_gpus`` therefore asks NVML through ``torch.cuda.device_count``, which does not
create a context; only ``resolve_device`` inside a worker process touches the device itself.
"""

from __future__ import annotations

import re

import torch

from .errors import DeviceError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
#: Images per backbone batch when ``--batch-size`` is not given.
DEFAULT_BATCH_SIZE = {"cpu": 4, "cuda": 32}


def validate_device(spec: str) -> str:
    """Return ``spec`` if well formed; raises ``DeviceError`` with the accepted forms."""
    if not _DEVICE_RE.match(spec or ""):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N (e.g. cuda:1), got {spec!r}")
    return spec


def count_gpus() -> int:
    """Number of visible CUDA devices, without initialising CUDA in this process."""
    return torch.cuda.device_count()


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device spec into a ``torch.device``; raises ``DeviceError`` if it is not present."""
    validate_device(spec)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= available:
            raise DeviceError(f"--device {spec}: this machine has {available} CUDA device(s); use cpu or auto")
        device = torch.device("cuda", index)
    return device


def default_batch_size(device: torch.device) -> int:
    return DEFAULT_BATCH_SIZE[device.type]


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 on CPU; raises ``DeviceError`` for half precision on CPU."""
    choices = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in choices:
        raise DeviceError(f"--precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        raise DeviceError(f"--precision {precision} needs a CUDA device; use fp32 (or auto) on cpu")
    return choices[precision]
