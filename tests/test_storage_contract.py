"""Contract of storage.ObjectStore: every backend must pass every test here.

The `store` fixture yields (a) a local store on tmp_path and (b) an S3 store
on s3://<fresh bucket>/root/prefix/ served by a real moto HTTP server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
import sys
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ResponseStreamingError
from obstore.exceptions import GenericError
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from storage import (
    LocalStore,
    ObjectStore,
    StorageError,
    StoreURL,
    URLReader,
    is_transient,
    open_store,
    parse_url,
    split_object_url,
)
from storage.errors import OBSTORE_ERRORS, translate_obstore_error, translate_s3_error
from storage.s3 import MIN_PART_SIZE
from tests.services import FaultyProxy, MotoServer, free_port

S3_ROOT = "root/prefix/"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/{S3_ROOT}")


@pytest.fixture
def s3_store(s3_bucket) -> ObjectStore:
    return open_store(f"s3://{s3_bucket}/{S3_ROOT}")


def is_s3(store: ObjectStore) -> bool:
    return store.url.startswith("s3://")


# --- reading and writing ---------------------------------------------------


@pytest.mark.parametrize("data", [b"hello", b"", bytes(range(256)) * 12288],
                         ids=["small", "empty", "3MB"])
def test_written_bytes_read_back_identical(store, data):
    # Given a store, When bytes are written under a key
    store.write_bytes("img/0001.png", data)
    # Then reading that key returns exactly those bytes
    assert store.read_bytes("img/0001.png") == data


def test_overwrite_replaces_content(store):
    # Given an existing object
    store.write_bytes("a.txt", b"old content, longer")
    # When the same key is written again
    store.write_bytes("a.txt", b"new")
    # Then the new content is read back, nothing of the old remains
    assert store.read_bytes("a.txt") == b"new"


def test_bytearray_and_memoryview_are_accepted(store):
    store.write_bytes("ba", bytearray(b"xy"))
    store.write_bytes("mv", memoryview(b"zw"))
    assert (store.read_bytes("ba"), store.read_bytes("mv")) == (b"xy", b"zw")


def test_writing_a_str_is_rejected(store):
    with pytest.raises(TypeError, match="bytes-like"):
        store.write_bytes("a.txt", "not bytes")
    assert not store.exists("a.txt")


def test_deeply_nested_key_round_trips(store):
    store.write_bytes("a/b/c/d/e.bin", b"deep")
    assert store.read_bytes("a/b/c/d/e.bin") == b"deep"
    assert store.exists("a/b/c/d/e.bin")


def test_missing_key_read_raises_file_not_found(store):
    # Given an empty store, When a missing key is read
    with pytest.raises(FileNotFoundError) as info:
        store.read_bytes("missing/key.jpg")
    # Then the error names the key's URL, and S3 names S3's error code and keeps the client's
    # error as cause
    assert store.url_for("missing/key.jpg") in str(info.value)
    if is_s3(store):
        assert "NoSuchKey" in str(info.value) and "Debug source" not in str(info.value)
        assert isinstance(info.value.__cause__, OBSTORE_ERRORS)


def test_key_below_a_file_is_not_found(store):
    store.write_bytes("a.jpg", b"x")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a.jpg/inner")


def test_directory_is_not_an_object(store):
    # Given an object below "dir/"
    store.write_bytes("dir/file", b"x")
    # Then "dir" itself neither exists nor reads as an object
    assert not store.exists("dir")
    with pytest.raises((IsADirectoryError, FileNotFoundError)):
        store.read_bytes("dir")


def test_exists_tells_written_from_missing(store):
    store.write_bytes("present.jpg", b"x")
    assert store.exists("present.jpg") is True
    assert store.exists("absent.jpg") is False


def test_delete_removes_an_object_and_forgives_a_missing_one(store):
    store.write_bytes("probe/a.txt", b"x")
    store.write_bytes("probe/b.txt", b"y")
    store.delete("probe/a.txt")
    store.delete("probe/never-written.txt")
    assert not store.exists("probe/a.txt") and store.read_bytes("probe/b.txt") == b"y"
    assert list(store.list("probe/")) == ["probe/b.txt"]


# --- listing ---------------------------------------------------------------

KEYS = ["a-b", "a/c", "a/d/e", "a0", "b/x.jpg", "b/y.jpg", "ba/z.jpg", "z"]


def test_lines_read_back_as_written(store):
    store.write_bytes("m/rows.jsonl", b'{"a": 1}\n{"b": 2}\nlast without newline')
    assert list(store.read_lines("m/rows.jsonl")) == [b'{"a": 1}\n', b'{"b": 2}\n', b"last without newline"]
    with pytest.raises(FileNotFoundError):
        list(store.read_lines("m/missing.jsonl"))


def test_stream_reads_back_as_written_in_pieces(store):
    # Given an object of several of S3's stream chunks (3 MiB and a bit)
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 7)
    store.write_bytes("shards/00000.tar", data)
    # When it is read as a stream in small, odd pieces (as a tar reader does)
    pieces = []
    with store.read_stream("shards/00000.tar") as stream:
        while piece := stream.read(10_001):
            pieces.append(piece)
    # Then the pieces are the object, in order, and none is larger than asked
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) <= 10_001


def test_stream_of_an_empty_object_ends_at_once(store):
    store.write_bytes("empty.tar", b"")
    with store.read_stream("empty.tar") as stream:
        assert stream.read() == b""


def test_stream_of_a_missing_key_raises_file_not_found_when_opened(store):
    # Given no object, When a stream of it is opened, Then it fails at once, before any read
    with pytest.raises(FileNotFoundError):
        store.read_stream("shards/missing.tar")
    store.write_bytes("file", b"x")
    with pytest.raises(FileNotFoundError):
        store.read_stream("file/below")
    with pytest.raises(ValueError):
        store.read_stream("../escape")


def test_deleting_the_last_object_under_a_prefix_leaves_no_empty_folder(store, tmp_path):
    store.write_bytes("keep.txt", b"x")
    store.write_bytes("deep/er/probe", b"")
    store.delete("deep/er/probe")
    assert list(store.list()) == ["keep.txt"]
    if isinstance(store, LocalStore):  # the same as S3, where a prefix without keys does not exist
        assert sorted(os.listdir(store.url)) == ["keep.txt"]


def test_an_object_url_splits_into_its_store_and_key(store):
    store.write_bytes("a/b.png", b"image")
    assert URLReader().read(store.url_for("a/b.png")) == b"image"
    root, key = split_object_url(store.url_for("a/b.png"))
    assert key == "b.png" and open_store(root).read_bytes(key) == b"image"
    with pytest.raises(ValueError, match="does not name an object"):
        split_object_url("s3://bucket/folder/")


def test_a_local_root_that_is_missing_or_a_file_is_named(tmp_path):
    LocalStore(str(tmp_path)).check_root()
    with pytest.raises(FileNotFoundError):
        LocalStore(str(tmp_path / "missing")).check_root()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        LocalStore(str(tmp_path / "file")).check_root()


@pytest.fixture
def filled(store) -> ObjectStore:
    for key in reversed(KEYS):
        store.write_bytes(key, key.encode())
    return store


def test_list_returns_exactly_the_written_keys_sorted(filled):
    assert list(filled.list()) == sorted(KEYS)


def test_list_is_a_lazy_generator(filled):
    keys = filled.list()
    assert isinstance(keys, types.GeneratorType)
    assert next(keys) == "a-b"


@pytest.mark.parametrize("prefix, expected", [
    ("b/", ["b/x.jpg", "b/y.jpg"]),
    ("b", ["b/x.jpg", "b/y.jpg", "ba/z.jpg"]),
    ("a/d", ["a/d/e"]),
    ("b/x", ["b/x.jpg"]),
    ("b/x.jpg", ["b/x.jpg"]),
    ("nothing/", []),
    ("nothing", []),
])
def test_list_returns_only_keys_under_prefix(filled, prefix, expected):
    assert list(filled.list(prefix)) == expected


def test_list_of_empty_or_missing_root_yields_nothing(store):
    assert list(store.list()) == []


def test_list_skips_directory_placeholders(store):
    store.write_bytes("real.jpg", b"x")
    if is_s3(store):  # an S3 "folder" created by a console: a key ending in "/"
        bucket, _, root = store.url.removeprefix("s3://").partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=root + "folder/", Body=b"")
    else:
        os.makedirs(os.path.join(store.url, "folder", "empty"))
    assert list(store.list()) == ["real.jpg"]


def test_list_of_more_than_1000_keys_returns_them_all(store):
    # Given more keys than fit in one S3 listing page
    keys = [f"many/{i:05d}.png" for i in range(1100)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda key: store.write_bytes(key, b"."), keys))
    # When listed, Then every key comes back, in order
    assert list(store.list("many/")) == keys
    # and a listing resumed after a key of the first page goes on across pages
    assert list(store.list("many/", start_after=keys[998])) == keys[999:]


def test_list_entries_give_each_object_its_size_time_and_etag(store):
    # Given objects written in two rounds, the second a second later
    before = time.time()
    store.write_bytes("old/a.jpg", b"a" * 10)
    store.write_bytes("old/b.jpg", b"b" * 20)
    time.sleep(1.1)
    store.write_bytes("new/c.jpg", b"c" * 30)
    after = time.time()
    # When listed with their details
    entries = list(store.list_entries())
    # Then the keys are those of list(), each with its size and a modification time in order
    assert entries == list(store.list()) == ["new/c.jpg", "old/a.jpg", "old/b.jpg"]
    assert [entry.size for entry in entries] == [30, 10, 20]
    by_key = {str(entry): entry for entry in entries}
    assert before - 1 <= by_key["old/a.jpg"].modified < by_key["new/c.jpg"].modified <= after + 1
    # and on S3 the ETag the same object's GET answers with
    for entry in entries:
        _, etag = store.read_object(entry)
        assert entry.etag == etag and (etag is not None) == is_s3(store)
    # and a listing after a key, under a prefix, keeps the details
    [only] = store.list_entries("old/", start_after="old/a.jpg")
    assert (only, only.size) == ("old/b.jpg", 20)


AFTERS = ["", "0", "a", "a-b", "a/", "a/c", "a/d", "a/d/", "a/d/e", "a/d/f", "a0", "b",
          "b/", "b/x", "b/y.jpg", "ba", "ba/z.jpg", "c", "z", "zz"]


def test_list_after_a_key_yields_only_greater_keys(filled):
    for after in AFTERS:
        expected = [key for key in sorted(KEYS) if key > after]
        assert (after, list(filled.list(start_after=after))) == (after, expected)


def test_list_after_a_key_under_a_prefix(filled):
    for prefix in ["a", "a/", "a/d", "b", "b/", "ba/", "nothing/"]:
        for after in ["a", "a/c", "a/d/e", "b", "b/x.jpg", "ba", "z"]:
            expected = [key for key in sorted(KEYS) if key.startswith(prefix) and key > after]
            assert (prefix, after, list(filled.list(prefix, start_after=after))) == (prefix, after, expected)


def test_list_after_none_lists_everything(filled):
    assert list(filled.list(start_after=None)) == sorted(KEYS)


def test_list_after_a_non_str_is_rejected_at_call_time(store):
    with pytest.raises(TypeError, match="start_after"):
        store.list(start_after=b"a")


# --- listing a tree: S3 lists sub-prefixes side by side and merges them back in key order ----

#: Direct keys beside sub-prefixes that sort around them ("a-b.jpg" < "a.jpg" < "a/..." < "a0.jpg"),
#: deeper levels, a level of one sub-prefix, 40 small sub-prefixes, and 2 sub-prefixes of more
#: than one S3 page (1,000 keys) each.
TREE = sorted(["a-b.jpg", "a.jpg", "a/c.jpg", "a/d-e.jpg", "a/d/e.jpg", "a/d/f/g.jpg", "a0.jpg", "a0/x.jpg", "b.jpg",
               "b/x.jpg", "ba/z.jpg", "deep/1/2/3/4.jpg", "one/only/x/1.jpg", "one/only/x/2.jpg", "z"]
              + [f"u/{user:03d}/p.jpg" for user in range(40)]
              + [f"big/{shard}/{n:04d}.png" for shard in range(2) for n in range(1001)])
#: start_after before, between and inside sub-prefixes (also deep inside, and a sub-prefix
#: itself), at page boundaries, and past the end; the whole tree is listed after fewer of them
#: (on moto, each listing of it takes about a second).
AFTERS_UNDER = ["a-b.jpg", "a/", "a/d", "a/d-", "a/d/", "a/d/f/g.jpg", "a0", "big/", "big/0/0999.png", "big/0/1000.png",
                "big/1", "big/1/", "u/020/", "u/020/p.jpg", "one/only/x/1.jpg", "zz"]
AFTERS_ALL = ["a/d", "a0", "big/0/0999.png", "big/1", "u/020/", "one/only/x/1.jpg", "zz"]


@pytest.fixture(scope="module", params=["local", "s3"])
def tree(request, tmp_path_factory) -> ObjectStore:
    """A store holding TREE, written once for the module (S3: its own bucket on moto)."""
    if request.param == "local":
        store = open_store(tmp_path_factory.mktemp("tree"))
    else:
        request.getfixturevalue("s3_env")
        bucket = f"tree-{uuid.uuid4().hex[:16]}"
        boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
        store = open_store(f"s3://{bucket}/{S3_ROOT}")
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda key: store.write_bytes(key, b"."), TREE))
    return store


def listed(store: ObjectStore, prefix: str = "", after: str = "") -> tuple:
    """What ``store`` lists under ``prefix`` after ``after``, labelled for an assertion's message."""
    return getattr(store, "list_concurrency", "local"), prefix, after, list(store.list(prefix, start_after=after))


