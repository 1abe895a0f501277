"""Mask a stream of keys from one store into another: the work of ``clipmask run`` and of a task.

Reading and decoding run ahead in a thread pool shared by every pipeline of the process (on a
GPU, JPEGs are only read there, and decoded on the device: ``worker.gpu_decode``);
inference runs in the engine's device loop (``worker.batcher``), which batches the images of every
pipeline feeding it (the tasks a worker holds at once); encoding and writing run behind it in the
same pool, so the device does not wait for storage.
Every input ends in exactly one ``Outcome``, yielded in input order; any error while handling one
image fails that image alone. Storage calls are not retried here: the storage layer already did
(docs/operations.md, "Jobs at scale": retries); an image that still met a transient error says so (``Outcome.transient``),
so that the task can run its chunk again later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from celery.exceptions import SoftTimeLimitExceeded

from storage import ObjectStore, is_transient
from storage.layout import output_keys
from worker import metrics, settings
from worker.batcher import DeviceLoop, device_loop
from worker.engine import MaskEngine, MaskResult
from worker.gpu_decode import Prepared
from worker.outputs import encode_masks, encode_metadata, metadata_record, worker_identity
from worker.spec import MaskSpec

log = logging.getLogger(__name__)



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
    transient: bool = False  # failed on an error worth retrying later (storage away)

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
    prepared: Prepared | None = None  # the engine's input (``MaskEngine.load_input``)
    outcome: Outcome | None = None  # set when the input already has its outcome
    timings_ms: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the upright full-resolution image."""
        return self.prepared.size


