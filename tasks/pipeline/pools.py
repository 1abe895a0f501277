"""The process's two thread pools, shared by every pipeline, and how work moves between them.

- CPU work (decoding, preprocessing, encoding): ``CLIPMASK_CPU_THREADS``, about one per core.
- Storage requests: ``CLIPMASK_S3_CONCURRENCY`` threads that mostly wait for the network (a thread
  waiting on a socket holds no core and no GIL). By Little's law a process needs images/s x
  requests per image x round trip of them in flight: 2,000 x 4 x 50 ms = 400.

An image's steps go from one pool to the other by callbacks (``then``): no thread ever waits for
work of the other pool, so a slow round trip holds a storage thread, never a CPU one, and neither
pool can starve or deadlock the other.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from worker import settings

_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def cpu_pool() -> ThreadPoolExecutor:
    """The process's pool for decoding, preprocessing and encoding (``CLIPMASK_CPU_THREADS``)."""
    return _pool("cpu", settings.CPU_THREADS)


def storage_pool() -> ThreadPoolExecutor:
    """The process's pool for storage requests (``CLIPMASK_S3_CONCURRENCY`` threads)."""
    return _pool("storage", settings.S3_CONCURRENCY)


def _pool(name: str, size: settings.Setting) -> ThreadPoolExecutor:
    with _LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(size.get(), thread_name_prefix=f"clipmask-{name}")
        return _POOLS[name]


def then(future: Future, fn: Callable[[Any], Any], pool: ThreadPoolExecutor) -> Future:
    """A future of ``fn(future's result)`` run on ``pool`` once ``future`` is done; an exception
    of either is the returned future's."""
    return chain(future, lambda result: pool.submit(fn, result))


def gather(futures: Sequence[Future]) -> Future:
    """A future of the list of ``futures``' results, done when all are (the first exception, in
    the order of ``futures``, wins). The callbacks hold the results, not the futures: a future
    whose callback held it would be a reference cycle, freed only by the garbage collector, and
    with it all that its chain of callbacks holds (an image's pixels)."""
    out: Future = Future()
    count = len(futures)
    results: list[Any] = [None] * count
    errors: list[BaseException | None] = [None] * count
    left = [count]
    lock = threading.Lock()

    def one(index: int, done: Future) -> None:
        error = done.exception()
        with lock:
            if error is not None:
                errors[index] = error
            else:
                results[index] = done.result()
            left[0] -= 1
            last = left[0] == 0
        if last:
            first = next((error for error in errors if error is not None), None)
            if first is not None:
                out.set_exception(first)
            else:
                out.set_result(results)

    if not futures:
        out.set_result([])
    for index, future in enumerate(futures):
        future.add_done_callback(functools.partial(one, index))
    return out


def chain(future: Future, step: Callable[[Any], Future]) -> Future:
    """The future that ``step(result)`` returns, once ``future`` is done (its exception passed on)."""
    out: Future = Future()

    def run(done: Future) -> None:
        error = done.exception()
        if error is not None:
            out.set_exception(error)
            return
        try:
            nxt = step(done.result())
        except Exception as err:  # noqa: BLE001 - passed to whoever waits
            out.set_exception(err)
            return
        nxt.add_done_callback(lambda last: _copy(last, out))

    future.add_done_callback(run)
    return out


def resolved(value: Any) -> Future:
    """A future that is already done with ``value``."""
    future: Future = Future()
    future.set_result(value)
    return future


def _copy(source: Future, target: Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
