"""One device loop per engine: every caller's images go onto one queue, its threads run them.

A worker process holds several tasks at once (Celery's threads pool); each submits the images it
has loaded, and the loop takes up to ``batch_size`` of them with the same ``MaskSpec`` into one
forward pass, the oldest first. When the device is busy, what arrives meanwhile forms the next
batch; when it is idle, a lone image waits at most ``max_wait_s`` for company, or up to
``loading_wait_s`` while callers are still reading and decoding images they will submit
(``loading``), so one-image requests that arrive together share a batch even when their
downloads end a few milliseconds apart. Results go back through each image's ``Future``.

On a GPU one thread runs the batches, and only it touches the device. On the CPU the engine asks
for several (``MaskEngine.streams``): each takes the next batch when it is free, and forward passes
run side by side (the engine locks its text cache). If a batch fails as a whole, its images run
again one at a time, so that one bad image fails alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

from worker import settings

log = logging.getLogger(__name__)

RunBatch = Callable[[Any, list], list]


class _Request:
    __slots__ = ("item", "future", "arrived")

    def __init__(self, item: Any):
        self.item, self.future, self.arrived = item, Future(), time.monotonic()


class DeviceLoop:
    """Batches ``submit``-ted items by key and runs ``run_batch(key, items)`` in ``streams`` threads.

    ``run_batch`` returns one result (or ``Exception``) per item, in order; each item's
    ``Future`` gets its own.
    """

    def __init__(self, run_batch: RunBatch, batch_size: int, max_wait_s: float | None = None,
                 name: str = "clipmask-device", streams: int = 1, loading_wait_s: float | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.run_batch, self.batch_size, self.name = run_batch, batch_size, name
        self.max_wait_s = settings.BATCH_WAIT_MS.get() / 1000.0 if max_wait_s is None else max_wait_s
        self.loading_wait_s = max(self.max_wait_s, settings.BATCH_WAIT_LOADING_MS.get() / 1000.0) \
            if loading_wait_s is None else loading_wait_s
        self._loading = 0
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, deque[_Request]] = OrderedDict()
        self.streams = max(1, streams)
        self._threads: list[threading.Thread] = []
        #: Sizes of the batches run so far (the last 1,000), for tests and logs.
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        #: Called with each batch's size after it ran (metrics).
        self.on_batch: list[Callable[[int], None]] = []
        #: Called in the thread that runs a batch, just before, with whether it runs alone: no
        #: other batch running or waiting, and itself not full (the engine then lets it use every
        #: CPU thread).
        self.before_batch: list[Callable[[bool], None]] = []
        self._running = 0

    def submit(self, key: Hashable, items: Sequence[Any]) -> list[Future]:
        """Queue ``items`` (to be run together under ``key``); one ``Future`` each, in order."""
        requests = [_Request(item) for item in items]
        if not requests:
            return []
        with self._cond:
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < self.streams:
                thread = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
            self._pending.setdefault(key, deque()).extend(requests)
            self._cond.notify_all()
        return [request.future for request in requests]

    @contextlib.contextmanager
    def loading(self):
        """Around reading and decoding an image that will be submitted: a partial batch may wait
        for it (up to ``loading_wait_s`` from its first image's arrival)."""
        with self._cond:
            self._loading += 1
        try:
            yield
        finally:
            with self._cond:
                self._loading -= 1

    def _serve(self) -> None:
        while True:
            key, batch, alone = self._next_batch()
            try:
                for prepare in self.before_batch:
                    prepare(alone)
                self._execute(key, batch)
            except BaseException as err:  # never leave a caller waiting for ever
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(RuntimeError(f"device loop failed: {err!r}"))
                if not isinstance(err, Exception):
                    raise
            finally:
                with self._cond:
                    self._running -= 1

    def _next_batch(self) -> tuple[Hashable, list[_Request], bool]:
        """The oldest key's next batch: full, or whatever is there once its first item has waited
        ``max_wait_s`` (``loading_wait_s`` while images are being loaded; at once, when the device
        was busy for longer than that); and whether it runs alone. Every wake-up looks again, since
        another of the loop's threads may have taken the batch meanwhile."""
        with self._cond:
            while True:
                if not self._pending:
                    self._cond.wait()
                    continue
                key, queue = next(iter(self._pending.items()))
                wait = self.loading_wait_s if self._loading else self.max_wait_s
                remaining = queue[0].arrived + wait - time.monotonic()
                if len(queue) >= self.batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            if queue:
                self._pending.move_to_end(key)  # other keys go first next time
                self._cond.notify_all()  # what is left may be a batch for another thread
            else:
                del self._pending[key]
            self._running += 1
            # Alone: nothing else running or waiting, and not a full batch (a full one is part of a
            # stream of work, whose next batch is likely near; a lone request is not).
            return key, batch, self._running == 1 and not self._pending and len(batch) < self.batch_size

    def _execute(self, key: Hashable, batch: list[_Request]) -> None:
        try:
            results = self.run_batch(key, [request.item for request in batch])
        except Exception as err:  # noqa: BLE001 - isolate the culprit below
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            log.warning("batch of %d failed (%s: %s); running its images one at a time",
                        len(batch), type(err).__name__, err)
            for request in batch:
                self._execute(key, [request])
            return
        self.batch_sizes.append(len(batch))
        for observe in self.on_batch:
            observe(len(batch))
        for request, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)


def device_loop(engine, on_batch: Callable[[int], None] | None = None) -> DeviceLoop:
    """The engine's one loop (made on first use, with ``on_batch`` as its observer): every
    pipeline on this engine feeds it."""
    loop = getattr(engine, "_device_loop", None)
    if loop is None:
        with _LOOPS_LOCK:
            loop = getattr(engine, "_device_loop", None)
            if loop is None:
                loop = DeviceLoop(lambda spec, items: engine.predict_prepared(items, spec), engine.batch_size,
                                  name=f"clipmask-device-{engine.device}", streams=engine.streams)
                loop.before_batch.append(engine.share_threads)
                if on_batch is not None:
                    loop.on_batch.append(on_batch)
                engine._device_loop = loop
    return loop


_LOOPS_LOCK = threading.Lock()
