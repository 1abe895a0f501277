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

A deadline (the task's soft time limit) ends a run early: the inputs done keep their outcomes, and
each of the others fails without being waited for. Which way depends on what held them up. Every
storage request is registered from when it is queued for a storage thread until it ends; those
still pending ``STALL_GRACE_S`` after the deadline mean that storage did not answer, and then
every unfinished input fails as transient, naming the request ("storage did not answer within
the time limit: URL"), for the chunk to run again once storage is back. Without one, the inputs
were waiting on the device or the CPUs: they fail for good ("time limit reached before the image
was masked"). After the deadline, the run starts no new storage request and encodes nothing more.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from storage import ObjectStore, is_transient
from storage.availability import check_marker, is_unavailable
from storage.layout import output_keys
from tasks.pipeline.pools import chain, cpu_pool, gather, resolved, storage_pool, then
from worker import metrics, settings
from worker.batcher import DeviceLoop, device_loop
from worker.engine import MaskEngine, MaskResult, output_roles
from worker.gpu_decode import Prepared
from worker.outputs import encode_masks, encode_metadata, encode_rle, metadata_record, worker_identity
from worker.spec import MaskSpec

log = logging.getLogger(__name__)

#: Seconds that storage requests pending at the deadline get to end before the inputs waiting on
#: them count as held up by storage: a store that answers ends a request in milliseconds.
STALL_GRACE_S = 2.0
#: The error of an input that the deadline found waiting on the device or the CPUs.
TIME_LIMIT_ERROR = "SoftTimeLimitExceeded: time limit reached before the image was masked"


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
    transient: bool = False  # failed on an error worth retrying later (storage away or failing)
    away: bool = False  # ... which says that the store itself is away (a full disk, a share gone)

    def row(self) -> dict:
        row = {"source": self.source, "status": self.status}
        if self.outputs:
            row["outputs"] = self.outputs
        if self.error:
            row["error"] = self.error
        return row


class _Abandoned(Exception):
    """The run passed its deadline: its work not started yet is not started."""


class _Expired(Exception):
    """The deadline passed while the run waited."""


@dataclass
class _Slot:
    """One input between its start and its outcome: its load, then (once in a batch) its outcome."""

    key: str
    loaded: Future  # of a _Loaded
    outcome: Future | None = None  # of an Outcome


@dataclass
class _Loaded:
    key: str
    prepared: Prepared | None = None  # the engine's input (``MaskEngine.load_input``)
    outcome: Outcome | None = None  # set when the input already has its outcome
    timings_ms: dict = field(default_factory=dict)
    data: bytes | None = None  # the file, between its read and its decoding
    source_size: int | None = None
    source_etag: str | None = None  # which version of the source was read (S3's ETag)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the upright full-resolution image."""
        return self.prepared.size


class Pipeline:
    """Masks keys relative to ``source`` into ``dest`` with one engine and one spec.

    ``deadline`` (a ``time.monotonic()`` value) bounds ``run``, as the soft time limit would under
    the prefork pool (the threads pool that batches tasks together cannot interrupt a task
    itself): past it, ``run`` yields the outcomes left at once (the module's doc says which).
    ``dest_marker``: a key of ``dest`` that must exist for an image's outputs to be written to a
    local folder (a job's ``job.json``): without it the folder is not the one the job started in
    (a share unmounted under it), and writing there would put outputs where nobody looks."""

    def __init__(self, engine: MaskEngine, source: ObjectStore, dest: ObjectStore, spec: MaskSpec,
                 skip_existing: bool = False, context: str = "", deadline: float | None = None,
                 dest_marker: str | None = None):
        self.engine, self.source, self.dest, self.spec = engine, source, dest, spec
        self.skip_existing = skip_existing
        self.context = context  # e.g. "job 1f2e task 9a8b", prefixed to every log line
        self.deadline = deadline
        self.dest_marker = dest_marker
        self.worker = worker_identity(str(engine.device))
        self.labels = {"model": str(engine.model_info.get("id", "")), "device": str(engine.device)}
        self._read = [0, 0]  # images read, and their bytes: the window's measure (``_window``)
        self._read_lock = threading.Lock()
        self._readahead_bytes = settings.READAHEAD_MB.get() * 1024 * 1024
        self._in_flight = settings.S3_CONCURRENCY.get()
        # Storage requests queued or in flight, by token: (key, URL, since), and their changes.
        self._waits: dict[int, tuple[str, str, float]] = {}
        self._waits_changed = threading.Condition()
        self._tokens = itertools.count()
        self._abandoned = False  # the deadline passed: start nothing more

    def run(self, keys: Iterable[str]) -> Iterator[Outcome]:
        """Yield one ``Outcome`` per key, in the order of ``keys``."""
        labels = dict(self.labels)
        loop = device_loop(self.engine, lambda size: metrics.observe_batch(size, labels))
        size, keys = self.engine.batch_size, iter(keys)
        # Inputs started and not yet yielded, in input order: those in a batch, then those not.
        batched: deque[_Slot] = deque()
        unbatched: deque[_Slot] = deque()
        try:
            for key in keys:  # reading up to a window ahead of inference
                unbatched.append(_Slot(key, self._load(key, loop)))
                if len(unbatched) >= max(2 * size, self._window()):
                    self._batch(loop, unbatched, batched, size)
                    yield from self._ready(batched, self._window())
            while unbatched:
                self._batch(loop, unbatched, batched, min(size, len(unbatched)))
                yield from self._ready(batched, self._window())
            yield from self._ready(batched, 0)
        except _Expired:
            yield from self._expired([*batched, *unbatched], list(keys))

    def _batch(self, loop: DeviceLoop, unbatched: deque[_Slot], batched: deque[_Slot], count: int) -> None:
        """The first ``count`` inputs of ``unbatched``, once loaded, sent to the device loop as one
        batch (the loop knows that more are coming: a partial batch may wait for them)."""
        items = [self._result(unbatched[i].loaded) for i in range(count)]  # nothing moves before all are
        ready = [item for item in items if item.outcome is None]
        inferred = iter(loop.submit(self.spec, [item.prepared for item in ready]))
        for item in items:
            slot = unbatched.popleft()
            slot.outcome = resolved(item.outcome) if item.outcome is not None else self._saved(item, next(inferred))
            batched.append(slot)

    def _ready(self, batched: deque[_Slot], keep: int) -> Iterator[Outcome]:
        """The outcomes of the batched inputs, oldest first, until ``keep`` are left in flight."""
        while len(batched) > keep:
            outcome = self._result(batched[0].outcome)
            batched.popleft()
            yield self._observed(outcome)

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

    def _saved(self, item: _Loaded, inferred: Future) -> Future:
        """The outcome of ``item`` once its inference is done and its outputs are written: encoded
        by a CPU thread, then both masks written at the same time, then the metadata record (its
        presence means the image is complete, for ``--skip-existing``)."""
        if not self.dest.networked:  # a local disk: encoding and writing are one CPU step
            recorded = then(inferred, lambda result: self._store_local(item, self._encode(item, result)), cpu_pool())
        else:
            record_url = self.dest.url_for(output_keys(item.key)["metadata"])
            encoded = then(inferred, lambda result: self._encode(item, result), cpu_pool())
            written = chain(encoded, self._write_masks)
            recorded = chain(written, lambda step: self._on_storage(item.key, record_url, self._write_record, item, step))
        return _outcome_of(recorded, lambda err: self._failed(item.key, err))

    def _result(self, future: Future) -> Any:
        if self.deadline is None:
            return future.result()
        try:
            return future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except FutureTimeout:
            raise _Expired from None

    def _observed(self, outcome: Outcome) -> Outcome:
        if not outcome.transient:  # a transient failure is no outcome yet: its chunk runs again
            metrics.observe_outcome(outcome.status, self.labels, (outcome.metadata or {}).get("timings_ms"))
        return outcome

    # --- the deadline -------------------------------------------------------------

    def _expired(self, slots: list[_Slot], unstarted: list[str]) -> Iterator[Outcome]:
        """Past the deadline: an outcome for every input left, waiting for none of them (but for
        storage's grace): those done keep theirs, the others fail (the module's doc says how)."""
        self._abandoned = True
        stalled = self._stalled()
        settled = [_settled(slot) for slot in slots]
        late = sum(outcome is None for outcome in settled) + len(unstarted)
        now = time.monotonic()
        if stalled:
            url, since = min(stalled.values(), key=lambda wait: wait[1])
            log.warning("%stime limit reached with %d image(s) unfinished: storage did not answer: %s (waiting %.0f s)",
                        self._prefix(), late, url, now - since)
        else:
            log.warning("%stime limit reached with %d image(s) unfinished, waiting on the device or the CPUs",
                        self._prefix(), late)
        for slot, outcome in zip(slots, settled):
            yield self._observed(outcome if outcome is not None else self._late(slot.key, stalled, now))
        for key in unstarted:
            yield self._observed(self._late(key, stalled, now))

    def _stalled(self) -> dict[str, tuple[str, float]]:
        """The storage requests still pending ``STALL_GRACE_S`` from now: for each input waiting
        on one, the URL and start (``time.monotonic()``) of its oldest."""
        with self._waits_changed:
            self._waits_changed.wait_for(lambda: not self._waits, timeout=STALL_GRACE_S)
            pending = sorted(self._waits.values(), key=lambda wait: -wait[2])
        return {key: (url, since) for key, url, since in pending}  # the oldest (last) wins

    def _late(self, key: str, stalled: dict[str, tuple[str, float]], now: float) -> Outcome:
        """The outcome of an input the deadline found unfinished: transient while storage held
        up the run (naming its request, or the oldest one), else failed for good."""
        if not stalled:
            return Outcome(key, self.source.url_for(key), "failed", error=TIME_LIMIT_ERROR)
        url, since = stalled.get(key) or min(stalled.values(), key=lambda wait: wait[1])
        return Outcome(key, self.source.url_for(key), "failed", transient=True,
                       error=f"storage did not answer within the time limit: {url} (waiting {now - since:.0f} s)")

    # --- storage requests -----------------------------------------------------------

    def _wait_begin(self, key: str, url: str) -> int:
        if self._abandoned:
            raise _Abandoned(url)
        with self._waits_changed:
            token = next(self._tokens)
            self._waits[token] = (key, url, time.monotonic())
        return token

    def _wait_end(self, token: int) -> None:
        with self._waits_changed:
            self._waits.pop(token, None)
            self._waits_changed.notify_all()

    @contextmanager
    def _waiting(self, key: str, url: str) -> Iterator[None]:
        """Storage work done here (a local folder's): ``key`` waits on ``url`` meanwhile."""
        token = self._wait_begin(key, url)
        try:
            yield
        finally:
            self._wait_end(token)

    def _on_storage(self, key: str, url: str, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` on a storage thread: ``key`` waits on ``url`` from now (queued behind
        other requests included) until it ends; not started at all once the run is past its
        deadline."""
        token = self._wait_begin(key, url)

        def call() -> Any:
            try:
                if self._abandoned:
                    raise _Abandoned(url)
                return fn(*args)
            finally:
                self._wait_end(token)

        try:
            return storage_pool().submit(call)
        except BaseException:
            self._wait_end(token)
            raise

    # --- one image's steps ----------------------------------------------------------

    def _output_urls(self, key: str, roles: Iterable[str]) -> dict[str, str]:
        return output_urls(self.dest, key, roles)

    def _load(self, key: str, loop: DeviceLoop) -> Future:
        """``key`` read by a storage thread, then decoded by a CPU thread (from a local disk, both
        by a CPU thread): a ``_Loaded`` whose ``outcome`` is set when it is skipped or failed."""
        loading = loop.loading()
        loading.__enter__()  # until it is decoded: a partial batch may wait for it
        url = self.source.url_for(key)
        if self.source.networked:
            loaded = then(self._on_storage(key, url, self._fetch, key), self._decode, cpu_pool())
        else:  # a local disk: reading and decoding are one CPU step
            loaded = cpu_pool().submit(lambda: self._decode(self._fetch_local(key, url)))
        loaded.add_done_callback(lambda _: loading.__exit__(None, None, None))
        return loaded

    def _fetch_local(self, key: str, url: str) -> _Loaded:
        with self._waiting(key, url):
            return self._fetch(key)

    def _fetch(self, key: str) -> _Loaded:
        item = _Loaded(key)
        try:
            if self.skip_existing and self.dest.exists(output_keys(key)["metadata"]):
                item.outcome = Outcome(key, self.source.url_for(key), "skipped")
                return item
            started = time.perf_counter()
            item.data, item.source_etag = self.source.read_object(key)
            item.source_size = len(item.data)
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

    def _encode(self, item: _Loaded, result: MaskResult) -> _Written:
        if self._abandoned:  # past the deadline: its outcome was given already
            raise _Abandoned(item.key)
        started = time.perf_counter()
        blobs, mask_rle = encode_masks(result, self.spec), encode_rle(result, self.spec)
        return _Written(item.key, result, blobs, {"encode": (time.perf_counter() - started) * 1e3}, mask_rle)

    def _write_masks(self, step: _Written) -> Future:
        """Both PNGs written at the same time (one round trip, not two); a future of ``step``."""
        keys, step.upload_started = output_keys(step.item_key), time.perf_counter()
        writes = [self._on_storage(step.item_key, self.dest.url_for(keys[role]), self.dest.write_bytes, keys[role], blob,
                                   "image/png") for role, blob in step.blobs.items()]
        return chain(gather(writes), lambda _: resolved(step))

    def _store_local(self, item: _Loaded, step: _Written) -> Outcome:
        """Both masks, then the record, written to a local folder (one CPU step), once the folder
        is known to be the one the work started in (``dest_marker``)."""
        with self._waiting(item.key, self.dest.url_for(output_keys(item.key)["metadata"])):
            if self.dest_marker:
                check_marker(self.dest, self.dest_marker)
            return self._write_record(item, self._write_local(step))

    def _write_local(self, step: _Written) -> _Written:
        keys, step.upload_started = output_keys(step.item_key), time.perf_counter()
        for role, blob in step.blobs.items():
            self.dest.write_bytes(keys[role], blob, "image/png")
        return step

    def _write_record(self, item: _Loaded, step: _Written) -> Outcome:
        result, keys = step.result, output_keys(item.key)
        urls = self._output_urls(item.key, step.blobs)
        timings = {**item.timings_ms, **result.timings_ms, **step.timings_ms,
                   "upload": (time.perf_counter() - step.upload_started) * 1e3}
        worker = {**self.worker, "batch_images": result.batch_images}
        record = metadata_record(
            source=self.source.url_for(item.key), size=item.size, spec=self.spec,
            model=self.engine.model_info, result=result, outputs=urls, timings_ms=timings, worker=worker,
            source_size=item.source_size, source_etag=item.source_etag, mask_rle=step.mask_rle,
        )
        self.dest.write_bytes(keys["metadata"], encode_metadata(record), "application/json")
        log.info("%smasked %s (coverage %.3f)", self._prefix(), item.key, result.coverage)
        return Outcome(item.key, record["source"], "succeeded", urls, coverage=result.coverage, metadata=record)

    def _failed(self, key: str, err: BaseException) -> Outcome | None:
        """The failed outcome of ``key``; None for work dropped past the deadline (``_expired``
        gives that input its outcome)."""
        if isinstance(err, _Abandoned):
            return None
        message, transient = f"{type(err).__name__}: {err}", is_transient(err) or is_unavailable(err)
        # In a task (a deadline), a transient failure is no outcome yet: the task runs its work
        # again, and says once for all its images why.
        quiet = transient and self.deadline is not None
        (log.info if quiet else log.warning)("%sfailed %s: %s", self._prefix(), self.source.url_for(key), message)
        return Outcome(key, self.source.url_for(key), "failed", error=message, transient=transient,
                       away=is_unavailable(err))

    def _prefix(self) -> str:
        return f"[{self.context}] " if self.context else ""


@dataclass
class _Written:
    """One image between its encoding and its metadata record."""

    item_key: str
    result: MaskResult
    blobs: dict[str, bytes]  # PNG bytes by role: none with --outputs rle alone
    timings_ms: dict
    mask_rle: dict | None = None  # the record's ``rle`` field, when asked for
    upload_started: float = 0.0


def kept_outcome(source: ObjectStore, dest: ObjectStore, spec: MaskSpec, key: str, status: str) -> Outcome:
    """The outcome of ``key`` as an earlier run of the same work left it, without redoing it:
    ``succeeded`` (its outputs and record are written, as ``spec`` asks) or ``skipped``."""
    if status == "skipped":
        return Outcome(key, source.url_for(key), "skipped")
    return Outcome(key, source.url_for(key), "succeeded", output_urls(dest, key, output_roles(spec)))


def output_urls(dest: ObjectStore, key: str, roles: Iterable[str]) -> dict[str, str]:
    """Role to URL of the outputs written for ``key``: the image files ``roles``, and its record."""
    roles = set(roles) | {"metadata"}
    return {role: dest.url_for(out) for role, out in output_keys(key).items() if role in roles}


def _settled(slot: _Slot) -> Outcome | None:
    """The input's outcome if it has one now (done, or skipped or failed while loading), else None
    (also when its work was dropped past the deadline)."""
    if slot.outcome is not None:
        return slot.outcome.result() if slot.outcome.done() else None
    if slot.loaded.done() and slot.loaded.exception() is None:
        return slot.loaded.result().outcome
    return None


def _outcome_of(future: Future, failed) -> Future:
    """A future that always ends in an ``Outcome``: ``future``'s, or ``failed(its exception)``."""
    out: Future = Future()
    future.add_done_callback(lambda done: out.set_result(failed(done.exception()) if done.exception() is not None
                                                         else done.result()))
    return out
