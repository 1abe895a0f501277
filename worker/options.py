"""The engine's options checked without torch, so that a typo is reported at once: ``--device``
forms and ``--precision`` names (``worker/devices.py`` resolves them on a machine)."""

from __future__ import annotations

import re

from worker.errors import DeviceError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
#: ``--precision`` values; ``auto`` is fp16 on CUDA and fp32 on CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def validate_device(spec: str) -> str:
    """Return ``spec`` if well formed; raises ``DeviceError`` with the accepted forms."""
    if not _DEVICE_RE.match(spec or ""):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N (e.g. cuda:1), got {spec!r}")
    return spec
