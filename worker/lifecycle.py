"""One mask engine per worker process, on that process's own device.

``clipmask worker`` starts one process per device (``worker/start.py``); each calls
``setup(device)`` before Celery starts taking tasks, so the model is loaded once, in that
process, after its own start (the parent never initialises CUDA). Where nothing called it (``celery
-A worker.celery_app worker``), ``engine()`` loads the model on the first task, on the default
device.
"""

from __future__ import annotations

import logging
import os
import threading

from worker import settings
from worker.engine import MaskEngine
from worker.model_source import describe_model

log = logging.getLogger("clipmask.worker")

_engine: MaskEngine | None = None
_lock = threading.Lock()


def setup(device: str = "auto") -> MaskEngine:
    """Load this process's engine on ``device`` (model ``CLIPMASK_MODEL``, precision and batch
    size ``CLIPMASK_PRECISION`` and ``CLIPMASK_BATCH_SIZE``) and log what it runs; idempotent."""
    global _engine
    with _lock:
        if _engine is None:
            engine = MaskEngine.load(device=device, precision=settings.PRECISION.get(),
                                     batch_size=settings.BATCH_SIZE.get())
            log.info("pid %d: engine ready: model %s on %s, batches of up to %d images", os.getpid(),
                     describe_model(engine.model_info), engine.device, engine.batch_size)
            _engine = engine
    return _engine


def engine() -> MaskEngine:
    """This process's engine, loading it on first use."""
    return _engine or setup()
