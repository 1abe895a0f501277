"""clipmask's own environment variables on the worker side: the model, the engine, the device
loop and the worker processes. The job side's are in ``tasks/settings.py``; the two tables
together are the configuration table of ``docs/operations.md`` (a test checks that they agree).

Every variable is a ``Setting``, read when asked (``MAX_PIXELS.get()``), never at import: a value
set after start-up (a test, ``clipmask worker --model``) is seen, and a malformed value fails
where it is used, with a ``ValueError`` naming the variable and what it takes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SETTINGS", "Setting"]


@dataclass(frozen=True)
class Setting:
    """One ``CLIPMASK_*`` variable: its name, its default and what it means.

    ``kind`` is how its text is read: ``int`` (a whole number, at least ``minimum``), ``flag``
    (``0`` is off, any other number on), ``text`` or ``json``. ``default`` is the value when the
    variable is unset or empty, or a function computing it; ``shown`` is how the table writes a
    default that is computed.
    """

    name: str
    default: Any
    meaning: str
    kind: str = "int"
    minimum: int | None = None
    shown: str | None = None

    def get(self) -> Any:
        raw = os.environ.get(self.name, "").strip()
        if not raw:
            return self.default() if callable(self.default) else self.default
        return _READERS[self.kind](self, raw)

    @property
    def default_text(self) -> str:
        """The default as the configuration table writes it."""
        if self.shown is not None:
            return self.shown
        return f"`{self.default}`" if isinstance(self.default, str) else json.dumps(self.default)


def _whole(setting: Setting, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{setting.name} must be a whole number, got {raw!r}") from None
    if setting.minimum is not None and value < setting.minimum:
        raise ValueError(f"{setting.name} must be at least {setting.minimum}, got {value}")
    return value


def _flag(setting: Setting, raw: str) -> bool:
    return _whole(setting, raw) != 0


def _json(setting: Setting, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{setting.name} must be JSON ({err}), got {raw!r}") from None


_READERS: dict[str, Callable[[Setting, str], Any]] = {
    "int": _whole, "flag": _flag, "text": lambda _setting, raw: raw, "json": _json}


def _cpu_threads() -> int:
    return max(2, len(os.sched_getaffinity(0)))


MODEL = Setting("CLIPMASK_MODEL", "CIDAS/clipseg-rd64-refined", "HF model id or local directory", "text")
MAX_PIXELS = Setting("CLIPMASK_MAX_PIXELS", 100_000_000, "decompression-bomb limit, pixels per image", minimum=1,
                     shown="100,000,000")
MAX_SIDE = Setting("CLIPMASK_MAX_SIDE", 2048, "default of `--max-side` (masquerade)", minimum=1)
REDUCED_DECODE = Setting("CLIPMASK_REDUCED_DECODE", True, "`0`: decode large JPEGs at full resolution in the "
                         "default profile too", "flag", shown="1")
DEVICE_DECODE = Setting("CLIPMASK_DEVICE_DECODE", True, "`0`: on a GPU, decode JPEGs on the host (Pillow) "
                        "instead of with nvJPEG", "flag", shown="1")
COMPILE = Setting("CLIPMASK_COMPILE", False, "`1`: run the backbone under `torch.compile` on a GPU", "flag",
                  shown="0")
BATCH_SIZE = Setting("CLIPMASK_BATCH_SIZE", None, "the worker's `--batch-size`", minimum=1,
                     shown="4 on CPU, 32 on CUDA")
PRECISION = Setting("CLIPMASK_PRECISION", "auto", "the worker's `--precision`", "text")
CPU_THREADS = Setting("CLIPMASK_CPU_THREADS", _cpu_threads, "threads per process for decoding, preprocessing and "
                      "encoding images (shared by its tasks)", minimum=1, shown="cores, at least 2")
S3_CONCURRENCY = Setting("CLIPMASK_S3_CONCURRENCY", 400, "storage requests one process has in flight at most "
                         "(threads that wait on storage; the S3 client's connections match): images/s x requests "
                         "per image x round trip", minimum=1)
READAHEAD_MB = Setting("CLIPMASK_READAHEAD_MB", 256, "images one pipeline (a task, or `clipmask run`) reads ahead "
                       "of the model, in MB", minimum=1)
WORKER_TASKS = Setting("CLIPMASK_WORKER_TASKS", 8, "default of `clipmask worker --tasks`: tasks one worker process "
                       "holds at once, feeding its device loop")
PROCESSES_PER_DEVICE = Setting("CLIPMASK_PROCESSES_PER_DEVICE", 1, "default of `clipmask worker "
                               "--processes-per-device`: worker processes on each device, each with its own "
                               "model, tasks and device loop")
BATCH_WAIT_MS = Setting("CLIPMASK_BATCH_WAIT_MS", 5, "how long a lone image waits for others to share its batch "
                        "while the device is idle", minimum=0)
BATCH_WAIT_LOADING_MS = Setting("CLIPMASK_BATCH_WAIT_LOADING_MS", 50, "... and how long while the process's tasks "
                                "are still downloading or decoding other images", minimum=0)
CPU_STREAMS = Setting("CLIPMASK_CPU_STREAMS", None, "on a CPU, forward passes run side by side, each on an equal "
                      "share of the torch threads (`OMP_NUM_THREADS`, else the cores)", minimum=1,
                      shown="2 (1 with one thread)")
METRICS_PORT = Setting("CLIPMASK_METRICS_PORT", 0, "`clipmask worker` serves Prometheus metrics on this port",
                       minimum=0, shown="off")
WATCHDOG_HELD_S = Setting("CLIPMASK_WATCHDOG_HELD_S", 120, "a worker process holding a received task unstarted "
                          "this long while it has free task slots exits (and is started again)", minimum=1)
WATCHDOG_IDLE_S = Setting("CLIPMASK_WATCHDOG_IDLE_S", None, "... or starting nothing this long while it has free "
                          "slots and its queue has ready messages", minimum=1, shown="the visibility timeout")

#: Every worker-side variable, by name.
SETTINGS: dict[str, Setting] = {setting.name: setting for setting in (
    MODEL, MAX_PIXELS, MAX_SIDE, REDUCED_DECODE, DEVICE_DECODE, COMPILE, BATCH_SIZE, PRECISION, CPU_THREADS,
    S3_CONCURRENCY, READAHEAD_MB, WORKER_TASKS, PROCESSES_PER_DEVICE, BATCH_WAIT_MS, BATCH_WAIT_LOADING_MS, CPU_STREAMS, METRICS_PORT,
    WATCHDOG_HELD_S, WATCHDOG_IDLE_S)}