def under(prefix: str, after: str) -> list[str]:
    return [key for key in TREE if key.startswith(prefix) and key > after]


def test_list_of_a_tree_is_in_key_order_from_any_start(tree):
    # (on S3, also one page after another and two requests at a time, after fewer bounds)
    for store, afters in [(tree, ["", *AFTERS_ALL]), *(
            (open_store(tree.url, list_concurrency=concurrency), ["", "a/d", "big/0/0999.png", "u/020/"])
            for concurrency in (1, 2) if is_s3(tree))]:
        for after in afters:
            label = getattr(store, "list_concurrency", "local")
            assert listed(store, "", after) == (label, "", after, under("", after))


@pytest.mark.parametrize("prefix", ["a", "a/", "big/", "big/1/", "one/", "u/", "u/01"])
def test_list_of_a_tree_under_a_prefix_from_any_start(tree, prefix):
    label = getattr(tree, "list_concurrency", "local")
    for after in ["", *(after for after in AFTERS_UNDER if after[:1] == prefix[:1])]:
        assert listed(tree, prefix, after) == (label, prefix, after, under(prefix, after))


def test_s3_listing_requests_overlap(s3_bucket, moto_server, monkeypatch):
    # Given keys under several sub-prefixes, and S3 behind a proxy that holds every request 0.2 s
    store = open_store(f"s3://{s3_bucket}/{S3_ROOT}")
    keys = [f"shard{shard}/{n:02d}.jpg" for shard in range(6) for n in range(20)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: store.write_bytes(key, b"."), keys))
    for concurrency, overlapped in ((None, True), (1, False)):
        with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0, delay_s=0.2) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
            options = {} if concurrency is None else {"list_concurrency": concurrency}
            # When they are listed, Then they come back in order, with requests in flight
            # together (side by side, the default) or one at a time (list_concurrency=1)
            assert list(open_store(store.url, **options).list()) == keys
            assert (proxy.max_in_flight > 1) is overlapped, vars(proxy)


