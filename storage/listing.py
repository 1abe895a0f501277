"""Listing an S3 prefix with several requests in flight, in S3's key order (``S3Store.list``).

One ListObjectsV2 request returns at most 1,000 keys, and the next page can only be asked for once
the previous one has come back (its continuation token), so a plain listing of N keys is N / 1,000
round trips one after another. What can go side by side are listings of disjoint parts of the key
space, and ``Delimiter="/"`` names those parts: one request returns the *direct* keys of a level
and its sub-prefixes ("CommonPrefixes").

Why emitting them in turn gives S3's order (keys compared as strings, which for UTF-8 is
S3's byte order): a sub-prefix ``C`` (``P`` + a name + "/") covers every key that starts with
``C``, and those form one contiguous run of the sorted keys, since a string between two strings
that start with ``C`` starts with ``C`` too. A direct key ``d`` of the level never starts with
``C`` (it has no "/" after ``P``), so ``d < C`` puts ``d`` before every key under ``C`` and
``d > C`` after every one of them (they differ at a position inside ``C``); two sub-prefixes
likewise. So the level's entries, direct keys and sub-prefixes sorted together as strings, with
each sub-prefix replaced by its own listing, are the level's keys in S3's order.

``start_after`` (``s``): a level's own listing starts after ``s`` when ``s`` is at that level,
and after ``C[:-1]`` when ``s`` lies inside a sub-prefix ``C`` (so that ``C`` itself is
returned, whatever a service does with a start-after inside a common prefix; the entries between
``C[:-1]`` and ``C`` sort before ``s`` and are dropped). A sub-prefix that ``s`` lies inside is
listed from ``s``; one that sorts after ``s`` whole; any other holds no key after ``s``.

How it runs (``parallel_keys``): a level's entries are turned into *units* in key order: runs of
direct keys, *ranges* (one sub-prefix, or several consecutive small ones, each listed flat by its
own paginated *cursor*), and, where a level has fewer sub-prefixes than ``concurrency`` (a dataset
under one top folder), *nested levels* listed with the delimiter again, up to ``SPLIT_DEPTH``
levels below the listed prefix: a delimited listing of a folder without sub-folders is the same
requests as a flat one, so looking a level further costs nothing there, and elsewhere finds the
sub-prefixes a lone top folder hides. A *window* per level starts the next ``concurrency`` ranges
ahead of the one being read, each reading up to ``PAGES_AHEAD`` pages ahead, on a pool of
``concurrency`` threads; the consumer reads the units in order. Memory is bounded: per open level,
``concurrency`` ranges of ``PAGES_AHEAD`` pages, and at most ``SPLIT_DEPTH + 1`` levels open.

Sub-prefixes of a few keys each (``uploads/<user>/``) would cost a request per sub-prefix where a
flat listing gets 1,000 keys per request; once the ranges read so far averaged fewer than
``GROUP_KEYS`` keys per sub-prefix, consecutive sub-prefixes (no direct key between them) are
listed together as one range: ``Prefix`` the level, ``StartAfter`` the first sub-prefix, ending at
the first key not below the last one with its "/" made "0" (which sorts after every key under it
and before anything after it), so a request brings hundreds of keys, as a flat listing's does. Until the first key has been taken, the listing
sends only the requests that key needs (a caller that reads one key and stops pays one or two),
and read-ahead starts with the second.

What cannot go side by side: the keys of one folder without sub-folders. S3 gives no way to
know where to split its key space without listing it, so a flat folder of N keys still takes
N / 1,000 round trips, read ahead while the caller works.

Pages are read with ``list_page``, which reads the keys out of ListObjectsV2's XML itself (regular
expressions where the answer is written as S3 writes it, ElementTree otherwise) instead of with
botocore's shape-driven parser, and before botocore's check for an error in a 200 answer
(which would parse the whole page once more; ``_install``): per page of 1,000 keys the client's
CPU, GIL held, goes from about 14 ms to a few, which bounds what any concurrency gets out of one
process. Errors are boto3's own,
raised to the caller at the place in key order where the failed page belongs (``S3Store``
translates them).
"""

from __future__ import annotations

import heapq
import html
import re
import threading
import xml.etree.ElementTree as ET
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from botocore import handlers as botocore_handlers

from storage.base import Listed

