"""Python's garbage collector set for a process that has hundreds of images in flight.

With storage across a network, a pipeline holds hundreds of images between their read and their
record (``tasks.pipeline.stream``), each with its futures, callbacks and records: a few hundred
small objects that live for a few round trips. Under the collector's defaults (a young
collection every 700 allocations) they all outlive two collections, so they reach the oldest
generation, and every few seconds a full collection walks the whole heap, torch's and
transformers' hundreds of thousands of objects included, holding the GIL for 100-200 ms each
time. At a 100 ms round trip that took a quarter of a process's time (``bench/bench_feed.py``,
docs/performance.md).

``settle()``, once the process has loaded what it keeps for life (the model, the clients),
collects once and moves every object made so far out of the collector's sight (``gc.freeze``):
no later collection walks them. ``for_pipelines()`` does that and makes young collections rare
enough (every ``YOUNG_ALLOCATIONS`` allocations, about a second of work) that an image's objects
are freed before any collection finds them alive.

What this asks of the code the process runs: no reference cycles through an image's objects. A
cycle is freed only by a collection, and one that was alive at a young collection waits for a
full one, now rare: the image's pixels with it, memory growing with the run meanwhile. The
pipeline's futures and callbacks hold none (``tasks/pipeline/pools.py``; a test masks with the
collector off and finds nothing of an image left for it to free).
"""

from __future__ import annotations

import gc

#: Allocations between two young collections in a pipeline process (Python's default is 700).
YOUNG_ALLOCATIONS = 100_000
#: Young collections between two middle ones, and middle between two full ones.
OLDER_EVERY = (20, 10)


def settle() -> None:
    """Collect once, then keep every object alive now out of all later collections."""
    gc.collect()
    gc.freeze()


def for_pipelines() -> None:
    """``settle()``, and collections sized for many images in flight (the module's doc says why)."""
    settle()
    gc.set_threshold(YOUNG_ALLOCATIONS, *OLDER_EVERY)