class Pipeline:
    """Masks keys relative to ``source`` into ``dest`` with one engine and one spec.

    ``deadline`` (a ``time.monotonic()`` value) bounds ``run``: past it, ``run`` raises Celery's
    ``SoftTimeLimitExceeded``, as the soft time limit would under the prefork pool (the threads
    pool that batches tasks together cannot interrupt a task itself)."""

    def __init__(self, engine: MaskEngine, source: ObjectStore, dest: ObjectStore, spec: MaskSpec,
                 skip_existing: bool = False, context: str = "", deadline: float | None = None):
        self.engine, self.source, self.dest, self.spec = engine, source, dest, spec
        self.skip_existing = skip_existing
        self.context = context  # e.g. "job 1f2e task 9a8b", prefixed to every log line
        self.deadline = deadline
        self.worker = worker_identity(str(engine.device))
        self.labels = {"model": str(engine.model_info.get("id", "")), "device": str(engine.device)}

    def run(self, keys: Iterable[str]) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per key, in the order of ``keys``."""
        labels = dict(self.labels)
        pool, loop = io_pool(), device_loop(self.engine, lambda size: metrics.observe_batch(size, labels))
        outcomes: deque[Future] = deque()
        for batch in self._loaded_batches(pool, loop, keys):
            ready = [item for item in batch if item.outcome is None]
            inferred = iter(loop.submit(self.spec, [item.prepared for item in ready]))
            for item in batch:
                outcomes.append(_resolved(item.outcome) if item.outcome is not None
                                else self._saved(pool, item, next(inferred)))
            while len(outcomes) > 2 * self.engine.batch_size:
                yield self._observed(self._result(outcomes.popleft()))
        while outcomes:
            yield self._observed(self._result(outcomes.popleft()))

    def _saved(self, pool: ThreadPoolExecutor, item: "_Loaded", inferred: Future) -> Future:
        """The outcome of ``item`` once its inference is done and its outputs are written (in the
        pool, so that the device loop only hands results over)."""
        saved: Future = Future()

        def save(done: Future) -> None:
            error = done.exception()
            written = pool.submit(self._save, item, error if error is not None else done.result())
            written.add_done_callback(lambda w: saved.set_result(w.result()))

        inferred.add_done_callback(save)
        return saved

    def _result(self, future: Future):
        if self.deadline is None:
            return future.result()
        try:
            return future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except FutureTimeout:
            raise SoftTimeLimitExceeded(f"{self._prefix()}time limit reached before every image was masked") from None

    def _observed(self, outcome: Outcome) -> Outcome:
        metrics.observe_outcome(outcome.status, self.labels, (outcome.metadata or {}).get("timings_ms"))
        return outcome

    def _loaded_batches(self, pool: ThreadPoolExecutor, loop: DeviceLoop,
                        keys: Iterable[str]) -> Iterator[list[_Loaded]]:
        """Batches of loaded inputs, reading up to two batches ahead of inference (the device loop
        knows they are coming: a partial batch may wait for them)."""
        size = self.engine.batch_size
        pending: deque[Future] = deque()
        for key in keys:
            pending.append(pool.submit(self._load, key, loop))
            if len(pending) >= 2 * size:
                yield [self._result(pending.popleft()) for _ in range(size)]
        while pending:
            yield [self._result(pending.popleft()) for _ in range(min(size, len(pending)))]

    def _load(self, key: str, loop: DeviceLoop) -> _Loaded:
        item = _Loaded(key)
        try:
            with loop.loading():
                if self.skip_existing and self.dest.exists(output_keys(key)["metadata"]):
                    item.outcome = Outcome(key, self.source.url_for(key), "skipped")
                    return item
                started = time.perf_counter()
                data = self.source.read_bytes(key)
                read = time.perf_counter()
                item.prepared = self.engine.load_input(data, self.spec)  # on a GPU, a JPEG stays encoded
                item.timings_ms = {"download": (read - started) * 1e3, **(item.prepared.timings_ms or {})}
        except Exception as err:  # noqa: BLE001 - whatever it is, it fails this image alone
            item.outcome = self._failed(key, err)
        return item

    def _save(self, item: _Loaded, result: MaskResult | Exception) -> Outcome:
        if isinstance(result, Exception):
            return self._failed(item.key, result)
        try:
            return self._write_outputs(item, result)
        except Exception as err:  # noqa: BLE001 - whatever it is, it fails this image alone
            return self._failed(item.key, err)

    def _write_outputs(self, item: _Loaded, result: MaskResult) -> Outcome:
        started = time.perf_counter()
        keys = output_keys(item.key)
        blobs = encode_masks(result, self.spec)
        encoded = time.perf_counter()
        for role, blob in blobs.items():
            self.dest.write_bytes(keys[role], blob, "image/png")
        urls = {role: self.dest.url_for(key) for role, key in keys.items() if role in blobs or role == "metadata"}
        timings = {**item.timings_ms, **result.timings_ms, "encode": (encoded - started) * 1e3,
                   "upload": (time.perf_counter() - encoded) * 1e3}
        worker = {**self.worker, "batch_images": result.batch_images}
        record = metadata_record(
            source=self.source.url_for(item.key), size=item.size, spec=self.spec,
            model=self.engine.model_info, result=result, outputs=urls, timings_ms=timings, worker=worker,
        )
        # The metadata goes last: its presence means the image is complete (--skip-existing).
        self.dest.write_bytes(keys["metadata"], encode_metadata(record), "application/json")
        log.info("%smasked %s (coverage %.3f)", self._prefix(), item.key, result.coverage)
        return Outcome(item.key, record["source"], "succeeded", urls, coverage=result.coverage, metadata=record)

    def _failed(self, key: str, err: BaseException) -> Outcome:
        message = f"{type(err).__name__}: {err}"
        log.warning("%sfailed %s: %s", self._prefix(), self.source.url_for(key), message)
        return Outcome(key, self.source.url_for(key), "failed", error=message, transient=is_transient(err))

    def _prefix(self) -> str:
        return f"[{self.context}] " if self.context else ""


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """The process's pool for reading, decoding, encoding and writing, shared by every pipeline:
    its work never waits on other work in it, so it cannot deadlock. ``CLIPMASK_IO_THREADS``
    threads: enough to hide storage latency, and one per core so that CPU work keeps up with a GPU."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(settings.IO_THREADS.get(), thread_name_prefix="clipmask-io")
        return _POOL


def _resolved(outcome: Outcome) -> Future:
    future: Future = Future()
    future.set_result(outcome)
    return future