__all__ = ["GROUP_KEYS", "LIST_CONCURRENCY", "PAGES_AHEAD", "SPLIT_DEPTH", "Page", "list_page", "parallel_keys",
           "sequential_keys"]

#: Listing requests one listing has in flight at most (``S3Store(list_concurrency=...)``; 1 lists
#: page after page). At 30-150 ms a round trip, enough for the client's CPU (about 5 ms a page) to
#: be the limit where the sub-prefixes allow, and far below S3's request rates per prefix.
LIST_CONCURRENCY = 16
#: Pages (1,000 keys) each range reads ahead of the caller once the listing is warm: enough to
#: hold a sub-prefix of a few thousand keys whole while the ranges before it are read.
PAGES_AHEAD = 8
#: Levels below the listed prefix that are themselves listed with the delimiter where a level has
#: fewer sub-prefixes than the concurrency (``bucket/dataset/shard/...``).
SPLIT_DEPTH = 2
#: Consecutive sub-prefixes are listed as one range once the sub-prefixes listed so far held fewer
#: keys than this on average: about half a page per request at least.
GROUP_KEYS = 500
#: Sub-prefixes listed as one range at most.
MAX_GROUP = 1000

_DELIMITER = "/"
#: Sorts right after the delimiter: every key under "a/" sorts before "a0".
_PAST_DELIMITER = chr(ord(_DELIMITER) + 1)


class Page(NamedTuple):
    """One ListObjectsV2 answer: full keys and sub-prefixes, each sorted, and the continuation
    token of the next page (None on the last)."""

    keys: list[str]
    prefixes: list[str]
    token: str | None


#: ``fetch(prefix, start_after, token, delimited) -> Page``: one ListObjectsV2 request.
Fetch = Callable[[str, str, "str | None", bool], Page]


# --- one page -----------------------------------------------------------------------------

_local = threading.local()


def list_page(client: Any, bucket: str, prefix: str, start_after: str = "", token: str | None = None,
              delimited: bool = False, detailed: bool = False) -> Page:
    """One ListObjectsV2 request through the boto3 ``client`` (its retries, its errors): the page
    of ``prefix`` after ``start_after`` (or at ``token``), with ``Delimiter="/"`` if ``delimited``;
    with ``detailed``, each key a ``Listed`` (its size, LastModified and ETag).

    A successful answer is parsed here (``_parse_fast``, hooked into this thread's request only);
    anything else, error answers included, by botocore as usual.
    """
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if token:
        params["ContinuationToken"] = token
    elif start_after:
        params["StartAfter"] = start_after
    if delimited:
        params["Delimiter"] = _DELIMITER
    _install(client)
    _local.page, _local.active, _local.detailed = None, True, detailed
    try:
        response = client.list_objects_v2(**params)
    finally:
        _local.active = False
    page, _local.page = _local.page, None
    if page is not None:
        return page
    if detailed:
        return Page([Listed(item["Key"], item["Size"], item["LastModified"].timestamp(), item.get("ETag"))
                     for item in response.get("Contents", ())],
                    [item["Prefix"] for item in response.get("CommonPrefixes", ())],
                    response.get("NextContinuationToken") if response.get("IsTruncated") else None)
    return Page([item["Key"] for item in response.get("Contents", ())],
                [item["Prefix"] for item in response.get("CommonPrefixes", ())],
                response.get("NextContinuationToken") if response.get("IsTruncated") else None)


def _install(client: Any) -> None:
    """Put ``_parse_fast`` in front of botocore's check for an error in a 200 answer, once per client.

    That check (``_handle_200_error``, every S3 operation) parses the whole answer with ElementTree
    to see whether its root is <Error>: 2-3 ms a page of 1,000 keys, more than reading the keys.
    A page ``_parse_fast`` read is a whole ListBucketResult, so the check is left the empty one it
    puts in its place; any other answer, and every other operation, is checked as before.
    """
    meta = client.meta
    if getattr(meta, "_clipmask_listing", False):
        return
    with _INSTALL_LOCK:
        if getattr(meta, "_clipmask_listing", False):
            return
        meta.events.unregister("before-parse.s3.*", botocore_handlers._handle_200_error)
        meta.events.register_first("before-parse.s3.*", _check_200, unique_id="clipmask-check-200")
        meta._clipmask_listing = True


_INSTALL_LOCK = threading.Lock()


