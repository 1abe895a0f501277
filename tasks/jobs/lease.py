"""A lock in Redis with a lease: one holder at a time, across processes and machines.

Taken with ``SET key token NX PX lease``; while held, a thread renews the lease every third of it,
so that a long hold (a scan planning a large job) keeps it, and a holder that dies frees it when
its lease runs out. Renewing and releasing act only while the key still holds this holder's token
(one Lua script each), so a holder whose lease ran out never extends or deletes its successor's.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Self

import redis

from tasks.jobs.index import this_planner

log = logging.getLogger(__name__)

#: Seconds a lease lasts unless renewed: how long a dead holder keeps the lock.
LEASE_S = 60.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Lease:
    """``with Lease(client, key) as lease:``; ``lease.held`` says whether this holder got it, else
    ``lease.holder`` names the one that has it (``host:pid``)."""

    def __init__(self, client: redis.Redis, key: str, seconds: float = LEASE_S):
        self.client, self.key, self.ms = client, key, int(seconds * 1000)
        self.token = f"{this_planner()}:{uuid.uuid4().hex[:8]}"
        self.held, self.holder = False, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.held = bool(self.client.set(self.key, self.token, nx=True, px=self.ms))
        if self.held:
            self._thread = threading.Thread(target=self._renew, name=f"lease {self.key}", daemon=True)
            self._thread.start()
        else:
            holder = self.client.get(self.key)
            self.holder = holder.rpartition(":")[0] if isinstance(holder, str) else holder
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError as err:  # the lease runs out by itself
            log.warning("could not release %s (%s); it is free again within %d s", self.key, err, self.ms // 1000)

    def _renew(self) -> None:
        while not self._stop.wait(self.ms / 3000):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ms):
                    log.warning("lost %s: its lease ran out before it was renewed", self.key)
                    return
            except redis.RedisError as err:
                log.warning("could not renew %s: %s", self.key, err)
