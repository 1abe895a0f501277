"""S3Store against a faulty network: a real moto server behind tests.services.FaultyProxy.

The proxy answers 503 SlowDown at random and cuts response bodies off at
random, with a fixed seed, so every run meets the same faults.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from obstore.exceptions import GenericError

from storage import is_transient, open_store
from tests.services import FaultyProxy, free_port

OBJECTS = 60
OBJECT_SIZE = 50_000


@pytest.fixture
def through(s3_bucket, moto_server, monkeypatch):
    """Return a function that starts a FaultyProxy before moto and points boto3 at it.

    A store's boto3 client is made on first use: open stores after calling it.
    """
    proxies = []

    def start(**faults) -> FaultyProxy:
        proxy = FaultyProxy(moto_server.endpoint, **faults).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def payload(i: int) -> bytes:
    return random.Random(i).randbytes(OBJECT_SIZE)


def test_store_through_slowdowns_and_cut_bodies_loses_nothing(s3_bucket, through):
    # Given S3 behind a proxy that throttles 5% and cuts 5% of responses (at the
    # default 20% throttling botocore's back-off makes this test last half a minute)
    proxy = through(slowdown=0.05, drop=0.05, seed=3)
    store = open_store(f"s3://{s3_bucket}/faults/")
    keys = [f"obj/{i:03d}.bin" for i in range(OBJECTS)]
    # When objects are written, read back and listed, one request at a time
    for i, key in enumerate(keys):
        store.write_bytes(key, payload(i))
    read = [store.read_bytes(key) for key in keys]
    listed = list(store.list("obj/"))
    # Then every call succeeds with the right data, though faults did happen
    assert read == [payload(i) for i in range(OBJECTS)]
    assert listed == keys
    assert proxy.slowdowns >= 1 and proxy.drops >= 1, vars(proxy)


def test_store_through_faults_at_a_round_trip_with_many_requests_in_flight_loses_nothing(s3_bucket, through):
    # Given S3 that answers after a 50 ms round trip, throttles 5% and cuts 5% of responses
    proxy = through(slowdown=0.05, drop=0.05, seed=5, delay_s=0.05)
    store = open_store(f"s3://{s3_bucket}/faults/")
    keys = [f"obj/{i:03d}.bin" for i in range(OBJECTS)]
    # When objects are written, then read back, 16 at a time (as a worker's storage threads do)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: store.write_bytes(keys[i], payload(i)), range(OBJECTS)))
        read = list(pool.map(store.read_bytes, keys))
    # Then every object reads back whole, though requests overlapped and faults did happen
    assert read == [payload(i) for i in range(OBJECTS)]
    assert list(store.list("obj/")) == keys
    assert proxy.max_in_flight > 1
    assert proxy.slowdowns >= 1 and proxy.drops >= 1, vars(proxy)


def test_get_cut_now_and_then_is_read_again(s3_bucket, through):
    # Given objects whose GET bodies are cut 30% of the time
    for i in range(10):
        open_store(f"s3://{s3_bucket}/faults/").write_bytes(f"k{i}", payload(i))
    proxy = through(slowdown=0, drop=0.3, methods={"GET"}, seed=3)
    store = open_store(f"s3://{s3_bucket}/faults/")  # its client is made now: through the proxy
    # When they are read, Then read_bytes GETs them again and returns them whole
    assert [store.read_bytes(f"k{i}") for i in range(10)] == [payload(i) for i in range(10)]
    assert proxy.drops >= 1


def test_get_cut_every_time_raises_transient_connection_error(s3_bucket, through):
    # Given an object whose every GET body is cut off halfway
    open_store(f"s3://{s3_bucket}/faults/").write_bytes("k", payload(0))
    proxy = through(slowdown=0, drop=1.0, methods={"GET"})
    store = open_store(f"s3://{s3_bucket}/faults/", max_attempts=3)
    # When it is read, Then read_bytes gives up after max_attempts GETs (one retry layer: the
    # client's, which GETs a cut body again) with a ConnectionError (transient) that names the
    # cut body and keeps the client's error as cause
    with pytest.raises(ConnectionError, match="body") as info:
        store.read_bytes("k")
    assert is_transient(info.value)
    assert isinstance(info.value.__cause__, GenericError)
    assert proxy.drops == 3


def test_stream_cut_now_and_then_reads_whole(s3_bucket, through):
    # Given objects of 2 MB whose GET bodies are cut 30% of the time
    for i in range(10):
        open_store(f"s3://{s3_bucket}/faults/").write_bytes(f"k{i}", payload(i) * 40)
    proxy = through(slowdown=0, drop=0.3, methods={"GET"}, seed=3)
    store = open_store(f"s3://{s3_bucket}/faults/")
    # When they are read as streams, Then the client reads each cut body on from where it was cut
    # (a ranged GET) and every stream gives its object whole
    for i in range(10):
        with store.read_stream(f"k{i}") as stream:
            assert stream.read() == payload(i) * 40
    assert proxy.drops >= 1


def test_stream_cut_every_time_raises_transient_connection_error_while_read(s3_bucket, through):
    # Given an object whose every GET body is cut off halfway
    open_store(f"s3://{s3_bucket}/faults/").write_bytes("shard.tar", payload(0))
    proxy = through(slowdown=0, drop=1.0, methods={"GET"})
    store = open_store(f"s3://{s3_bucket}/faults/", max_attempts=2)
    # When it is read as a stream, Then the read that meets the last cut raises a ConnectionError
    # (transient), the client's error as cause, after max_attempts GETs
    stream = store.read_stream("shard.tar")
    with pytest.raises(ConnectionError) as info:
        while stream.read(4096):
            pass
    assert is_transient(info.value) and isinstance(info.value.__cause__, GenericError)
    assert proxy.drops == 2


def test_throttled_every_time_raises_after_the_clients_retries(s3_bucket, through):
    # Given S3 answering only 503 SlowDown
    proxy = through(slowdown=1.0, drop=0)
    store = open_store(f"s3://{s3_bucket}/faults/", max_attempts=2)
    # When a write or a read is tried, Then the client tries max_attempts times in all,
    # read_bytes adds no retries of its own, and a transient ConnectionError names SlowDown
    with pytest.raises(ConnectionError, match="SlowDown") as info:
        store.write_bytes("k", b"x")
    assert proxy.slowdowns == 2
    with pytest.raises(ConnectionError, match="SlowDown"):
        store.read_bytes("k")
    assert proxy.slowdowns == 4
    assert is_transient(info.value)


def test_multipart_stream_through_faults_round_trips(s3_bucket, through):
    # Given S3 behind a throttling proxy (no cuts: moto fails a CompleteMultipartUpload
    # sent again after its first response was lost)
    proxy = through(slowdown=0.5, drop=0, seed=0)
    store = open_store(f"s3://{s3_bucket}/faults/", part_size=5 * 1024 * 1024)
    data = random.Random(7).randbytes(11 * 1024 * 1024)
    # When a multipart stream is written, Then it reads back whole
    chunks = (data[i:i + 65_536] for i in range(0, len(data), 65_536))
    assert store.write_stream("big.bin", chunks) == len(data)
    assert store.read_bytes("big.bin") == data
    assert proxy.slowdowns >= 1


def test_stores_share_one_client_and_a_new_endpoint_gets_its_own(s3_bucket, monkeypatch):
    # Given two stores opened with the same settings (each chunk task and each offload request
    # opens its own: a boto3 client of its own would cost them 60-190 ms of CPU each)
    first = open_store(f"s3://{s3_bucket}/a/", max_attempts=1)
    second = open_store(f"s3://{s3_bucket}/b/", max_attempts=1)
    first.write_bytes("k", b"one")
    # Then they share one client of each kind
    assert first._s3() is second._s3()
    assert first._data(first.url) is second._data(second.url)
    # And a store opened after the endpoint changed uses the new endpoint (here: nothing listening)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    moved = open_store(f"s3://{s3_bucket}/a/", max_attempts=1)
    with pytest.raises(ConnectionError):
        moved.read_bytes("k")
    # While the stores opened before keep theirs
    assert first.read_bytes("k") == b"one"