def _check_200(operation_model: Any, response_dict: dict, **kwargs: Any) -> None:
    if operation_model.name == "ListObjectsV2":
        _parse_fast(response_dict)
    botocore_handlers._handle_200_error(operation_model, response_dict, **kwargs)


def _parse_fast(response_dict: dict, **_: Any) -> None:
    """botocore's ``before-parse`` hook: parse a ListObjectsV2 answer of ``list_page`` into
    ``_local.page`` and leave botocore an empty result to parse. Keys are URL-decoded when the
    answer says they are encoded (botocore asks for that, and decodes, the same way)."""
    if not getattr(_local, "active", False) or response_dict.get("status_code") != 200:
        return
    body = response_dict.get("body")
    if not isinstance(body, bytes):
        return
    try:
        detailed = getattr(_local, "detailed", False)
        page = _scan(body.decode(), detailed) or _parse_tree(body, detailed)
    except (ET.ParseError, UnicodeDecodeError, ValueError, TypeError):
        return  # botocore's parser says what is wrong
    if page is not None:
        _local.page = page
        response_dict["body"] = b"<ListBucketResult/>"


#: ListObjectsV2's answer as S3 writes it: elements without namespace prefixes, text without
#: CDATA, each key in a <Key> of its own; KeyCount, where given, counts keys and sub-prefixes.
_ROOT = re.compile(r"^\s*(?:<\?xml[^>]*\?>\s*)?<ListBucketResult[\s>]")
_KEY = re.compile(r"<Key>([^<]*)</Key>")
_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")
_FIELDS = {name: re.compile(rf"<{name}>([^<]*)</{name}>")
           for name in ("KeyCount", "IsTruncated", "NextContinuationToken", "EncodingType")}


#: An object's fields in a detailed page, Key first in each <Contents> as S3 writes it.
_OBJECT_FIELDS = re.compile(r"<(Key|LastModified|ETag|Size)>([^<]*)</\1>")
_DETAILS = ("LastModified", "ETag", "Size")


def _scan(text: str, detailed: bool = False) -> Page | None:
    """The page, read with regular expressions (a tenth of building a tree); None where the
    answer is not written as S3 writes it, for ``_parse_tree`` to read."""
    if not _ROOT.match(text) or "<![CDATA[" in text or ":Key>" in text or ":Prefix>" in text:
        return None
    if not text.rstrip().endswith("</ListBucketResult>"):
        return None  # cut short: ElementTree fails on it, and botocore retries
    fields = {name: match.group(1) if (match := pattern.search(text)) else None for name, pattern in _FIELDS.items()}
    objects = _scan_objects(text) if detailed else None
    if detailed and objects is None:
        return None
    keys = [fields_of["Key"] for fields_of in objects] if objects is not None else _KEY.findall(text)
    prefixes = _PREFIX.findall(text)
    if fields["KeyCount"] is not None and int(fields["KeyCount"]) != len(keys) + len(prefixes):
        return None
    escaped = "&" in text
    if escaped:
        keys, prefixes = [html.unescape(key) for key in keys], [html.unescape(sub) for sub in prefixes]
    details = None
    if objects is not None:
        details = [(item["LastModified"], html.unescape(item["ETag"]) if escaped else item["ETag"], item["Size"])
                   for item in objects]
    return _page(keys, prefixes, fields["IsTruncated"] == "true", fields["NextContinuationToken"],
                 fields["EncodingType"] == "url", details)


def _scan_objects(text: str) -> list[dict[str, str]] | None:
    """Each <Contents>' Key, LastModified, ETag and Size; None unless every object has the four,
    its Key first."""
    objects: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for tag, value in _OBJECT_FIELDS.findall(text):
        if tag == "Key":
            current = {"Key": value}
            objects.append(current)
        elif current is None or tag in current:
            return None
        else:
            current[tag] = value
    if any(len(item) != 4 for item in objects):
        return None
    return objects


def _parse_tree(body: bytes, detailed: bool = False) -> Page | None:
    """The page, read with ElementTree; None if the answer is not a ListBucketResult."""
    root = ET.fromstring(body)
    ns = root.tag[:root.tag.find("}") + 1]
    if root.tag[len(ns):] != "ListBucketResult":
        return None
    contents = list(root.iterfind(f"{ns}Contents"))
    keys = [node.findtext(ns + "Key") or "" for node in contents]
    details = None
    if detailed:
        details = [(node.findtext(ns + "LastModified"), node.findtext(ns + "ETag"), node.findtext(ns + "Size"))
                   for node in contents]
    prefixes = [node.text or "" for node in root.iterfind(f"{ns}CommonPrefixes/{ns}Prefix")]
    return _page(keys, prefixes, root.findtext(ns + "IsTruncated") == "true",
                 root.findtext(ns + "NextContinuationToken"), root.findtext(ns + "EncodingType") == "url", details)


