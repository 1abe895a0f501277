"""Which shards a SRC names (docs/design.md, "Shards").

Two forms, as webdataset and img2dataset write them: a brace pattern
(``s3://b/cc12m/{00000..01242}.tar``, a local path likewise; ``.parquet`` for Parquet shards), or
a folder or S3 prefix whose listing holds ``.tar`` or ``.parquet`` files. A folder is read as
shards when the first key of its listing that is an image or a shard is a shard: a folder of
images stays what it was. Its shards are its ``.tar`` files, or, when the first ``.parquet`` has
no ``.tar`` of the same name beside it, its ``.parquet`` files: img2dataset's webdataset output
puts ``00000.parquet`` (the samples' metadata, no images) beside ``00000.tar``, its parquet
output ``00000.parquet`` alone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from storage import ObjectStore, open_store
from storage.layout import is_image_key, is_output_key
from tasks.errors import UsageError

__all__ = ["PARQUET_SUFFIX", "SHARD_SUFFIX", "SHARD_SUFFIXES", "ShardSet", "check_image_column", "expand_braces",
           "find_shards", "is_brace_pattern", "split_pattern"]

SHARD_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
#: The extensions of shards, whatever their format.
SHARD_SUFFIXES = (SHARD_SUFFIX, PARQUET_SUFFIX)
#: One brace group: ``{00000..01242}`` (a range of whole numbers) or ``{a,b,c}`` (alternatives).
_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass(frozen=True)
class ShardSet:
    """The shards of a SRC: keys relative to ``store``, from a brace pattern (``pattern``) or,
    without one, every key of the store's listing that ends with ``suffix`` (``.tar``, or
    ``.parquet``)."""

    store: ObjectStore
    pattern: str | None = None
    suffix: str = SHARD_SUFFIX

    def keys(self) -> Iterator[str]:
        """The shard keys, in the pattern's order or the listing's (S3 key order)."""
        if self.pattern is not None:
            return expand_braces(self.pattern)
        return (key for key in self.store.list() if key.endswith(self.suffix) and not is_output_key(key))

    def url_for(self, key: str) -> str:
        return self.store.url_for(key)


def check_image_column(shards: ShardSet | None, image_column: str | None, source_url: str) -> None:
    """``--image-column`` is for Parquet shards: a ``UsageError`` when it is given for any other SRC."""
    if image_column is not None and not (shards is not None and shards.suffix == PARQUET_SUFFIX):
        raise UsageError(f"--image-column is for Parquet shards; SRC {source_url} holds none: leave it out")


def is_brace_pattern(url: str) -> bool:
    """True for a SRC with a brace group (``{00000..01242}``, ``{a,b}``)."""
    return _GROUP.search(str(url)) is not None


def split_pattern(url: str) -> tuple[str, str]:
    """A brace pattern split at the last "/" before its first brace: the folder (with its "/",
    "" when there is none) and the pattern of keys below it."""
    cut = url[:url.index("{")].rfind("/") + 1
    return url[:cut], url[cut:]


def find_shards(url: str) -> ShardSet | None:
    """The shards ``url`` names, or None for a folder of images (or of nothing: the caller says
    so). A brace pattern is split at the last "/" before its first brace: the store is what comes
    before, the pattern the keys below it. Raises ValueError for a malformed URL or pattern."""
    url = str(url)
    if is_brace_pattern(url):
        folder, pattern = split_pattern(url)
        next(expand_braces(pattern), None)  # a malformed group is reported now, not mid-run
        suffix = PARQUET_SUFFIX if pattern.endswith(PARQUET_SUFFIX) else SHARD_SUFFIX
        return ShardSet(open_store(folder or "."), pattern, suffix)
    store = open_store(url)
    for key in store.list():
        if is_output_key(key):
            continue
        if key.endswith(SHARD_SUFFIX):
            return ShardSet(store)
        if key.endswith(PARQUET_SUFFIX):
            beside = key[:-len(PARQUET_SUFFIX)] + SHARD_SUFFIX  # img2dataset's metadata beside its tar
            return ShardSet(store) if store.exists(beside) else ShardSet(store, suffix=PARQUET_SUFFIX)
        if is_image_key(key):
            return None
    return None


def expand_braces(pattern: str) -> Iterator[str]:
    """The names ``pattern`` stands for, in order: ``{00000..00002}`` gives 00000, 00001,
    00002 (zero-padded to the width of a first bound with a leading zero), ``{a,b}`` a then b; with
    several groups every combination, the last group varying fastest. Raises ValueError naming a
    group that is neither form."""
    parts = _GROUP.split(pattern)  # literal, group, literal, group, ..., literal
    choices = [[part] if i % 2 == 0 else _group(part, pattern) for i, part in enumerate(parts)]
    return ("".join(combination) for combination in itertools.product(*choices))


def _group(text: str, pattern: str) -> list[str]:
    match = _RANGE.match(text)
    if match:
        first, last = match.groups()
        width = len(first) if first.startswith("0") else 0
        return [f"{number:0{width}d}" for number in range(int(first), int(last) + 1)]
    if "," in text:
        return text.split(",")
    raise ValueError(f"brace group {{{text}}} in {pattern!r} is neither a range such as {{00000..01242}} "
                     "nor alternatives such as {a,b}")
