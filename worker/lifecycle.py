"""One mask engine per worker process, on that process's own device.

``clipmask worker`` puts the device list in ``CLIPMASK_WORKER_DEVICES`` (``cuda:0,cuda:1`` or
``cpu``) and starts one pool process per device. Each pool process picks the device at its pool
index and loads the model there, in ``setup()``, called from Celery's ``worker_process_init``:
after the fork, so the parent never initialises CUDA. A replaced process gets the same index,
hence the same device.
"""

from __future__ import annotations

import logging
import os

from billiard.process import current_process

from .config import env_int
from .engine import MaskEngine

log = logging.getLogger(__name__)

DEVICES_ENV = "CLIPMASK_WORKER_DEVICES"
_engine: MaskEngine | None = None


def process_device() -> str:
    """The device of this pool process: entry ``index`` of ``CLIPMASK_WORKER_DEVICES``."""
    devices = [d.strip() for d in os.environ.get(DEVICES_ENV, "auto").split(",") if d.strip()]
    index = getattr(current_process(), "index", None) or 0
    return devices[index % len(devices)] if devices else "auto"


def setup() -> MaskEngine:
    """Load this process's engine (model from ``CLIPMASK_MODEL``); idempotent."""
    global _engine
    if _engine is None:
        _engine = MaskEngine.load(
            device=process_device(),
            precision=os.environ.get("CLIPMASK_PRECISION", "auto"),
            batch_size=env_int("CLIPMASK_BATCH_SIZE", 0) or None,
        )
        log.info("pid %d: engine ready on %s", os.getpid(), _engine.device)
    return _engine


def engine() -> MaskEngine:
    """This process's engine, loading it on first use (e.g. under the solo pool)."""
    return _engine or setup()
