"""Which images of a source need masking again: one walk of two listings side by side.

An image ``R`` is up to date when its metadata record ``R.json`` exists under the destination and
was written after the image was last modified (the listings' LastModified, or a file's mtime, as
``aws s3 sync`` compares them). Both listings come in key order, so one ordered merge finds every
new and changed image for (source keys + destination keys) / 1,000 list requests: no request, no
task and no plan entry per image that is up to date.

The order to merge in is the records' order. ``R -> R.json`` keeps the order of two keys except
where one extends the other with a character that sorts before or at "." ("a.jpg" and
"a.jpg-1.png", whose records sort the other way round), so the source's keys are put in record
order first (``record_order``): a key waits only while the keys after it extend it, which in a
real dataset is never more than a few.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator

from storage import Listed, ObjectStore
from storage.layout import METADATA_SUFFIX, is_image_key
from tasks.jobs.listing import only_images
from tasks.shards.names import SHARD_SUFFIXES, ShardSet, is_brace_pattern, split_pattern


def record_order(keys: Iterable[str], suffix: str = METADATA_SUFFIX) -> Iterator[str]:
    """``keys`` (sorted) in the order of ``key + suffix``.

    A key ``k`` can only be overtaken by a later key that starts with it (elsewhere the two compare
    at a position inside ``k``, where the suffix changes nothing), so a key is let go as soon as a
    key arrives that does not start with it, in suffixed order from a heap of the waiting ones.
    """
    waiting: list[tuple[str, str]] = []
    for key in keys:
        while waiting and not key.startswith(waiting[0][1]):
            yield heapq.heappop(waiting)[1]
        heapq.heappush(waiting, (key + suffix, key))
    while waiting:
        yield heapq.heappop(waiting)[1]


def resume_point(last: str) -> str:
    """Where to list a source again so that every image whose record sorts after ``last + .json``
    comes back (those are the ones ``record_order`` had not let go): after ``last``, or before the
    shortest image key that ``last`` extends, which may have been waiting still."""
    for end in range(1, len(last)):
        if is_image_key(last[:end]):
            return last[:end - 1]
    return last


class Scan:
    """The images under ``source`` to mask into ``dest``: new ones and those modified since
    their record was written, counted as they go by (``new``, ``changed``, ``up_to_date``).

    With ``after`` (the last key planned before an interruption), only images whose record sorts
    after that key's record.
    """

    def __init__(self, source: ObjectStore, dest: ObjectStore, after: str | None = None) -> None:
        self.source, self.dest, self.after = source, dest, after
        self.new = self.changed = self.up_to_date = 0

    def keys(self) -> Iterator[Listed]:
        bound = self.after + METADATA_SUFFIX if self.after else ""
        start = resume_point(self.after) if self.after else None
        ordered = record_order(only_images(self.source.list_entries(start_after=start)))
        if bound:
            ordered = (key for key in ordered if key + METADATA_SUFFIX > bound)
        # Every record after ``bound`` sorts after ``after`` itself: list the destination from there.
        records = (key for key in self.dest.list_entries(start_after=self.after)
                   if key.endswith(METADATA_SUFFIX))
        return self._merge(ordered, records)

    def _merge(self, images: Iterator[Listed], records: Iterator[Listed]) -> Iterator[Listed]:
        record = next(records, None)
        for image in images:
            name = image + METADATA_SUFFIX
            while record is not None and record < name:
                record = next(records, None)
            if record is None or record != name:
                self.new += 1
                yield image
            elif image.modified > record.modified:
                self.changed += 1
                yield image
            else:
                self.up_to_date += 1



class ShardScan:
    """The shards of ``shards`` to mask into ``dest``: those without an output shard of the same
    name there, and those modified since it was written, counted as for images (``new``,
    ``changed``, ``up_to_date``). A job holds a few thousand shards at most: both listings are
    read once into a name -> time map (the source's under the pattern's fixed head only).

    With ``after`` (the last shard planned before an interruption), only the shards after it.
    ``output_key``: the output shard's key for an input shard's (the same, unless the output is
    written in another format)."""

    def __init__(self, shards: ShardSet, dest: ObjectStore, after: str | None = None,
                 output_key: Callable[[str], str] = str) -> None:
        self.shards, self.dest, self.after, self.output_key = shards, dest, after, output_key
        self.new = self.changed = self.up_to_date = 0

    def keys(self) -> Iterator[str]:
        head = shard_head(self.shards)
        inputs = {key: key.modified for key in self.shards.store.list_entries(head) if key.endswith(self.shards.suffix)}
        outputs = {key: key.modified for key in self.dest.list_entries(head) if key.endswith(SHARD_SUFFIXES)}
        for key in shard_keys(self.shards, self.after):
            out = self.output_key(key)
            if out not in outputs:
                self.new += 1
                yield key
            elif key not in inputs or inputs[key] > outputs[out]:  # not listed: its task says why
                self.changed += 1
                yield key
            else:
                self.up_to_date += 1


def shard_head(shards: ShardSet) -> str:
    """The fixed part of a brace pattern before its first group, the folder of its shards: where
    to list them ("" without a pattern)."""
    return split_pattern(shards.pattern)[0] if shards.pattern and is_brace_pattern(shards.pattern) else ""


def shard_keys(shards: ShardSet, after: str | None = None) -> Iterator[str]:
    """The shard keys of ``shards`` in order, only those after ``after`` when given."""
    keys = shards.keys()
    if after is not None:
        for key in keys:
            if key == after:
                break
    return keys
