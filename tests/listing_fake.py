"""An in-memory ListObjectsV2 for the tests of ``storage/listing.py``: S3's semantics (prefix,
start-after, continuation token, delimiter "/", sorted keys, at most ``page_size`` entries per
page), counting requests and the most in flight at once."""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from storage.listing import Page

#: Sorts after every key the tests make: a token that resumes past everything under a sub-prefix.
_PAST = "\U0010ffff"


class FakeS3:
    """``fetch(prefix, start_after, token, delimited)`` as ``storage.listing`` calls it.

    ``prefix_after_start`` says what a common prefix that holds the start-after key does: True
    (returned: keys under it sort after start-after, as S3 does) or False (left out, as
    ``bench/s3_lite.py`` does). ``fail`` maps a request's prefix to the exception it raises.
    ``hold(prefixes)``: the first requests for those prefixes are answered only once all of them
    are in flight together (or after 5 s): side by side they pass at once, one at a time each waits.
    """

    def __init__(self, keys: Iterable[str], page_size: int = 1000, prefix_after_start: bool = True) -> None:
        self.keys = sorted(set(keys))
        self.page_size = page_size
        self.prefix_after_start = prefix_after_start
        self.fail: dict[str, BaseException] = {}
        self.requests: list[tuple[str, str, str | None, bool]] = []
        self.in_flight = self.max_in_flight = 0
        self._held: set[str] = set()
        self._barrier: threading.Barrier | None = None
        self._lock = threading.Lock()

    def hold(self, prefixes: set[str]) -> None:
        self._held, self._barrier = prefixes, threading.Barrier(len(prefixes), timeout=5)

    def fetch(self, prefix: str, start_after: str, token: str | None, delimited: bool) -> Page:
        with self._lock:
            self.requests.append((prefix, start_after, token, delimited))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if prefix in self._held and token is None:
                try:
                    self._barrier.wait()
                except threading.BrokenBarrierError:
                    pass
            if prefix in self.fail:
                raise self.fail[prefix]
            return self._page(prefix, start_after, token, delimited)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _page(self, prefix: str, start_after: str, token: str | None, delimited: bool) -> Page:
        after = token if token is not None else start_after
        at = max(bisect_left(self.keys, prefix), bisect_right(self.keys, after))
        keys: list[str] = []
        prefixes: list[str] = []
        last = None
        while at < len(self.keys) and self.keys[at].startswith(prefix):
            if len(keys) + len(prefixes) == self.page_size:
                return Page(keys, prefixes, last)
            key = self.keys[at]
            rest = key[len(prefix):]
            if delimited and "/" in rest:
                common = prefix + rest[:rest.index("/") + 1]
                if token is None and common <= start_after and not self.prefix_after_start:
                    at = bisect_left(self.keys, common + _PAST)
                    continue
                prefixes.append(common)
                last = common + _PAST
                at = bisect_left(self.keys, last)
                continue
            keys.append(key)
            last = key
            at += 1
        return Page(keys, prefixes, None)