def _page(keys: list[str], prefixes: list[str], truncated: bool, token: str | None, url_encoded: bool,
          details: list[tuple] | None = None) -> Page:
    """The page; with ``details`` (LastModified, ETag, Size of each key, as text), its keys ``Listed``."""
    if url_encoded:
        keys, prefixes = [_url_decode(key) for key in keys], [_url_decode(sub) for sub in prefixes]
    if details is not None:
        keys = [Listed(key, int(size), _timestamp(modified), etag)
                for key, (modified, etag, size) in zip(keys, details)]
    return Page(keys, prefixes, (token or None) if truncated else None)


def _timestamp(text: str) -> float:
    """S3's LastModified ("2026-12-05T08:00:00.000Z") in seconds since the epoch."""
    return datetime.fromisoformat(text).timestamp()


def _url_decode(text: str) -> str:
    return unquote_plus(text) if "%" in text or "+" in text else text


# --- one request at a time ------------------------------------------------------------------


def sequential_keys(fetch: Fetch, prefix: str, start_after: str = "") -> Iterator[str]:
    """The keys under ``prefix`` after ``start_after``, one page after another (placeholders
    ending in "/" skipped)."""
    token = None
    while True:
        page = fetch(prefix, start_after, token, False)
        for key in page.keys:
            if not key.endswith(_DELIMITER):
                yield key
        if page.token is None:
            return
        token = page.token


# --- side by side ---------------------------------------------------------------------------


def parallel_keys(fetch: Fetch, prefix: str, start_after: str = "",
                  concurrency: int = LIST_CONCURRENCY) -> Iterator[str]:
    """The keys under ``prefix`` after ``start_after``, in S3's order, the same as
    ``sequential_keys`` gives, with up to ``concurrency`` requests in flight (module docstring).
    Closing the generator stops the listing: requests in flight are left to end, nothing new is sent."""
    listing = _Listing(fetch, concurrency)
    try:
        yield from listing.keys(prefix, start_after)
    finally:
        listing.close()


def level_start(prefix: str, after: str) -> str | None:
    """StartAfter for the delimited listing of level ``prefix`` when only keys after ``after``
    are wanted; None when no key under ``prefix`` sorts after ``after``."""
    if not after.startswith(prefix):
        return "" if after < prefix else None
    rest = after[len(prefix):]
    slash = rest.find(_DELIMITER)
    return after if slash < 0 else prefix + rest[:slash]


class _Wait(NamedTuple):
    """A planner needs ``cursor``'s next page, which has not come yet."""

    cursor: _Cursor


class _Keys(NamedTuple):
    """Direct keys of a level, ready."""

    keys: list[str]


class _Range(NamedTuple):
    """Keys listed flat by ``cursor``: one sub-prefix, or ``prefixes`` consecutive ones."""

    cursor: _Cursor
    prefixes: int


class _Level(NamedTuple):
    """A sub-prefix listed with the delimiter again (``cursor``), at ``depth`` below the listed prefix."""

    prefix: str
    after: str
    depth: int
    cursor: _Cursor


_NOT_READY = object()


