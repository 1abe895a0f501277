"""The shard members a preview's cards need, each shard read once (docs/design.md, "Shards").

A job over shards names a sample's image ``<input shard URL>#<key>`` and its outputs
``<output shard URL>#<key>.json`` (``.mask.png``, ``.raw.png``); its manifest row says which
shard and key. ``ShardMembers`` gathers those URLs of the sampled rows by shard and reads each
shard once, from one ``read_stream`` (one GET): a tar up to the last member it needs, the rest
left unread (``pick_members``); a Parquet file's ``key`` column, then only the row groups and
columns that hold what is needed (``pick_cells``; pyarrow is imported only when a Parquet shard is
met). Shards are read side by side on the caller's thread pool. Only the needed members' bytes are
kept, each until its card takes it (``read``): memory holds at most the sample's images, masks and
records, never a shard. A shard that cannot be read (missing, cut off, corrupt, storage failing)
fails only the members not yet found in it, each with the shard's reason, so only the cards that
need them become error cards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from storage import URLReader
from storage.layout import output_keys
from tasks.shards.names import PARQUET_SUFFIX
from tasks.shards.tar import pick_members

__all__ = ["Member", "MemberUnavailable", "ShardMembers", "shard_members"]

#: The column of each output role in a Parquet output shard (``ParquetShardWriter``).
PARQUET_COLUMNS = {"mask": "mask", "raw": "raw", "metadata": "json"}


class MemberUnavailable(LookupError):
    """A shard member a card needs could not be had; its text says which and why."""


@dataclass(frozen=True)
class Member:
    """One member of a shard by the role it plays for sample ``key``: ``image`` (the input
    shard's sample: a tar's image member, a Parquet row's image column), or an output role
    (``mask``, ``raw``, ``metadata``: ``<key>.mask.png``, ... of a tar, a column of a Parquet row)."""

    shard: str
    key: str
    role: str

    @property
    def name(self) -> str:
        """The member's name in a tar (for ``image``, the sample's key)."""
        return self.key if self.role == "image" else output_keys(self.key)[self.role]

    @property
    def parquet(self) -> bool:
        return self.shard.endswith(PARQUET_SUFFIX)

    def missing(self) -> str:
        """Why it is not there, the shard having been read."""
        if self.parquet:
            what = "an image" if self.role == "image" else f"a {PARQUET_COLUMNS[self.role]!r} value"
            return f"shard {self.shard} has no row {self.key} with {what}"
        if self.role == "image":
            return f"shard {self.shard} has no sample {self.key} with an image member"
        return f"shard {self.shard} has no member {self.name}"


def shard_members(row: dict) -> dict[str, Member]:
    """The URLs of a manifest ``row`` that name a member of a shard, with that member: the
    ``source`` (``<shard>#<key>``) and ``outputs`` (``<output shard>#<key>.json``, ...) of a row of
    a job over shards (one with ``shard`` and ``key``); nothing for any other row."""
    shard, key = row.get("shard"), row.get("key")
    if not isinstance(shard, str) or not isinstance(key, str) or not key:
        return {}
    found: dict[str, Member] = {}
    if row.get("source") == f"{shard}#{key}":
        found[f"{shard}#{key}"] = Member(shard, key, "image")
    outputs = row.get("outputs") if isinstance(row.get("outputs"), dict) else {}
    for role, name in output_keys(key).items():
        url = outputs.get(role)
        if isinstance(url, str) and url.endswith("#" + name) and len(url) > len(name) + 1:
            found[url] = Member(url[:-len(name) - 1], key, role)
    return found


class ShardMembers:
    """The shard members that sampled ``rows`` name, read shard by shard (``fetch``), then handed
    over by URL (``read``); any other URL is read as it is with ``reader``. Safe to share between
    threads."""

    def __init__(self, rows: Iterable[dict], reader: URLReader | None = None) -> None:
        self._reader = reader or URLReader()
        self._wanted: dict[str, dict[str, Member]] = {}  # shard URL: {member URL: member}
        for row in rows:
            for url, member in shard_members(row).items():
                self._wanted.setdefault(member.shard, {})[url] = member
        self._held: dict[str, bytes | MemberUnavailable] = {}
        self._lock = threading.Lock()

    @property
    def shards(self) -> list[str]:
        """The URLs of the shards to read, one each."""
        return sorted(self._wanted)

    @property
    def needs_image_column(self) -> bool:
        """Whether an image is to be read from a Parquet shard (whose image column the job names)."""
        return any(member.role == "image" and member.parquet
                   for members in self._wanted.values() for member in members.values())

    def fetch(self, pool: Executor, image_column: str | None = None) -> None:
        """Read every shard needed, once each, side by side on ``pool``; ``image_column`` is the
        Parquet input shards' (None: ``jpg``, else ``image``). Never raises for a shard: what
        could not be had is a ``MemberUnavailable`` that ``read`` raises."""
        for _ in pool.map(lambda shard: self._fetch_shard(shard, image_column), self.shards):
            pass

    def read(self, url: str) -> bytes:
        """The bytes at ``url``: a fetched member's, handed over once (then no longer held), or
        raising ``MemberUnavailable``; any other URL read with the reader."""
        with self._lock:
            held = self._held.pop(url, None)
        if held is None:
            return self._reader.read(url)
        if isinstance(held, MemberUnavailable):
            raise held
        return held

    def _fetch_shard(self, shard: str, image_column: str | None) -> None:
        wanted = self._wanted[shard]
        found: dict[str, bytes] = {}
        failure = None
        try:
            with self._reader.read_stream(shard) as stream:
                for url, data in _pick(shard, stream, wanted, image_column):
                    found[url] = data
        except Exception as err:  # noqa: BLE001 - one shard's fault fails its own members only
            text = str(err).strip()
            failure = f"shard {shard} could not be read: {type(err).__name__}" + (f": {text}" if text else "")
        with self._lock:
            for url, member in wanted.items():
                self._held[url] = found[url] if url in found else MemberUnavailable(failure or member.missing())


def _pick(shard: str, stream, wanted: dict[str, Member], image_column: str | None):
    """``(member URL, bytes)`` of each wanted member found in the shard's ``stream``."""
    if shard.endswith(PARQUET_SUFFIX):
        from tasks.shards.parquet import pick_cells  # pyarrow, only once a Parquet shard is met

        cells = {(member.key, PARQUET_COLUMNS.get(member.role)): url for url, member in wanted.items()}
        for cell, data in pick_cells(stream, cells, image_column):
            yield cells[cell], data
        return
    names = {member.name: url for url, member in wanted.items() if member.role != "image"}
    keys = {member.key: url for url, member in wanted.items() if member.role == "image"}
    for name, data in pick_members(stream, names, keys):
        yield (names[name] if name in names else keys[name]), data
