"""Mask a stream of keys from one store into another: the work of ``clipmask run`` and of a task.

Each image is read by a storage thread, decoded by a CPU thread (on a GPU, a JPEG is only parsed
there, and decoded on the device: ``worker.gpu_decode``), masked by the engine's device loop
(``worker.batcher``, which batches the images of every pipeline feeding it: the tasks a worker
holds at once), encoded by a CPU thread, and written by storage threads: its two masks at the same
time, then its metadata record. The pools are the process's (``pools.py``); reads run ahead of the
model by a window sized in bytes (``CLIPMASK_READAHEAD_MB``), so hundreds of requests can be in
flight while the device works.
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
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from celery.exceptions import SoftTimeLimitExceeded

from storage import ObjectStore, is_transient
from storage.layout import output_keys
from tasks.pipeline.pools import chain, cpu_pool, gather, resolved, storage_pool, then
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
    data: bytes | None = None  # the file, between its read and its decoding

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
        self._read = [0, 0]  # images read, and their bytes: the window's measure (``_window``)
        self._read_lock = threading.Lock()
        self._readahead_bytes = settings.READAHEAD_MB.get() * 1024 * 1024
        self._in_flight = settings.S3_CONCURRENCY.get()

    def run(self, keys: Iterable[str]) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per key, in the order of ``keys``."""
        labels = dict(self.labels)
        loop = device_loop(self.engine, lambda size: metrics.observe_batch(size, labels))
        outcomes: deque[Future] = deque()
        for batch in self._loaded_batches(loop, keys):
            ready = [item for item in batch if item.outcome is None]
            inferred = iter(loop.submit(self.spec, [item.prepared for item in ready]))
            for item in batch:
                outcomes.append(resolved(item.outcome) if item.outcome is not None
                                else self._saved(item, next(inferred)))
            while len(outcomes) > self._window():
                yield self._observed(self._result(outcomes.popleft()))
        while outcomes:
            yield self._observed(self._result(outcomes.popleft()))

    def _window(self) -> int:
        """Images read ahead of the model, and written behind it, at most: with a store across a
        network, what ``CLIPMASK_READAHEAD_MB`` holds of the images read so far (two batches until
        the first is read), within two batches and ``CLIPMASK_S3_CONCURRENCY``; else two batches."""
        size = self.engine.batch_size
        images, size_bytes = self._read
        if not images or not (self.source.networked or self.dest.networked):
            return 2 * size
        fits = self._readahead_bytes * images // max(1, size_bytes)
        return max(2 * size, min(fits, self._in_flight))

    def _saved(self, item: "_Loaded", inferred: Future) -> Future:
        """The outcome of ``item`` once its inference is done and its outputs are written: encoded
        by a CPU thread, then both masks written at the same time, then the metadata record (its
        presence means the image is complete, for ``--skip-existing``)."""
        if not self.dest.networked:  # a local disk: encoding and writing are one CPU step
            recorded = then(inferred, lambda result: self._write_record(item, self._write_local(
                self._encode(item, result))), cpu_pool())
        else:
            encoded = then(inferred, lambda result: self._encode(item, result), cpu_pool())
            written = chain(encoded, self._write_masks)
            recorded = chain(written, lambda step: storage_pool().submit(self._write_record, item, step))
        return _outcome_of(recorded, lambda err: self._failed(item.key, err))

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

    def _loaded_batches(self, loop: DeviceLoop, keys: Iterable[str]) -> Iterator[list[_Loaded]]:
        """Batches of loaded inputs, reading up to a window ahead of inference (the device loop
        knows they are coming: a partial batch may wait for them)."""
        size = self.engine.batch_size
        pending: deque[Future] = deque()
        for key in keys:
            pending.append(self._load(key, loop))
            if len(pending) >= max(2 * size, self._window()):
                yield [self._result(pending.popleft()) for _ in range(size)]
        while pending:
            yield [self._result(pending.popleft()) for _ in range(min(size, len(pending)))]

    def _load(self, key: str, loop: DeviceLoop) -> Future:
        """``key`` read by a storage thread, then decoded by a CPU thread (from a local disk, both
        by a CPU thread): a ``_Loaded`` whose ``outcome`` is set when it is skipped or failed."""
        loading = loop.loading()
        loading.__enter__()  # until it is decoded: a partial batch may wait for it
        if self.source.networked:
            loaded = then(storage_pool().submit(self._fetch, key), self._decode, cpu_pool())
        else:  # a local disk: reading and decoding are one CPU step
            loaded = cpu_pool().submit(lambda: self._decode(self._fetch(key)))
        loaded.add_done_callback(lambda _: loading.__exit__(None, None, None))
        return loaded

    def _fetch(self, key: str) -> _Loaded:
        item = _Loaded(key)
        try:
            if self.skip_existing and self.dest.exists(output_keys(key)["metadata"]):
                item.outcome = Outcome(key, self.source.url_for(key), "skipped")
                return item
            started = time.perf_counter()
            item.data = self.source.read_bytes(key)
            item.timings_ms = {"download": (time.perf_counter() - started) * 1e3}
            with self._read_lock:
                self._read[0] += 1
                self._read[1] += len(item.data)
        except Exception as err:  # noqa: BLE001 - whatever it is, it fails this image alone
            item.outcome = self._failed(key, err)
        return item

    def _decode(self, item: _Loaded) -> _Loaded:
        if item.outcome is not None:
            return item
        try:
            item.prepared = self.engine.load_input(item.data, self.spec)  # on a GPU, a JPEG stays encoded
            item.timings_ms.update(item.prepared.timings_ms or {})
        except Exception as err:  # noqa: BLE001 - whatever it is, it fails this image alone
            item.outcome = self._failed(item.key, err)
        item.data = None
        return item

    def _encode(self, item: _Loaded, result: MaskResult) -> "_Written":
        started = time.perf_counter()
        blobs = encode_masks(result, self.spec)
        return _Written(item.key, result, blobs, {"encode": (time.perf_counter() - started) * 1e3})

    def _write_masks(self, step: "_Written") -> Future:
        """Both PNGs written at the same time (one round trip, not two); a future of ``step``."""
        keys, step.upload_started = output_keys(step.item_key), time.perf_counter()
        writes = [storage_pool().submit(self.dest.write_bytes, keys[role], blob, "image/png")
                  for role, blob in step.blobs.items()]
        return chain(gather(writes), lambda _: resolved(step))

    def _write_local(self, step: "_Written") -> "_Written":
        keys, step.upload_started = output_keys(step.item_key), time.perf_counter()
        for role, blob in step.blobs.items():
            self.dest.write_bytes(keys[role], blob, "image/png")
        return step

    def _write_record(self, item: _Loaded, step: "_Written") -> Outcome:
        result, keys = step.result, output_keys(item.key)
        urls = {role: self.dest.url_for(key) for role, key in keys.items() if role in step.blobs or role == "metadata"}
        timings = {**item.timings_ms, **result.timings_ms, **step.timings_ms,
                   "upload": (time.perf_counter() - step.upload_started) * 1e3}
        worker = {**self.worker, "batch_images": result.batch_images}
        record = metadata_record(
            source=self.source.url_for(item.key), size=item.size, spec=self.spec,
            model=self.engine.model_info, result=result, outputs=urls, timings_ms=timings, worker=worker,
        )
        self.dest.write_bytes(keys["metadata"], encode_metadata(record), "application/json")
        log.info("%smasked %s (coverage %.3f)", self._prefix(), item.key, result.coverage)
        return Outcome(item.key, record["source"], "succeeded", urls, coverage=result.coverage, metadata=record)

    def _failed(self, key: str, err: BaseException) -> Outcome:
        message = f"{type(err).__name__}: {err}"
        log.warning("%sfailed %s: %s", self._prefix(), self.source.url_for(key), message)
        return Outcome(key, self.source.url_for(key), "failed", error=message, transient=is_transient(err))

    def _prefix(self) -> str:
        return f"[{self.context}] " if self.context else ""


@dataclass
class _Written:
    """One image between its encoding and its metadata record."""

    item_key: str
    result: MaskResult
    blobs: dict[str, bytes]
    timings_ms: dict
    upload_started: float = 0.0


def _outcome_of(future: Future, failed) -> Future:
    """A future that always ends in an ``Outcome``: ``future``'s, or ``failed(its exception)``."""
    out: Future = Future()
    future.add_done_callback(lambda done: out.set_result(failed(done.exception()) if done.exception() is not None
                                                         else done.result()))
    return out
