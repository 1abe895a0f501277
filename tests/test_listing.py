"""storage/listing.py: S3 listings side by side, merged back into S3's key order.

Against an in-memory ListObjectsV2 (``tests/listing_fake.py``) with pages of a few keys, so that
every path (pages, nested levels, grouped sub-prefixes, start-after anywhere) is taken in
milliseconds; ``tests/test_storage_contract.py`` runs the same listing against moto's S3 server.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import boto3
import pytest

from storage import listing
from storage.listing import Page, _parse_tree, _scan, level_start, parallel_keys, sequential_keys
from tests.listing_fake import FakeS3

NAMES = ["a", "a-b", "a.b", "a0", "a b", "b", "ab", "z", "\u00e9", "0", "_"]


def random_keys(rng: random.Random, count: int) -> list[str]:
    """Keys one to four levels deep over names that sort around "/" ("-", ".", "0"), some of
    them directory placeholders ending in "/"."""
    keys = set()
    while len(keys) < count:
        depth = rng.choice([1, 1, 2, 2, 3, 4])
        key = "/".join(rng.choice(NAMES) for _ in range(depth))
        keys.add(key + "/" if rng.random() < 0.05 else key)
    return sorted(keys)


def expected(keys: list[str], prefix: str, after: str) -> list[str]:
    return [key for key in sorted(keys) if key.startswith(prefix) and key > after and not key.endswith("/")]


def bounds(keys: list[str], rng: random.Random) -> list[str]:
    """start-after values: none, keys, sub-prefixes (with and without "/"), strings between."""
    picks = ["", "a", "a/", "a-", "a/a/", "a/a", "b/", "zz", "\U0010ffff"]
    for key in rng.sample(keys, min(12, len(keys))):
        cut = rng.randint(1, len(key))
        picks += [key, key[:cut], key + "!", key.rsplit("/", 1)[0] + "/"]
    return picks


@pytest.mark.parametrize("seed", range(12))
def test_parallel_listing_equals_the_sorted_keys_whatever_the_layout(seed):
    # Given random nested keys served in pages of 2 to 5 entries
    rng = random.Random(seed)
    keys = random_keys(rng, rng.choice([30, 120, 400]))
    fake = FakeS3(keys, page_size=rng.randint(2, 5), prefix_after_start=bool(seed % 2))
    # When listed side by side under prefixes and after bounds, Then the keys come back as
    # the sorted list says, and as the sequential listing gives them
    for prefix in ["", "a", "a/", "a/a/", "b", "\u00e9/", "nothing/"]:
        for after in bounds(keys, rng):
            for concurrency in (2, 3, 16):
                listed = list(parallel_keys(fake.fetch, prefix, after, concurrency))
                assert listed == expected(keys, prefix, after), (prefix, after, concurrency)
            assert list(sequential_keys(fake.fetch, prefix, after)) == expected(keys, prefix, after)


def test_many_small_sub_prefixes_are_listed_together():
    # Given 300 sub-prefixes of 2 keys each, listed 1000 entries a page
    keys = [f"u/{user:04d}/{n}.jpg" for user in range(300) for n in range(2)]
    fake = FakeS3(keys)
    # When listed with 4 requests at a time, Then every key comes back in order, with far fewer
    # requests than one per sub-prefix: once the first ranges held 2 keys each, consecutive
    # sub-prefixes are listed as one range
    assert list(parallel_keys(fake.fetch, "u/", "", 4)) == keys
    assert len(fake.requests) < 60, len(fake.requests)
    grouped = [request for request in fake.requests if request[0] == "u/" and not request[3]]
    assert grouped, fake.requests[:20]


def test_a_level_with_few_sub_prefixes_is_split_one_level_further():
    # Given one top folder holding 20 sub-folders
    keys = [f"top/{shard:02d}/{n:03d}" for shard in range(20) for n in range(30)]
    fake = FakeS3(keys, page_size=10)
    # When listed, Then the top folder is listed with the delimiter too, and its sub-folders
    # each by a range of their own
    assert list(parallel_keys(fake.fetch, "", "", 8)) == keys
    assert ("top/", "", None, True) in fake.requests
    assert ("top/07/", "top/07/", None, False) in fake.requests


def test_sub_prefixes_are_listed_side_by_side():
    # Given 6 sub-prefixes, the first pages of the 3rd and 4th answered only once both are
    # asked for together (one at a time, each waits 5 s, and max_in_flight says so)
    keys = [f"s/{shard}/{n:02d}" for shard in range(6) for n in range(40)]
    fake = FakeS3(keys, page_size=10)
    fake.hold({"s/2/", "s/3/"})
    # When listed with 4 requests at a time, Then requests overlapped
    assert list(parallel_keys(fake.fetch, "s/", "", 4)) == keys
    assert fake.max_in_flight > 1
    # and one at a time, they did not
    alone = FakeS3(keys, page_size=10)
    assert list(parallel_keys(alone.fetch, "s/", "", 1)) == keys
    assert alone.max_in_flight == 1


def test_reading_one_key_sends_only_the_requests_it_needs():
    # Given many sub-prefixes (as _jobs/ holds one per job)
    keys = [f"_jobs/{job:03d}/plan/{n}.json" for job in range(50) for n in range(3)]
    fake = FakeS3(keys)
    # When the first key is read and the listing closed, Then two requests were sent: the level
    # and the first sub-prefix
    listing = parallel_keys(fake.fetch, "_jobs/", "", 16)
    assert next(listing) == keys[0]
    listing.close()
    assert [request[:2] for request in fake.requests] == [("_jobs/", ""), ("_jobs/000/", "_jobs/000/")]


def test_an_error_comes_after_the_keys_before_it():
    # Given a listing whose third sub-prefix cannot be listed
    keys = [f"d/{shard}/{n}" for shard in range(5) for n in range(4)]
    fake = FakeS3(keys, page_size=3)
    fake.fail["d/2/"] = PermissionError("denied")
    listing = parallel_keys(fake.fetch, "d/", "", 4)
    # When listed, Then the keys before it come out in order, then its error
    listed = []
    with pytest.raises(PermissionError, match="denied"):
        for key in listing:
            listed.append(key)  # noqa: PERF402 - the keys read before the error
    assert listed == keys[:8]


def test_an_error_of_a_level_comes_in_turn_too():
    keys = ["x/a", "x/b/1", "x/b/2", "y/1"]
    fake = FakeS3(keys, page_size=2)
    fake.fail["x/b/"] = ConnectionError("cut")  # x/ has one sub-prefix: listed with the delimiter
    listed = []
    with pytest.raises(ConnectionError):
        for key in parallel_keys(fake.fetch, "", "", 4):
            listed.append(key)  # noqa: PERF402 - the keys read before the error
    assert listed == ["x/a"]


@pytest.mark.parametrize("prefix, after, start", [
    ("p/", "", ""), ("p/", "a", ""), ("p/", "q", None), ("p/", "p/", "p/"), ("p/", "p/x", "p/x"),
    ("p/", "p/a/b/c", "p/a"), ("p/", "p/a/", "p/a"), ("", "a/b", "a"), ("p", "p/x", "p"),
])
def test_a_level_starts_where_its_keys_after_start_after_begin(prefix, after, start):
    assert level_start(prefix, after) == start


S3_ANSWER = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    "<Name>b</Name><Prefix>p%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>2</MaxKeys><Delimiter>%2F</Delimiter>"
    "<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
    "<Contents><Key>p%2Fa+b%26c.jpg</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
    "<ETag>&quot;x&quot;</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass></Contents>"
    "<Contents><Key>p%2F%C3%A9%01.jpg</Key><Size>1</Size></Contents>"
    "<CommonPrefixes><Prefix>p%2Fsub%2F</Prefix></CommonPrefixes>"
    "<NextContinuationToken>1x/Y+z==</NextContinuationToken></ListBucketResult>")
PLAIN_ANSWER = (
    "<ListBucketResult><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><IsTruncated>false</IsTruncated>"
    "<Contents><Key>p/a&amp;b&lt;c&gt;.jpg</Key></Contents>\n  <CommonPrefixes>\n    <Prefix>p/s &amp; t/</Prefix>\n"
    "  </CommonPrefixes></ListBucketResult>")


@pytest.mark.parametrize("answer, page", [
    (S3_ANSWER, Page(["p/a b&c.jpg", "p/\u00e9\x01.jpg"], ["p/sub/"], "1x/Y+z==")),
    (PLAIN_ANSWER, Page(["p/a&b<c>.jpg"], ["p/s & t/"], None)),
], ids=["s3-url-encoded", "escaped"])
def test_a_page_is_read_as_botocore_reads_it(answer, page):
    assert _scan(answer) == page
    assert _parse_tree(answer.encode()) == page


@pytest.mark.parametrize("answer", [
    S3_ANSWER.replace("<KeyCount>3</KeyCount>", "<KeyCount>4</KeyCount>"),  # a key the expressions missed
    PLAIN_ANSWER.replace("<Key>p/a&amp;b&lt;c&gt;.jpg</Key>", "<Key><![CDATA[p/a&b<c>.jpg]]></Key>"),
    PLAIN_ANSWER.replace("<Key>", "<s3:Key>").replace("</Key>", "</s3:Key>"),
    "<Error><Code>InternalError</Code></Error>",
], ids=["key-count", "cdata", "namespace-prefix", "error"])
def test_an_answer_not_written_as_s3_writes_it_is_left_to_a_full_parser(answer):
    assert _scan(answer) is None


#: An answer cut short by the network, whose keys say nothing amiss (no KeyCount to count them by).
CUT_SHORT = S3_ANSWER.replace("<KeyCount>3</KeyCount>", "").partition("<CommonPrefixes>")[0]


def test_a_page_cut_short_is_left_to_a_full_parser_which_fails_on_it():
    cut = CUT_SHORT
    assert cut.endswith("</Contents>")
    assert _scan(cut) is None
    with pytest.raises(ET.ParseError):
        _parse_tree(cut.encode())


DETAILED_ANSWER = (
    "<ListBucketResult><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><IsTruncated>false</IsTruncated>"
    "<Contents><Key>p/a.jpg</Key><LastModified>2026-12-05T08:00:01.500Z</LastModified>"
    "<ETag>&quot;abc&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>"
    "<Contents><Key>p/b&amp;c.jpg</Key><LastModified>2026-12-05T08:00:00.000Z</LastModified>"
    "<ETag>&quot;def&quot;</ETag><Size>0</Size></Contents></ListBucketResult>")


def test_a_detailed_page_gives_each_key_its_size_time_and_etag_either_way():
    for page in (_scan(DETAILED_ANSWER, detailed=True), _parse_tree(DETAILED_ANSWER.encode(), detailed=True)):
        assert page.keys == ["p/a.jpg", "p/b&c.jpg"]
        assert [(key.size, key.etag) for key in page.keys] == [(12, '"abc"'), (0, '"def"')]
        assert page.keys[0].modified - page.keys[1].modified == 1.5
        assert page.keys[1].modified == datetime(2026, 12, 5, 8, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("body, status, parsed", [
    (S3_ANSWER.encode(), 200, True),
    (b"<Error><Code>InternalError</Code><Message>try again</Message></Error>", 500, False),
    (CUT_SHORT.encode(), 500, False),
], ids=["listing", "error-in-a-200", "cut-short"])
def test_botocore_still_checks_a_200_answer_that_is_not_a_whole_listing(body, status, parsed):
    # botocore's own check for an error in a 200 answer, with the page read first
    client = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9")
    listing._install(client)
    operation = client.meta.service_model.operation_model("ListObjectsV2")
    response = {"status_code": 200, "body": body, "headers": {}}
    listing._local.active, listing._local.detailed, listing._local.page = True, False, None
    try:
        client.meta.events.emit("before-parse.s3.ListObjectsV2", operation_model=operation, response_dict=response,
                                customized_response_dict={})
    finally:
        listing._local.active = False
    assert response["status_code"] == status  # 500: botocore retries it
    assert (listing._local.page is not None) == parsed
