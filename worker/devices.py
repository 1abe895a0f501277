"""Device selection: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

The parent of a pool of GPU workers must never initialise CUDA (a CUDA context does not survive
``fork``). ``count_gpus`` therefore asks NVML through ``torch.cuda.device_count``, which does not
create a context; only ``resolve_device`` inside a worker process touches the device itself.
"""

from __future__ import annotations

import functools

import torch

from worker import settings
from worker.errors import DeviceError
from worker.options import PRECISIONS, validate_device

#: Images per backbone batch when ``--batch-size`` is not given.
DEFAULT_BATCH_SIZE = {"cpu": 4, "cuda": 32}


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


@functools.cache
def _process_threads() -> int:
    """Torch's threads as this process started (read once: the engine then sets them per pass)."""
    return torch.get_num_threads()


def cpu_streams() -> tuple[int, int, int]:
    """(forward passes run side by side on the CPU, torch threads each, torch threads in all).

    ``CLIPMASK_CPU_STREAMS`` passes (default 2, or 1 with a single torch thread) share the torch
    threads this process started with (``OMP_NUM_THREADS``, else the physical cores). On two cores,
    two passes of one thread each keep both cores busy with no thread waiting for its partner
    at every operator, so host work (decoding, encoding) that preempts one pass does not stall
    the other. Raises ``ValueError`` naming the variable when it is not a positive integer.
    """
    total = _process_threads()
    streams = settings.CPU_STREAMS.get() or (2 if total >= 2 else 1)
    return streams, max(1, total // streams), total


#: The dtype ``load_model`` is asked for. ``int8`` loads fp32 weights and then quantises the vision
#: encoder's Linear layers dynamically (int8 weights, activations quantised per batch).
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.qint8}


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision name (``fp32``, ``fp16``, ``bf16`` or ``int8``) for ``device``.

    Raises ``DeviceError`` for an unknown value, fp16 on CPU (no fast fp16 matmuls there) and int8
    on CUDA (dynamic quantisation runs on the CPU only). Touches no device: checks ``device.type``.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise DeviceError("--precision fp16 is not supported on cpu (fp16 matmuls there are slow or missing); "
                          "use fp32 (auto), int8 (faster, quantised) or bf16 on cpu")
    if device.type == "cuda" and precision == "int8":
        raise DeviceError("--precision int8 is CPU-only (dynamic quantisation); use fp16 (or auto) on cuda")
    return precision


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype to load the model in: ``auto`` is fp16 on CUDA and fp32 on CPU; ``int8`` (CPU
    only) is ``torch.qint8``, which ``load_model`` reads as "fp32, vision encoder quantised".
    Raises ``DeviceError`` as ``resolve_precision`` does."""
    return _DTYPES[resolve_precision(device, precision)]


def precision_name(dtype: torch.dtype) -> str:
    """The ``--precision`` name of a ``resolve_dtype`` result (for logs and model info)."""
    return {dtype_: name for name, dtype_ in _DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))
