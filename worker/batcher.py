"""One device loop per engine: every caller's images go onto one queue, one thread runs them.

A worker process holds several tasks at once (Celery's threads pool); each submits the images it
has loaded, and the loop takes up to ``batch_size`` of them with the same ``MaskSpec`` into one
forward pass, the oldest first. When the device is busy, what arrives meanwhile forms the next
batch; when it is idle, a lone image waits at most ``max_wait_s`` for company, so one-image
requests that arrive together share a batch. Results go back through each image's ``Future``.

Only the loop's thread touches the device, so the engine (its text cache too) needs no lock. If a
batch fails as a whole, its images run again one at a time, so that one bad image fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

from .config import env_int

log = logging.getLogger(__name__)

#: How long a lone image waits for others while the device is idle (``CLIPMASK_BATCH_WAIT_MS``).
DEFAULT_WAIT_MS = 5

RunBatch = Callable[[Any, list], list]


class _Request:
    __slots__ = ("item", "future", "arrived")

    def __init__(self, item: Any):
        self.item, self.future, self.arrived = item, Future(), time.monotonic()


class DeviceLoop:
    """Batches ``submit``-ted items by key and runs ``run_batch(key, items)`` in one thread.

    ``run_batch`` returns one result (or ``Exception``) per item, in order; each item's
    ``Future`` gets its own.
    """

    def __init__(self, run_batch: RunBatch, batch_size: int, max_wait_s: float | None = None,
                 name: str = "clipmask-device"):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.run_batch, self.batch_size, self.name = run_batch, batch_size, name
        self.max_wait_s = env_int("CLIPMASK_BATCH_WAIT_MS", DEFAULT_WAIT_MS) / 1000.0 \
            if max_wait_s is None else max_wait_s
        self._cond = threading.Condition()
        self._pending: OrderedDict[Hashable, deque[_Request]] = OrderedDict()
        self._thread: threading.Thread | None = None
        #: Sizes of the batches run so far (the last 1,000), for tests and logs.
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        #: Called with each batch's size after it ran (metrics).
        self.on_batch: list[Callable[[int], None]] = []

    def submit(self, key: Hashable, items: Sequence[Any]) -> list[Future]:
        """Queue ``items`` (to be run together under ``key``); one ``Future`` each, in order."""
        requests = [_Request(item) for item in items]
        if not requests:
            return []
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._pending.setdefault(key, deque()).extend(requests)
            self._cond.notify()
        return [request.future for request in requests]

    def _serve(self) -> None:
        while True:
            key, batch = self._next_batch()
            try:
                self._execute(key, batch)
            except BaseException as err:  # never leave a caller waiting for ever
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(RuntimeError(f"device loop failed: {err!r}"))
                if not isinstance(err, Exception):
                    raise

    def _next_batch(self) -> tuple[Hashable, list[_Request]]:
        """The oldest key's next batch: full, or whatever is there once its first item has waited
        ``max_wait_s`` (at once, when the device was busy for longer than that)."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            key, queue = next(iter(self._pending.items()))
            deadline = queue[0].arrived + self.max_wait_s
            while len(queue) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            if queue:
                self._pending.move_to_end(key)  # other keys go first next time
            else:
                del self._pending[key]
            return key, batch

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
                                  name=f"clipmask-device-{engine.device}")
                if on_batch is not None:
                    loop.on_batch.append(on_batch)
                engine._device_loop = loop
    return loop


_LOOPS_LOCK = threading.Lock()