class _Listing:
    """One parallel listing: its pool, its lock, its open cursors and windows, what it learnt."""

    def __init__(self, fetch: Fetch, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.fetch, self.concurrency = fetch, concurrency
        self.cond = threading.Condition()
        self.closed = False
        #: Pages each cursor reads ahead: none (only what is asked for) until warm.
        self.ahead = 0
        self.warm = False
        self._pool: ThreadPoolExecutor | None = None
        self._cursors: set[_Cursor] = set()
        self._windows: list[_Window] = []
        #: Keys and sub-prefixes of the ranges read so far (how large a sub-prefix is).
        self._range_keys = self._range_prefixes = 0

    # -- the pool (called with ``cond`` held) --

    def submit(self, task: Callable[[], None]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="clipmask-list")
        self._pool.submit(task)

    def opened(self, cursor: _Cursor) -> None:
        self._cursors.add(cursor)
        cursor.pump()

    def ended(self, cursor: _Cursor) -> None:
        self._cursors.discard(cursor)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self._cursors.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self.cond.notify_all()

    # -- the consumer's side --

    def keys(self, prefix: str, after: str) -> Iterator[str]:
        root = self._level(prefix, after, 0)
        if root is not None:
            yield from self._walk(root)

    def _walk(self, level: _Level) -> Iterator[str]:
        """The keys of ``level``, unit by unit, with a window of units started ahead."""
        window = _Window(self, self._plan(level))
        self._windows.append(window)
        try:
            while (unit := window.next_unit()) is not None:
                if isinstance(unit, _Keys):
                    yield from self._emit(unit.keys)
                elif isinstance(unit, _Range):
                    yield from self._drain(unit)
                else:
                    yield from self._walk(unit)
        finally:
            self._windows.pop()

    def _drain(self, unit: _Range) -> Iterator[str]:
        count = 0
        while (keys := unit.cursor.next_page()) is not None:
            count += len(keys)
            yield from self._emit(keys)
            self._top_up()
        self._range_keys += count
        self._range_prefixes += unit.prefixes

    def _emit(self, keys: list[str]) -> Iterator[str]:
        for key in keys:
            yield key
            if not self.warm:  # the caller came back for a second key: read ahead from now on
                self._warm_up()

    def _warm_up(self) -> None:
        with self.cond:
            self.warm, self.ahead = True, PAGES_AHEAD
            for cursor in list(self._cursors):
                cursor.pump()
        self._top_up()

    def _top_up(self) -> None:
        """Start what each open level's window has room for, without waiting for any page."""
        for window in self._windows:
            window.top_up(block=False)

    # -- planning a level: its entries as units, in key order --

    def _level(self, prefix: str, after: str, depth: int) -> _Level | None:
        start = level_start(prefix, after)
        if start is None:
            return None
        return _Level(prefix, after, depth, _Cursor(self, prefix, start, delimited=True))

    def _range(self, prefixes: list[str], level: str, after: str) -> _Range:
        first = prefixes[0]
        if len(prefixes) == 1:
            return _Range(_Cursor(self, first, max(first, after)), 1)
        stop = prefixes[-1][:-1] + _PAST_DELIMITER  # every key under the last one sorts before it
        return _Range(_Cursor(self, level, max(first, after), stop=stop), len(prefixes))

    def _group_size(self) -> int:
        """Sub-prefixes per range: 1 until enough ranges were read to tell their size."""
        if self._range_prefixes < self.concurrency:
            return 1
        per_prefix = self._range_keys / self._range_prefixes
        return max(1, min(MAX_GROUP, int(GROUP_KEYS / max(per_prefix, 1.0))))

    def _plan(self, level: _Level) -> Iterator[Any]:
        """The units of ``level`` in key order, yielding ``_Wait`` where a page has not come yet."""
        after, first, split = level.after, True, False
        while True:
            page = level.cursor.next_page(block=False)
            if page is _NOT_READY:
                yield _Wait(level.cursor)
                continue
            if page is None:
                return
            if first:
                first = False
                split = (level.depth < SPLIT_DEPTH and page.token is None
                         and 0 < len(page.prefixes) < self.concurrency)
            run: list[str] = []
            group: list[str] = []
            size = 1
            entries = heapq.merge(((key, False) for key in page.keys), ((sub, True) for sub in page.prefixes))
            for entry, is_prefix in entries:
                if not is_prefix:
                    if entry > after and not entry.endswith(_DELIMITER):
                        if group:
                            yield self._range(group, level.prefix, after)
                            group = []
                        run.append(entry)
                    continue
                if entry <= after and not after.startswith(entry):
                    continue  # every key under it sorts before ``after``
                if run:
                    yield _Keys(run)
                    run = []
                if split:
                    nested = self._level(entry, after, level.depth + 1)
                    if nested is not None:
                        yield nested
                    continue
                if not group:
                    size = self._group_size()
                group.append(entry)
                if len(group) >= size:
                    yield self._range(group, level.prefix, after)
                    group = []
            if group:
                yield self._range(group, level.prefix, after)
            if run:
                yield _Keys(run)


class _Window:
    """The units of one level started ahead of the one being read: while cold, one; then up to
    ``concurrency`` ranges and nested levels, and as many runs of direct keys besides."""

    def __init__(self, listing: _Listing, planner: Iterator[Any]) -> None:
        self.listing, self.planner = listing, planner
        self.units: deque = deque()
        self.ranges = 0
        self.ended = False
        self.error: Exception | None = None

    def _room(self) -> bool:
        if not self.listing.warm:
            return not self.units
        limit = self.listing.concurrency
        return self.ranges < limit and len(self.units) < 2 * limit

    def top_up(self, block: bool) -> None:
        """Take units from the planner while there is room; wait for a page only if ``block``
        and nothing is ready. A planner's error waits until the units before it are read."""
        while not self.ended and self.error is None and self._room():
            try:
                unit = next(self.planner)
            except StopIteration:
                self.ended = True
                return
            except Exception as err:  # noqa: BLE001 - raised in turn, in next_unit
                self.error = err
                return
            if isinstance(unit, _Wait):
                if self.units or not block:
                    return
                unit.cursor.wait()
                continue
            self.units.append(unit)
            self.ranges += not isinstance(unit, _Keys)

    def next_unit(self) -> Any:
        """The next unit in key order, None after the last; raises the planner's error in turn."""
        self.top_up(block=True)
        if self.units:
            unit = self.units.popleft()
            self.ranges -= not isinstance(unit, _Keys)
            return unit
        if self.error is not None:
            raise self.error
        return None


class _Cursor:
    """One paginated listing (flat, or delimited for a level), its requests sent one after
    another on the listing's pool, reading up to ``listing.ahead`` pages ahead of its reader, or
    the next page when the reader asks for it. A flat cursor with ``stop`` ends at the first key
    not below it. Pages read: a flat cursor's are lists of keys (placeholders dropped), a
    delimited one's ``Page``s."""

    def __init__(self, listing: _Listing, prefix: str, start_after: str, *, delimited: bool = False,
                 stop: str | None = None) -> None:
        self.listing, self.prefix, self.start_after = listing, prefix, start_after
        self.delimited, self.stop = delimited, stop
        self._pages: deque = deque()
        self._token: str | None = None
        self._busy = self._done = self._wanted = False
        self._error: BaseException | None = None
        with listing.cond:
            listing.opened(self)

    def pump(self) -> None:
        """Send the next request if one is due (called with ``listing.cond`` held)."""
        listing = self.listing
        if self._busy or self._done or self._error is not None or listing.closed:
            return
        if self._wanted or len(self._pages) < listing.ahead:
            self._busy = True
            listing.submit(self._fetch)

    def _fetch(self) -> None:
        """One request, in the pool: its page (or error) is kept for the reader."""
        listing = self.listing
        try:
            if listing.closed:
                return
            page = listing.fetch(self.prefix, self.start_after, self._token, self.delimited)
            done = page.token is None
            if self.delimited:
                item: Any = page
            else:
                keys = page.keys
                if self.stop is not None and keys and keys[-1] >= self.stop:
                    keys, done = keys[:bisect_left(keys, self.stop)], True
                item = [key for key in keys if not key.endswith(_DELIMITER)]
        except BaseException as err:  # noqa: BLE001 - the reader raises it
            with listing.cond:
                self._error, self._busy = err, False
                listing.ended(self)
                listing.cond.notify_all()
            return
        with listing.cond:
            self._pages.append(item)
            self._token, self._done, self._busy = page.token, done, False
            if done:
                listing.ended(self)
            else:
                self.pump()
            listing.cond.notify_all()

    def next_page(self, block: bool = True) -> Any:
        """The next page; None after the last; ``_NOT_READY`` if it has not come and not ``block``.
        Raises the request's error once the pages before it are read."""
        listing = self.listing
        with listing.cond:
            while not self._pages:
                if self._error is not None:
                    raise self._error
                if self._done or listing.closed:
                    return None
                self._wanted = True
                self.pump()
                if not block:
                    return _NOT_READY
                listing.cond.wait()
            self._wanted = False
            page = self._pages.popleft()
            self.pump()
            return page

    def wait(self) -> None:
        """Block until a page, the end or an error has come."""
        listing = self.listing
        with listing.cond:
            while not (self._pages or self._done or self._error is not None or listing.closed):
                self._wanted = True
                self.pump()
                listing.cond.wait()
