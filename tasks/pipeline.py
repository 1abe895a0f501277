"""Mask a stream of keys from one store into another: the work of ``clipmask run`` and of a task.

Reading and decoding run ahead in a thread pool, inference runs in batches in the calling thread,
and encoding and writing run behind it in the same pool, so the device does not wait for storage.
Every input ends in exactly one ``Outcome``; a bad image fails alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from PIL import Image

from storage import ObjectStore, is_transient
from storage.layout import output_keys
from worker.codecs import decode_image
from worker.config import env_int
from worker.engine import MaskEngine, MaskResult
from worker.errors import ImageError
from worker.outputs import encode_masks, encode_metadata, metadata_record, worker_identity
from worker.spec import MaskSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Attempts of one storage call before a transient error (ConnectionError, TimeoutError) counts.
STORAGE_ATTEMPTS = 4
#: First back-off delay in seconds; doubles with each attempt.
STORAGE_BACKOFF_S = 0.5
#: Threads for reading, decoding, preprocessing, encoding and writing: enough to hide storage
#: latency, and one per core so that CPU work keeps up with a GPU (``CLIPMASK_IO_THREADS``).
IO_THREADS = env_int("CLIPMASK_IO_THREADS", min(16, max(4, os.cpu_count() or 1)))


@dataclass
class Outcome:
    """What happened to one input; ``row()`` is its manifest line."""

    key: str
    source: str
    status: str  # succeeded | failed | skipped
    outputs: dict[str, str] | None = None
    error: str | None = None
    coverage: float | None = None
    metadata: dict | None = None  # the R.json record, for succeeded inputs

    def row(self) -> dict:
        row = {"source": self.source, "status": self.status}
        if self.outputs:
            row["outputs"] = self.outputs
        if self.error:
            row["error"] = self.error
        return row


@dataclass
class _Loaded:
    key: str
    image: Image.Image | None = None
    pixels: torch.Tensor | None = None  # the engine's input tensor, prepared in a loader thread
    outcome: Outcome | None = None  # set when the input already has its outcome
    timings_ms: dict = field(default_factory=dict)


def with_retries(call: Callable[[], T], what: str) -> T:
    """Run ``call``, retrying transient storage errors with exponential back-off."""
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return call()
        except OSError as err:
            if not is_transient(err) or attempt == STORAGE_ATTEMPTS - 1:
                raise
            delay = STORAGE_BACKOFF_S * 2 ** attempt
            log.warning("%s: transient storage error (%s), retrying in %.1fs", what, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Pipeline:
    """Masks keys relative to ``source`` into ``dest`` with one engine and one spec."""

    def __init__(self, engine: MaskEngine, source: ObjectStore, dest: ObjectStore, spec: MaskSpec,
                 skip_existing: bool = False, context: str = ""):
        self.engine, self.source, self.dest, self.spec = engine, source, dest, spec
        self.skip_existing = skip_existing
        self.context = context  # e.g. "job 1f2e task 9a8b", prefixed to every log line
        self.worker = worker_identity(str(engine.device))

    def run(self, keys: Iterable[str]) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per key, in completion order."""
        with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="clipmask-io") as pool:
            saves: deque[Future] = deque()
            for batch in self._loaded_batches(pool, keys):
                ready = [item for item in batch if item.outcome is None]
                yield from (item.outcome for item in batch if item.outcome is not None)
                for item, result in self._infer(ready):
                    saves.append(pool.submit(self._save, item, result))
                while len(saves) > 2 * self.engine.batch_size:
                    yield saves.popleft().result()
            while saves:
                yield saves.popleft().result()

    def _loaded_batches(self, pool: ThreadPoolExecutor, keys: Iterable[str]) -> Iterator[list[_Loaded]]:
        """Batches of loaded inputs, reading up to two batches ahead of inference."""
        size = self.engine.batch_size
        pending: deque[Future] = deque()
        for key in keys:
            pending.append(pool.submit(self._load, key))
            if len(pending) >= 2 * size:
                yield [pending.popleft().result() for _ in range(size)]
        while pending:
            yield [pending.popleft().result() for _ in range(min(size, len(pending)))]

    def _load(self, key: str) -> _Loaded:
        item = _Loaded(key)
        try:
            if self.skip_existing and self.dest.exists(output_keys(key)["metadata"]):
                item.outcome = Outcome(key, self.source.url_for(key), "skipped")
                return item
            started = time.perf_counter()
            data = with_retries(lambda: self.source.read_bytes(key), self._name(key))
            read = time.perf_counter()
            item.image = decode_image(data)
            self.engine.check(item.image, self.spec)
            decoded = time.perf_counter()
            item.pixels = self.engine.prepare(item.image, self.spec)
            item.timings_ms = {"download": (read - started) * 1e3, "decode": (decoded - read) * 1e3,
                               "preprocess": (time.perf_counter() - decoded) * 1e3}
        except (ImageError, OSError) as err:
            item.outcome = self._failed(key, err)
        return item

    def _infer(self, items: list[_Loaded]) -> list[tuple[_Loaded, MaskResult | Exception]]:
        """Run the batch; if it fails as a whole, run each image alone so one failure stays one."""
        if not items:
            return []
        try:
            results = self.engine.predict([item.image for item in items], self.spec,
                                          [item.pixels for item in items])
            return list(zip(items, results, strict=True))
        except Exception as err:  # noqa: BLE001 - isolate the culprit below
            if len(items) == 1:
                return [(items[0], err)]
            log.warning("%sbatch of %d failed (%s); retrying one image at a time", self._prefix(), len(items), err)
            return [pair for item in items for pair in self._infer([item])]

    def _save(self, item: _Loaded, result: MaskResult | Exception) -> Outcome:
        if isinstance(result, Exception):
            return self._failed(item.key, result)
        try:
            return self._write_outputs(item, result)
        except OSError as err:
            return self._failed(item.key, err)

    def _write_outputs(self, item: _Loaded, result: MaskResult) -> Outcome:
        started = time.perf_counter()
        keys = output_keys(item.key)
        blobs = encode_masks(result, self.spec)
        encoded = time.perf_counter()
        for role in ("mask", "raw"):
            with_retries(lambda: self.dest.write_bytes(keys[role], blobs[role], "image/png"), self._name(item.key))
        urls = {role: self.dest.url_for(key) for role, key in keys.items()}
        timings = {**item.timings_ms, **result.timings_ms, "encode": (encoded - started) * 1e3,
                   "upload": (time.perf_counter() - encoded) * 1e3}
        record = metadata_record(
            source=self.source.url_for(item.key), size=item.image.size, spec=self.spec,
            model=self.engine.model_info, result=result, outputs=urls, timings_ms=timings, worker=self.worker,
        )
        # The metadata goes last: its presence means the image is complete (--skip-existing).
        with_retries(lambda: self.dest.write_bytes(keys["metadata"], encode_metadata(record), "application/json"),
                     self._name(item.key))
        log.info("%smasked %s (coverage %.3f)", self._prefix(), item.key, result.coverage)
        return Outcome(item.key, record["source"], "succeeded", urls, coverage=result.coverage, metadata=record)

    def _failed(self, key: str, err: BaseException) -> Outcome:
        message = f"{type(err).__name__}: {err}"
        log.warning("%sfailed %s: %s", self._prefix(), key, message)
        return Outcome(key, self.source.url_for(key), "failed", error=message)

    def _prefix(self) -> str:
        return f"[{self.context}] " if self.context else ""

    def _name(self, key: str) -> str:
        return self._prefix() + self.source.url_for(key)
