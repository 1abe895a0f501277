"""A light S3 server for the benchmarks only: objects in memory, one asyncio loop, and a set round
trip added to every request, as real S3 has tens to hundreds of milliseconds of it.

moto, which the tests use, serves each request in Python at several milliseconds of CPU, so on a
2-core machine it is itself the bottleneck of any benchmark that asks it thousands of requests per
second. This server does the least S3 work a client needs (no authentication, no versions, no
checksums of its own), spends its time waiting instead of computing, and counts what it served:
requests by method and the most it had in flight at once.

What it speaks (path-style URLs, what boto3 sends with ``AWS_ENDPOINT_URL_S3``): create a bucket;
PUT, GET, HEAD and DELETE an object; ListObjectsV2 with prefix, start-after, continuation token,
max-keys and delimiter (each object's Key, LastModified, ETag and Size); multipart uploads (create, upload part, complete, abort). Request bodies
may come chunked and aws-chunked (botocore's trailing checksums).

    python bench/s3_lite.py --port 9000 --rtt-ms 30   # then AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000

``GET /_stats`` answers ``{"counts": {method: requests}, "max_in_flight": n}`` (a listing counted as
``LIST``, not ``GET``) (``POST`` also resets
them); ``POST /_fill`` with ``{"bucket": name, "keys": [...]}`` makes the bucket and those keys, empty
and modified now (a later fill replaces them, newer), at once (a benchmark's 10^5 keys in a second, where PUTs one by one would take minutes);
``POST /_rtt`` with ``{"rtt_ms": x}`` sets the round trip from then on (fill at 0, measure at 100);
``POST /_drop`` with ``{"bucket": name}`` drops a bucket and its objects at once. Listing
keeps each bucket's keys sorted between changes and finds its place by bisection, so a page costs
the same anywhere in a large bucket. ``S3Lite(rtt_s).start()`` runs it in a thread instead, for a
quick try; a benchmark runs it as a process of its own (``LiteServer``), so that it takes no GIL
from the client measured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import Counter
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

_LISTING = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{bucket}</Name><Prefix>{prefix}</Prefix>'
            "<KeyCount>{count}</KeyCount><MaxKeys>{max_keys}</MaxKeys><IsTruncated>{truncated}</IsTruncated>"
            "{token}{contents}{prefixes}</ListBucketResult>")


class S3Lite:
    """The server; ``start()`` runs it in a daemon thread on 127.0.0.1 (a free port by default)."""

    def __init__(self, rtt_s: float = 0.0, port: int = 0):
        self.rtt_s, self.port = rtt_s, port
        self.buckets: dict[str, dict[str, tuple[bytes, str, float]]] = {}
        #: Each bucket's keys, sorted, while no key was added or removed since (``_sorted``).
        self._index: dict[str, list[str]] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.counts: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Lite:
        threading.Thread(target=self._run, name="s3-lite", daemon=True).start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def reset_counts(self) -> None:
        self.counts.clear()
        self.max_in_flight = self.in_flight

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                                    backlog=4096, limit=1 << 20))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await _read_body(reader, headers)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.counts["LIST" if method == "GET" and "list-type=" in target else method] += 1
                try:
                    if self.rtt_s:
                        await asyncio.sleep(self.rtt_s)
                    status, out_headers, payload = self._handle(method, target, body)
                finally:
                    self.in_flight -= 1
                head = [f"HTTP/1.1 {status} {'OK' if status < 300 else 'Error'}",
                        f"Content-Length: {len(payload) if method != 'HEAD' else out_headers.pop('Content-Length', 0)}",
                        *(f"{name}: {value}" for name, value in out_headers.items())]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (payload if method != "HEAD" else b""))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, dict, bytes]:
        if target.startswith("/_stats"):  # the benchmark's view, not S3's: counted too, then reset
            stats = {"counts": dict(self.counts), "max_in_flight": self.max_in_flight}
            if method == "POST":
                self.reset_counts()
            return 200, {"Content-Type": "application/json"}, json.dumps(stats).encode()
        if target.startswith("/_rtt"):  # {"rtt_ms": x}: the round trip from now on
            self.rtt_s = json.loads(body)["rtt_ms"] / 1000
            return 200, {}, b""
        if target.startswith("/_drop"):  # {"bucket": name}: the bucket and its objects gone, at once
            self.buckets.pop(json.loads(body)["bucket"], None)
            self._index.pop(json.loads(body)["bucket"], None)
            return 200, {}, b""
        if target.startswith("/_fill"):
            fill = json.loads(body)
            objects = self.buckets.setdefault(fill["bucket"], {})
            empty = (b"", hashlib.md5(b"").hexdigest(), time.time())
            objects.update(dict.fromkeys(fill["keys"], empty))
            self._index.pop(fill["bucket"], None)
            return 200, {}, b""
        parts = urlsplit(target)
        query = {name: values[0] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        if not key:
            if method == "PUT":
                self.buckets.setdefault(bucket, {})
                return 200, {}, b""
            if bucket not in self.buckets:
                return _error(404, "NoSuchBucket")
            return self._list(bucket, query)
        objects = self.buckets.get(bucket)
        if objects is None:
            return _error(404, "NoSuchBucket")
        if method == "POST" and "uploads" in query:
            upload = uuid.uuid4().hex
            self.uploads[upload] = {}
            return 200, {}, f"<InitiateMultipartUploadResult><UploadId>{upload}</UploadId></InitiateMultipartUploadResult>".encode()
        if "uploadId" in query:
            return self._multipart(method, objects, key, query, body)
        if method == "PUT":
            if key not in objects:
                self._index.pop(bucket, None)
            objects[key] = (body, hashlib.md5(body).hexdigest(), time.time())
            return 200, {"ETag": f'"{objects[key][1]}"'}, b""
        if method == "DELETE":
            if objects.pop(key, None) is not None:
                self._index.pop(bucket, None)
            return 204, {}, b""
        if key not in objects:
            return _error(404, "NoSuchKey")
        data, etag, modified = objects[key]
        headers = {"ETag": f'"{etag}"', "Last-Modified": formatdate(modified, usegmt=True)}
        if method == "HEAD":
            return 200, {**headers, "Content-Length": len(data)}, b""
        return 200, headers, data

    def _multipart(self, method: str, objects: dict, key: str, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        parts = self.uploads.get(query["uploadId"])
        if parts is None:
            return _error(404, "NoSuchUpload")
        if method == "PUT":
            parts[int(query["partNumber"])] = body
            return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""
        del self.uploads[query["uploadId"]]
        if method == "POST":
            data = b"".join(parts[number] for number in sorted(parts))
            if key not in objects:
                self._index.clear()
            objects[key] = (data, hashlib.md5(data).hexdigest(), time.time())
            return 200, {}, f"<CompleteMultipartUploadResult><Key>{escape(key)}</Key></CompleteMultipartUploadResult>".encode()
        return 204, {}, b""

    def _sorted(self, bucket: str) -> list[str]:
        keys = self._index.get(bucket)
        if keys is None:
            keys = self._index[bucket] = sorted(self.buckets[bucket])
        return keys

    def _list(self, bucket: str, query: dict) -> tuple[int, dict, bytes]:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        after = max(query.get("start-after", ""), query.get("continuation-token", ""))
        max_keys = int(query.get("max-keys", 1000))
        objects, ordered = self.buckets[bucket], self._sorted(bucket)
        at = max(bisect_left(ordered, prefix), bisect_right(ordered, after))
        keys, prefixes, last = [], [], ""
        while at < len(ordered) and ordered[at].startswith(prefix):
            if len(keys) + len(prefixes) >= max_keys:
                break
            key = ordered[at]
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                # past every key under it: they all sort below its last character's successor
                at = bisect_left(ordered, common[:-1] + chr(ord(common[-1]) + 1), at)
                if common <= after:  # start-after inside it: left out (S3 may differ)
                    continue
                prefixes.append(common)
                last = common + "\uffff"
            else:
                keys.append(key)
                last = key
                at += 1
        truncated = at < len(ordered) and ordered[at].startswith(prefix)
        contents = "".join(f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(objects[k][2])}</LastModified>"
                           f"<ETag>\"{objects[k][1]}\"</ETag><Size>{len(objects[k][0])}</Size></Contents>"
                           for k in keys)
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        token = f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else ""
        return 200, {"Content-Type": "application/xml"}, _LISTING.format(
            bucket=bucket, prefix=escape(prefix), count=len(keys) + len(prefixes), max_keys=max_keys,
            truncated=str(truncated).lower(), token=token, contents=contents, prefixes=common).encode()


async def _read_body(reader: asyncio.StreamReader, headers: dict) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            body += await reader.readexactly(size)
            await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        body = bytes(body)
    else:
        body = await reader.readexactly(int(headers.get("content-length") or 0))
    if "aws-chunked" in headers.get("content-encoding", "") or "x-amz-decoded-content-length" in headers:
        body = _aws_unchunk(body)
    return body


def _aws_unchunk(body: bytes) -> bytes:
    """The payload of an aws-chunked body (chunks of ``hex-size[;signature]`` lines, trailers after)."""
    out, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


def _iso(seconds: float) -> str:
    """LastModified as S3 writes it, to the millisecond: 2026-12-05T08:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


def _error(status: int, code: str) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/xml"}, f"<Error><Code>{code}</Code></Error>".encode()


class LiteServer:
    """``s3_lite.py`` as a subprocess on a free port, for a benchmark: ``stats()``, ``stop()``."""

    def __init__(self, rtt_ms: float):
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, __file__, "--port", str(self.port), "--rtt-ms", str(rtt_ms)],
                                        stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("s3_lite did not start")

    def stats(self, reset: bool = False) -> dict:
        import urllib.request

        request = urllib.request.Request(self.endpoint + "/_stats", method="POST" if reset else "GET")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def control(self, path: str, body: dict) -> None:
        """``POST`` ``body`` to ``/_rtt`` or ``/_drop`` (the module's doc)."""
        import urllib.request

        request = urllib.request.Request(self.endpoint + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    options = parser.parse_args()
    lite = S3Lite(options.rtt_ms / 1000, options.port).start()
    print(f"s3-lite on {lite.endpoint}, {options.rtt_ms:g} ms per request")
    threading.Event().wait()