def test_s3_list_concurrency_below_one_is_rejected():
    with pytest.raises(ValueError, match="list_concurrency"):
        open_store("s3://b/p", list_concurrency=0)


@contextlib.contextmanager
def scanned_directories():
    """Collect the paths os.scandir opens meanwhile (seen through an audit hook, not a mock)."""
    _hook_scandir()
    scanned: list[str] = []
    _SCANDIR_LOGS.append(scanned)
    try:
        yield scanned
    finally:
        _SCANDIR_LOGS.remove(scanned)


_SCANDIR_LOGS: list[list[str]] = []


@functools.cache
def _hook_scandir() -> None:
    """Add the audit hook (once: hooks cannot be removed) that feeds scanned_directories."""
    def audit(event: str, args: tuple) -> None:
        if event == "os.scandir" and _SCANDIR_LOGS:
            _SCANDIR_LOGS[-1].append(os.fsdecode(args[0]))

    sys.addaudithook(audit)


def test_local_list_after_a_key_does_not_open_the_directories_before_it(tmp_path):
    # Given a tree a/0..2/f, b/0..2/f, c/0..2/f
    store = open_store(tmp_path)
    keys = [f"{top}/{sub}/f" for top in "abc" for sub in "012"]
    for key in keys:
        store.write_bytes(key, b".")
    # When the listing is resumed after b/1/f
    with scanned_directories() as scanned:
        listed = list(store.list(start_after="b/1/f"))
    # Then the keys after it come back, reading only the directories on its path and after it
    assert listed == keys[5:]
    opened = {os.path.relpath(path, tmp_path) for path in scanned}
    assert opened == {".", "b", "b/1", "b/2", "c", "c/0", "c/1", "c/2"}


