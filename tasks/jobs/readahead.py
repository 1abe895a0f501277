"""``ordered_map``: storage calls run ahead in threads, results come back in order."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
#: Calls running ahead of the one being consumed: hides storage latency (an S3 request takes
#: milliseconds) without holding more than a few results.
READ_AHEAD = 16


def ordered_map(fn: Callable[[T], R], items: Iterable[T], window: int = READ_AHEAD) -> Iterator[R]:
    """``map(fn, items)`` with up to ``window`` calls running ahead in threads, in order.

    ``items`` is consumed lazily, at most ``window`` ahead; an exception of ``fn`` is raised when
    its result's turn comes."""
    with ThreadPoolExecutor(window, thread_name_prefix="clipmask-readahead") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
