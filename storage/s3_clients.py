"""The process's S3 clients, shared by every S3Store: boto3's for listing and multipart uploads,
obstore's for the data path (GET, PUT and HEAD of single objects).

Both are configured from boto3's resolution of the ``AWS_*`` environment and config files
(endpoint, credentials, region, profile), so the two always reach the same service as the same
user. obstore (Rust's ``object_store``) sends a request for about a tenth of boto3's CPU and
waits with the GIL released (``bench/bench_feed.py`` measures both); boto3 keeps what obstore
does differently (part sizes of multipart uploads, paginated listing, a DELETE that is not a
DeleteObjects).

Retries live in each client, once per request: ``max_attempts`` attempts in all, the first
included, for throttling, 5xx, connection errors and (obstore) a GET body cut off mid-stream.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

__all__ = ["MAX_CONNECTIONS", "shared_client", "shared_data_store"]

#: Connections a boto3 client keeps open for reuse: more than the requests a process sends at once
#: (its storage threads, CLIPMASK_S3_CONCURRENCY, 400 by default); opened only as they are needed.
#: obstore's pool has no bound of its own.
MAX_CONNECTIONS = 1024
#: obstore's back-off between attempts: from 100 ms, doubling, at most 20 s (botocore's standard
#: mode caps its back-off at 20 s too).
_BACKOFF = {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=20), "base": 2}
#: obstore's timeouts: to connect; between two reads of a response (a stalled connection); for a
#: whole request, body included. Each expiry counts as one attempt.
_TIMEOUTS = {"connect_timeout": timedelta(seconds=10), "read_timeout": timedelta(seconds=30),
             "timeout": timedelta(seconds=120)}

#: The clients made in this process, most recently used last.
_CLIENTS: OrderedDict[tuple, Any] = OrderedDict()
_CLIENTS_LOCK = threading.RLock()  # a data store is made with the boto3 client
#: Clients kept for distinct settings (a long-lived process has one or two).
_CLIENTS_KEPT = 16


def _aws_environment() -> tuple:
    return tuple(sorted(item for item in os.environ.items() if item[0].startswith("AWS_")))


def _cached(key: tuple, make) -> Any:
    """The client cached under ``key`` (with the pid and ``AWS_*`` environment), made by ``make()``
    on first use."""
    key = (os.getpid(), *key, _aws_environment())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = make()
            while len(_CLIENTS) > _CLIENTS_KEPT:
                _CLIENTS.popitem(last=False)
        _CLIENTS.move_to_end(key)
        return client


def shared_client(max_attempts: int) -> Any:
    """This process's boto3 S3 client for ``max_attempts`` and the current ``AWS_*`` environment,
    made on first use and then shared by every store: a client is thread-safe, and making one
    costs 60-190 ms of CPU, with the GIL held (botocore loads and parses the service's model),
    which each chunk task and each offload request would otherwise pay for its stores."""
    def make() -> Any:
        config = Config(
            # total_max_attempts counts the first request too; Config's "max_attempts" would not.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=MAX_CONNECTIONS,
        )
        return boto3.session.Session().client("s3", config=config)
    return _cached(("boto3", max_attempts), make)


def shared_data_store(bucket: str, max_attempts: int) -> Any:
    """This process's obstore store of ``bucket`` (keys are full object keys), set up as
    ``shared_client(max_attempts)`` is. Raises PermissionError when no credentials are found."""
    return _cached(("obstore", bucket, max_attempts), lambda: _new_data_store(bucket, max_attempts))


def _new_data_store(bucket: str, max_attempts: int) -> Any:
    from obstore.auth.boto3 import Boto3CredentialProvider
    from obstore.store import S3Store as ObstoreS3

    meta = shared_client(max_attempts).meta
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise PermissionError("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "AWS_PROFILE, or a role)")
    endpoint = meta.endpoint_url
    host = urlsplit(endpoint).hostname or ""
    # AWS itself: obstore builds the bucket's virtual-hosted URL from the region.
    where = {} if host.endswith(".amazonaws.com") else {"endpoint": endpoint}
    return ObstoreS3(
        bucket, region=meta.region_name or "us-east-1", **where,
        credential_provider=Boto3CredentialProvider(session),
        client_options={"allow_http": endpoint.startswith("http://"), **_TIMEOUTS},
        retry_config={"max_retries": max_attempts - 1, "backoff": _BACKOFF},
    )


def _forget_clients_in_child() -> None:
    """After a fork: the parent's clients (their connections) and lock are not this process's."""
    global _CLIENTS_LOCK
    _CLIENTS.clear()
    _CLIENTS_LOCK = threading.RLock()  # a data store is made with the boto3 client


os.register_at_fork(after_in_child=_forget_clients_in_child)