FILE_NAMES = ["m", "a-b", "a.txt", "x\ny", "\u00e9t\u00e9", "a0", "z", "_", "B", "0", "a b", "\u65e5\u672c"]
DIR_NAMES = ["a", "x", "\u00e9", "Z\nq"]


def test_local_list_of_a_directory_larger_than_memory_runs_is_merged_in_order(tmp_path):
    # Given a directory of files and folders with awkward names, listed by a store
    # that sorts at most 2 names in memory before spilling them to a temporary file
    keys = [f"d/{name}" for name in FILE_NAMES] + [f"d/{name}/in" for name in DIR_NAMES]
    in_memory = open_store(tmp_path)
    for key in keys:
        in_memory.write_bytes(key, b".")
    spilling = open_store(tmp_path, spill_names=2)
    # When listed, whole and resumed, Then the order is the same as sorting in memory
    assert list(spilling.list()) == sorted(keys) == list(in_memory.list())
    for after in sorted(keys)[::3]:
        assert list(spilling.list("d/", start_after=after)) == [k for k in sorted(keys) if k > after]


def test_local_list_does_not_show_temporary_files(tmp_path):
    store = open_store(tmp_path)
    store.write_bytes("a/b", b"x")
    assert os.listdir(tmp_path / "a") == ["b"]
    (tmp_path / "a" / ".clipmask-tmp-inflight").write_bytes(b"partial")
    assert list(store.list()) == ["a/b"]


