"""Contract of storage.ObjectStore: every backend must pass every test here.

The `store` fixture yields (a) a local store on tmp_path and (b) an S3 store
on s3://<fresh bucket>/root/prefix/ served by a real moto HTTP server.
"""

from __future__ import annotations

import os
import pickle
import types
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from storage import (
    ObjectStore, StorageError, StoreURL, is_transient, open_store, parse_url,
)
from tests.services import MotoServer, free_port

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
    # Then the error names the key's URL, and S3 keeps boto's error as cause
    assert store.url_for("missing/key.jpg") in str(info.value)
    if is_s3(store):
        assert isinstance(info.value.__cause__, ClientError)


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


# --- listing ---------------------------------------------------------------

KEYS = ["a-b", "a/c", "a/d/e", "a0", "b/x.jpg", "b/y.jpg", "ba/z.jpg", "z"]


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


def test_local_list_does_not_show_temporary_files(tmp_path):
    store = open_store(tmp_path)
    store.write_bytes("a/b", b"x")
    assert os.listdir(tmp_path / "a") == ["b"]
    (tmp_path / "a" / ".clipmask-tmp-inflight").write_bytes(b"partial")
    assert list(store.list()) == ["a/b"]


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
    with pytest.raises(FileNotFoundError):
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
        assert isinstance(info.value.__cause__, ClientError)


def test_storage_error_is_an_oserror():
    assert issubclass(StorageError, OSError)
    assert not is_transient(StorageError("x"))
    assert is_transient(ConnectionError("x")) and is_transient(TimeoutError("x"))