# --- streaming writes ------------------------------------------------------

STREAM_SIZE = 11 * 1024 * 1024  # more than one S3 part of 8 MiB (and two of 5 MiB)


def stream_data(size: int = STREAM_SIZE) -> bytes:
    return random.Random(size).randbytes(size)


def in_chunks(data: bytes, size: int = 100_003):
    """Yield ``data`` in chunks that do not line up with any part boundary."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_stream_of_many_chunks_round_trips(store):
    # Given 11 MiB arriving in ~100 KB chunks
    data = stream_data()
    # When they are written as a stream, Then its size is returned and the object reads back whole
    assert store.write_stream("big/stream.bin", in_chunks(data)) == len(data)
    assert store.read_bytes("big/stream.bin") == data
    assert list(store.list("big/")) == ["big/stream.bin"]


def test_small_stream_round_trips(store):
    assert store.write_stream("s.txt", [b"he", bytearray(b"ll"), memoryview(b"o")]) == 5
    assert store.read_bytes("s.txt") == b"hello"


def test_empty_stream_writes_an_empty_object(store):
    assert store.write_stream("empty", iter(())) == 0
    assert store.exists("empty") and store.read_bytes("empty") == b""


def failing_stream(data: bytes):
    """Yield ``data`` in chunks, then fail as a producer would."""
    yield from in_chunks(data)
    raise RuntimeError("producer failed")


def test_stream_that_fails_midway_leaves_the_old_object(store):
    # Given an existing object
    store.write_bytes("a/obj", b"old")
    # When a stream that fails after more than one part is written over it
    with pytest.raises(RuntimeError, match="producer failed"):
        store.write_stream("a/obj", failing_stream(stream_data(9 * 1024 * 1024)))
    # Then the error is the producer's and the old object is intact, with nothing left over
    assert store.read_bytes("a/obj") == b"old"
    assert list(store.list()) == ["a/obj"]
    if is_s3(store):
        assert pending_uploads(store) == []
    else:
        assert os.listdir(os.path.join(store.url, "a")) == ["obj"]


def test_stream_that_fails_at_once_writes_nothing(store):
    with pytest.raises(RuntimeError, match="producer failed"):
        store.write_stream("new", failing_stream(b""))
    assert not store.exists("new")


def test_stream_of_non_bytes_is_rejected(store):
    with pytest.raises(TypeError, match="bytes-like"):
        store.write_stream("k", [b"ok", "text"])
    with pytest.raises(TypeError, match="iterable of bytes"):
        store.write_stream("k", b"a whole payload")
    assert list(store.list()) == []


def pending_uploads(store: ObjectStore) -> list[str]:
    bucket, _, root = store.url.removeprefix("s3://").partition("/")
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=root)
    return [upload["Key"] for upload in uploads.get("Uploads", [])]


def etag(store: ObjectStore, key: str) -> str:
    bucket, _, root = store.url.removeprefix("s3://").partition("/")
    return boto3.client("s3").head_object(Bucket=bucket, Key=root + key)["ETag"]


def test_s3_stream_is_a_multipart_upload_of_part_size_parts(s3_bucket):
    # Given a store with S3's smallest part size
    store = open_store(f"s3://{s3_bucket}/{S3_ROOT}", part_size=MIN_PART_SIZE)
    # When 11 MiB are streamed, Then they are sent as 3 parts (the ETag counts them)
    store.write_stream("big", in_chunks(stream_data()), content_type="application/x-ndjson")
    assert etag(store, "big").endswith('-3"')
    assert store.read_bytes("big") == stream_data()
    assert pending_uploads(store) == []
    # and the content type is the object's
    bucket = store.url.removeprefix("s3://").split("/")[0]
    head = boto3.client("s3").head_object(Bucket=bucket, Key=S3_ROOT + "big")
    assert head["ContentType"] == "application/x-ndjson"


def test_s3_stream_of_at_most_one_part_is_a_single_put(s3_bucket):
    store = open_store(f"s3://{s3_bucket}/{S3_ROOT}", part_size=MIN_PART_SIZE)
    store.write_stream("one", in_chunks(stream_data(MIN_PART_SIZE)))
    assert "-" not in etag(store, "one")
    assert store.read_bytes("one") == stream_data(MIN_PART_SIZE)


@pytest.mark.parametrize("part_size", [MIN_PART_SIZE - 1, 5 * 1024 ** 3 + 1])
def test_s3_part_size_outside_s3_limits_is_rejected(part_size):
    with pytest.raises(ValueError, match="part_size"):
        open_store("s3://b/p", part_size=part_size)


# --- keys and URLs ---------------------------------------------------------

BAD_KEYS = ["", "/abs", "../x", "a/../../x", "a/./b", "a//b", "dir/"]
METHODS = {
    "read_bytes": lambda s, k: s.read_bytes(k),
    "write_bytes": lambda s, k: s.write_bytes(k, b"x"),
    "exists": lambda s, k: s.exists(k),
    "url_for": lambda s, k: s.url_for(k),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected(store, method, key):
    with pytest.raises(ValueError, match="key"):
        METHODS[method](store, key)


def test_error_message_says_what_is_wrong(store):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        store.read_bytes("../x")
    with pytest.raises(ValueError, match="absolute"):
        store.read_bytes("/etc/passwd")
    with pytest.raises(ValueError, match="empty"):
        store.read_bytes("")


@pytest.mark.parametrize("prefix", ["/abs", "../x", "a/../b"])
def test_invalid_list_prefix_is_rejected_at_call_time(store, prefix):
    with pytest.raises(ValueError):
        store.list(prefix)


def test_local_store_cannot_escape_its_root(tmp_path):
    store = open_store(tmp_path / "root")
    with pytest.raises(ValueError):
        store.write_bytes("../escaped", b"x")
    assert not (tmp_path / "escaped").exists()


def test_url_for_returns_full_location(store):
    if is_s3(store):
        assert store.url.endswith(f"/{S3_ROOT}")
        assert store.url_for("a/b.jpg") == store.url + "a/b.jpg"
    else:
        assert os.path.isabs(store.url)
        assert store.url_for("a/b.jpg") == os.path.join(store.url, "a", "b.jpg")


def test_store_reopened_from_its_url_sees_the_same_objects(store):
    store.write_bytes("k", b"v")
    assert open_store(store.url).read_bytes("k") == b"v"


@pytest.mark.parametrize("url, expected", [
    ("s3://b", StoreURL("s3", "b", "")),
    ("s3://b/", StoreURL("s3", "b", "")),
    ("s3://b/p", StoreURL("s3", "b", "p/")),
    ("s3://b/p/", StoreURL("s3", "b", "p/")),
    ("s3://b/p/q", StoreURL("s3", "b", "p/q/")),
    ("/abs/dir", StoreURL("file", None, "/abs/dir")),
    ("/abs/dir/", StoreURL("file", None, "/abs/dir")),
    ("file:///abs/dir", StoreURL("file", None, "/abs/dir")),
    ("file://localhost/abs/dir", StoreURL("file", None, "/abs/dir")),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


def test_parse_url_resolves_relative_path_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_url("rel/dir") == StoreURL("file", None, str(tmp_path / "rel" / "dir"))
    assert open_store("rel/dir").url == str(tmp_path / "rel" / "dir")


@pytest.mark.parametrize("url, message", [
    ("gs://x", "s3://bucket/prefix or a local path"),
    ("http://host/x", "s3://bucket/prefix or a local path"),
    ("s3://", "no bucket"),
    ("s3:///prefix", "no bucket"),
    ("s3://b/a/../c", r"'\.\.'"),
    ("", "empty"),
    ("file://otherhost/x", "host"),
])
def test_parse_url_rejects_unsupported_urls(url, message):
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_store_url_is_canonical():
    assert open_store("s3://b/p").url == "s3://b/p/"
    assert open_store("s3://b").url == "s3://b/"
    assert parse_url("s3://b/p").url == "s3://b/p/"


# --- S3 failures -----------------------------------------------------------


def test_s3_missing_bucket_is_not_found(s3_env):
    store = open_store("s3://no-such-bucket-clipmask/prefix")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-clipmask") as info:
        list(store.list())
    assert isinstance(info.value.__cause__, ClientError)
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        store.read_bytes("k")
    assert store.exists("k") is False


def test_s3_content_type_is_stored(s3_store):
    s3_store.write_bytes("m.png", b"\x89PNG", content_type="image/png")
    bucket = s3_store.url.removeprefix("s3://").split("/")[0]
    head = boto3.client("s3").head_object(Bucket=bucket, Key=S3_ROOT + "m.png")
    assert head["ContentType"] == "image/png"


def test_s3_store_shared_by_threads_and_pickled(s3_store):
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: s3_store.write_bytes(f"t/{i}", b"x"), range(16)))
    clone = pickle.loads(pickle.dumps(s3_store))
    assert clone.url == s3_store.url
    assert len(list(clone.list("t/"))) == 16


def test_s3_unreachable_endpoint_raises_transient_connection_error(s3_env, monkeypatch):
    # Given an endpoint where nothing listens
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    store = open_store("s3://bucket/prefix", max_attempts=1)
    # When it is used, Then a ConnectionError the callers will retry is raised
    with pytest.raises(ConnectionError) as info:
        store.read_bytes("k")
    assert is_transient(info.value)
    assert isinstance(info.value.__cause__, OBSTORE_ERRORS)
    # And so is a listing (boto3's request)
    with pytest.raises(ConnectionError) as info:
        list(store.list())
    assert isinstance(info.value.__cause__, EndpointConnectionError)


@pytest.fixture(scope="module")
def auth_moto(tmp_path_factory):
    """A second moto server that checks credentials (IAM auth enabled)."""
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with MotoServer(env=env, workdir=str(tmp_path_factory.mktemp("moto-auth"))).start() as server:
        yield server


def test_s3_unknown_credentials_raise_permission_error(s3_env, auth_moto, monkeypatch):
    # Given an S3 service that does not know our access key
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", auth_moto.endpoint)
    store = open_store("s3://bucket/prefix")
    # When it is used, Then PermissionError (not transient) is raised
    for use in (lambda: store.read_bytes("k"), lambda: list(store.list()),
                lambda: store.write_bytes("k", b"x"), lambda: store.exists("k")):
        with pytest.raises(PermissionError) as info:
            use()
        assert not is_transient(info.value)
        assert isinstance(info.value.__cause__, (ClientError, *OBSTORE_ERRORS))


@pytest.mark.parametrize("error", [
    ProtocolError("Connection broken: IncompleteRead(5 bytes read, 5 more expected)"),
    ReadTimeoutError(None, "/k", "Read timed out."),
    ResponseStreamingError(error="Connection broken"),
], ids=["urllib3-protocol", "urllib3-read-timeout", "botocore-streaming"])
def test_cut_response_streams_translate_to_transient_connection_error(error):
    translated = translate_s3_error(error, "s3://b/k")
    assert isinstance(translated, ConnectionError) and is_transient(translated)
    assert "s3://b/k" in str(translated)


@pytest.mark.parametrize(("text", "kind"), [
    ("Generic S3 error: Error performing PUT http://h/b/k in 3ms, after 4 retries - Server returned non-2xx "
     "status code: 503 Service Unavailable: <?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
     "<Message>Please reduce your request rate.</Message></Error>\n\nDebug source:\nGeneric {}", ConnectionError),
    ("Generic S3 error: ... status code: 429 Too Many Requests: ", ConnectionError),
    ("Generic S3 error: HTTP error: request or response body error", ConnectionError),
    ("Generic S3 error: ... status code: 403 Forbidden: <Error><Code>AccessDenied</Code></Error>", PermissionError),
    ("Generic S3 error: ... status code: 400 Bad Request: <Error><Code>InvalidArgument</Code></Error>",
     StorageError),
], ids=["503", "429", "cut-or-unreachable", "403", "400"])
def test_obstore_errors_translate_by_their_status(text, kind):
    translated = translate_obstore_error(GenericError(text), "s3://b/k")
    assert type(translated) is kind and is_transient(translated) == (kind is ConnectionError)
    assert "s3://b/k" in str(translated) and "Debug source" not in str(translated)


def test_storage_error_is_an_oserror():
    assert issubclass(StorageError, OSError)
    assert not is_transient(StorageError("x"))
    assert is_transient(ConnectionError("x")) and is_transient(TimeoutError("x"))
