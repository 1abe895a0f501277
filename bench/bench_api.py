"""``clipmask serve`` under load: 2,000 mask requests from 64 clients, nothing lost, the API's latency, no leak.

Real parts, nothing stubbed: its own redis-server (broker, results, records), ``bench/s3_lite.py``
(objects in memory, a process of its own, no added round trip) holding 16 small JPEGs, one
``clipmask worker --device cpu`` on the tiny random CLIPSeg (``python -m worker.random_model DIR
--shape tiny``), one ``clipmask serve``, and a webhook receiver in a process of its own that
verifies every callback's signature with ``standardwebhooks`` and counts deliveries by
``webhook-id``. The load comes from this process: ``--clients`` (64) HTTP/1.1 keep-alive
connections on one asyncio loop (raw sockets: a tenth to a quarter of a millisecond of client CPU
per request, measured and printed). Everything shares the machine's cores, the worker masking
throughout.

1. Warm-up: ``--clients`` mask requests at once, their results, then ``5 x --clients`` requests of
   the mix in 4.
2. ``--requests`` (2,000) ``POST /v1/masks`` (JSON, ``wait=0``), each naming one of the 16 images,
   a dest of its own and a ``callback_url`` on the receiver, twice:
   - closed loop: each client sends its next request as soon as its last is answered, the most
     load 64 clients can make; its latency is, by Little's law, 64 / the requests a second the
     server takes (a throughput figure as much as a latency one). Then every connection is
     closed and the serve process's open file descriptors counted: the start count, its Redis,
     broker and S3 connection pools grown to the most load there is;
   - open loop: the same number of requests spread evenly over time at ``--rate`` a second
     (default: half the closed loop's rate), as independent callers send them.
   Each: accepted (``202``), the API's latency for each accepted request as its client saw it
   (request written to answer read): p50, p90, p99, max (targets: p50 <= 20 ms, p99 <= 100 ms on
   a 2-core machine, the worker masking beside it), and the share answered within 10 to 100 ms by
   the server's own clock (``clipmask_api_request_seconds``, from ``/metrics``; it starts once
   the request is read, so a request waiting for the event loop is not in it).
3. Results: every accepted request is asked for with ``GET /v1/masks/{id}?wait=60`` (64 at a
   time) until it has its result: results reached, succeeded, lost (none within ``--timeout``).
4. The mix, until the server has answered ``--total`` (10,000) requests in all: in turn a JSON
   ``POST /v1/masks`` (masked as well, with a callback), a multipart upload of an image, ``GET
   /v1/masks/{id}`` and ``/mask.png`` of a finished request, and an unknown id (``404``); then
   their results as in 3.
5. Webhooks: every accepted request's callback received and verified, at least once (duplicates
   counted), within ``--timeout``.
6. Memory: the serve process's RSS after the first 1,000 requests and after ``--total``
   (target: within 50 MB); open file descriptors at the end, every connection closed, by kind
   (connections to Redis, to S3, ...); target: the start count, but for a connection pool that
   grew (fewer than one connection per 1,000 requests: ``POOLED``).

Figures print and go to ``bench/results/api.json``. About 2 minutes on a 2-core machine, most of it
the worker masking some 5,000 images.

Usage: .venv/bin/python bench/bench_api.py [--requests 2000] [--clients 64] [--total 10000] [--rate R]
       [--image-side 96] [--timeout 600] [--py-spy SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from s3_lite import LiteServer

from tests.processes import stop_group
from tests.services import RedisServer, free_port, s3_test_env

CLIPMASK = str(REPO / ".venv" / "bin" / "clipmask")
PYTHON = str(REPO / ".venv" / "bin" / "python")
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
RESULTS = BENCH_DIR / "results" / "api.json"
BUCKET = "bench-api"
IMAGES = 16
TOKEN = "bench-" + uuid.uuid4().hex
PROMPT, NEGATIVE = "a person|a dog", "background"
#: clipmask's targets for the API (informational: the exit code is 0 either way).
TARGETS = {"p50_ms": 20.0, "p99_ms": 100.0, "rss_growth_mb": 50.0}
#: Open files that are connection pools' (Redis, S3): a pool keeps a connection for each thread
#: that ever used it at the same time as the others, so it may still grow by one when that happens
#: for the first time; anything else must be back at its count.
POOLED = ("redis", "s3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--requests", type=int, default=2000, help="mask requests timed (default 2000)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--total", type=int, default=10_000, help="requests the server answers in all (default 10000)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s of the open loop, spread evenly (default: half the closed loop's rate)")
    parser.add_argument("--image-side", type=int, default=96, help="side of the JPEGs masked, px (default 96)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for results and webhooks")
    parser.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                        help="record the serve process with py-spy for this long at the start of the closed loop "
                             "(collapsed stacks in bench/results/api-profile.txt)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/api.json")
    return parser.parse_args()


# --- the webhook receiver (a process of its own) ------------------------------------------------

def receive_webhooks(port: int, secret: str, ready) -> None:
    """An HTTP server on ``port`` that verifies each POST with ``standardwebhooks`` (answering 204,
    or 400 when it does not verify) and answers ``GET /_stats`` with ``{"ids": {webhook-id:
    deliveries}, "invalid": n, "statuses": {...}}``."""
    import http.server
    import threading
    from collections import Counter

    from standardwebhooks import Webhook

    verify = Webhook(secret).verify
    ids: Counter = Counter()
    statuses: Counter = Counter()
    invalid = [0]
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                message = verify(body, headers)
                ok = message["type"] == "mask.finished" and headers["webhook-id"] == f"mask_{message['data']['id']}"
            except Exception:  # noqa: BLE001 - a signature that does not verify, counted
                ok = False
            with lock:
                if ok:
                    ids[headers["webhook-id"]] += 1
                    statuses[message["data"].get("status")] += 1
                else:
                    invalid[0] += 1
            self.send_response(204 if ok else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            with lock:
                body = json.dumps({"ids": ids, "invalid": invalid[0], "statuses": statuses}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    ready.set()
    server.serve_forever()


def receiver_stats(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=30) as response:
        return json.loads(response.read())


# --- a small HTTP/1.1 client on asyncio ---------------------------------------------------------

class Connection:
    """One keep-alive HTTP/1.1 connection: ``request()`` answers (status, body, seconds)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                      ) -> tuple[int, bytes, float]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        started = time.perf_counter()
        self.writer.write(head + body)
        status_line = await self.reader.readuntil(b"\r\n")
        headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if "transfer-encoding: chunked" in headers:
            data = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            match = re.search(r"content-length: *(\d+)", headers)
            data = await self.reader.readexactly(int(match.group(1))) if match else b""
        seconds = time.perf_counter() - started
        if "connection: close" in headers:
            await self.close()
        return int(status_line.split()[1]), data, seconds

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.reader = self.writer = None


class Load:
    """The bench's clients: ``--clients`` connections, the requests the server answered so far,
    and the serve process's memory sampled when the count passes given marks."""

    def __init__(self, port: int, clients: int, serve: Serve, marks: dict[int, str]):
        self.connections = [Connection(port) for _ in range(clients)]
        self.serve, self.marks, self.answered = serve, dict(marks), 0
        self.samples: dict[str, float] = {}

    async def call(self, connection: Connection, method: str, path: str, body: bytes = b"",
                   content_type: str = "application/json") -> tuple[int, bytes, float]:
        answer = await connection.request(method, path, body, content_type)
        self.answered += 1
        if self.answered in self.marks:
            self.samples[self.marks.pop(self.answered)] = self.serve.rss_mb()
        return answer

    async def run(self, jobs: list, worker, rate: float = 0.0) -> list:
        """``worker(connection, job)`` for every job, one job at a time per connection, in order;
        with ``rate``, job ``i`` is not started before ``i / rate`` seconds."""
        results: list = [None] * len(jobs)
        cursor = iter(range(len(jobs)))
        started = time.perf_counter()

        async def client(connection: Connection) -> None:
            for i in cursor:
                if rate:
                    await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
                results[i] = await worker(connection, jobs[i])

        await asyncio.gather(*(client(connection) for connection in self.connections))
        return results

    async def close(self) -> None:
        for connection in self.connections:
            await connection.close()


# --- the services -------------------------------------------------------------------------------

class Serve:
    """``clipmask serve`` on a free port; the RSS and open file descriptors of its processes."""

    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.log_path, self._log = log, open(log, "wb")
        self.process = subprocess.Popen([CLIPMASK, "serve", "--port", str(self.port), "--no-access-log",
                                         "--loglevel", "warning"], env=env, cwd=REPO, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        """The serve process and any children it has."""
        pids, seen = [self.process.pid], 0
        while seen < len(pids):
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pids[seen]}/task").iterdir():
                    with contextlib.suppress(OSError):
                        pids += [int(p) for p in (task / "children").read_text().split()]
            seen += 1
        return pids

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        return total / 1024

    def fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids())

    def fd_kinds(self, ports: dict[int, str]) -> dict[str, int]:
        """The open descriptors by kind: TCP connections by the name of the port they reach
        (``ports``; connections to the server's own port are ``clients``), pipes, files, ..."""
        peers = {}  # socket inode -> remote port
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{self.process.pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                    peers[fields[9]] = "clients" if local == self.port and remote else ports.get(remote, "tcp")
        kinds: dict[str, int] = {}
        for pid in self.pids():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    kind = (peers.get(target[8:-1], "socket") if target.startswith("socket:[")
                            else target.split(":")[0] if ":" in target else "file")
                    kinds[kind] = kinds.get(kind, 0) + 1
        return dict(sorted(kinds.items()))

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self._log.close()


def wait_ready(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"clipmask serve did not become ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def make_jpeg(side: int, index: int) -> bytes:
    """A small photo-like JPEG: smooth colour gradients with a little noise, quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:side, 0:side * 4 // 3].astype(np.float32) / side
    channels = [128 + 100 * np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6))
                for _ in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (*x.shape, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def histogram(port: int) -> dict[str, float]:
    """The server's ``clipmask_api_request_seconds`` buckets of ``POST /v1/masks``: le -> count."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {le: float(count) for le, count in re.findall(
        r'clipmask_api_request_seconds_bucket\{le="([^"]+)",method="POST",route="/v1/masks"\} ([\d.e+]+)', text)}


def within(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The share of the requests between two ``histogram()`` readings answered within 10, 25, 50
    and 100 ms, by the server's own clock."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    return {f"{float(le) * 1000:g}": (after[le] - before.get(le, 0.0)) / total
            for le in ("0.01", "0.025", "0.05", "0.1") if total and le in after}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


# --- the run ------------------------------------------------------------------------------------

async def bench(args: argparse.Namespace, serve: Serve, hook_port: int, ports: dict[int, str], figures: dict) -> None:
    callback = f"http://127.0.0.1:{hook_port}/hooks/masks"
    images = [f"s3://{BUCKET}/in/img_{i:02d}.jpg" for i in range(IMAGES)]
    upload_jpeg = make_jpeg(args.image_side, 99)
    load = Load(serve.port, args.clients, serve, {1000: "rss_after_1000_mb", args.total: "rss_after_total_mb"})
    accepted: dict[str, str] = {}  # id -> phase
    statuses: dict[str, dict[int, int]] = {}
    results: dict[str, dict] = {}
    finished: list[str] = []  # ids with a succeeded result, for the mix's GETs
    rng = random.Random(0)

    def count(phase: str, status: int) -> None:
        statuses.setdefault(phase, {})
        statuses[phase][status] = statuses[phase].get(status, 0) + 1

    async def post_mask(connection: Connection, job: tuple[str, int]) -> float | None:
        phase, n = job
        body = json.dumps({"source": images[n % IMAGES], "dest": f"s3://{BUCKET}/out/{phase}/{n}/", "prompt": PROMPT,
                           "negative": NEGATIVE, "callback_url": callback}).encode()
        status, data, seconds = await load.call(connection, "POST", "/v1/masks?wait=0", body)
        count(phase, status)
        if status != 202:
            return None
        accepted[json.loads(data)["id"]] = phase
        return seconds

    async def post_upload(connection: Connection, job: tuple[str, int]) -> None:
        phase, n = job
        boundary = uuid.uuid4().hex
        fields = {"dest": f"s3://{BUCKET}/out/{phase}/{n}/", "prompt": PROMPT, "callback_url": callback}
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="up-{n}.jpg"\r\n'
                     "Content-Type: image/jpeg\r\n\r\n".encode() + upload_jpeg + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, data, _ = await load.call(connection, "POST", "/v1/masks", body,
                                          f"multipart/form-data; boundary={boundary}")
        count(f"{phase}-upload", status)
        if status == 202:
            accepted[json.loads(data)["id"]] = phase

    async def wait_result(connection: Connection, mask_id: str) -> None:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            status, data, _ = await load.call(connection, "GET", f"/v1/masks/{mask_id}?wait=60")
            if status == 200:
                results[mask_id] = json.loads(data)
                if results[mask_id].get("status") == "succeeded":
                    finished.append(mask_id)
                return
            if status != 202:
                count("results", status)
                return

    async def collect(phases: tuple[str, ...]) -> float:
        started = time.perf_counter()
        await load.run([i for i, phase in accepted.items() if phase in phases and i not in results], wait_result)
        return time.perf_counter() - started

    async def mixed(connection: Connection, job: tuple[str, int]) -> None:
        phase, n = job
        kind = n % 5
        if kind == 0:
            await post_mask(connection, (phase, n))
        elif kind == 1:
            await post_upload(connection, (phase, n))
        elif kind == 2:
            status, _, _ = await load.call(connection, "GET", f"/v1/masks/{rng.choice(finished)}")
            count(f"{phase}-get", status)
        elif kind == 3:
            status, _, _ = await load.call(connection, "GET", f"/v1/masks/{rng.choice(finished)}/mask.png")
            count(f"{phase}-png", status)
        else:
            status, _, _ = await load.call(connection, "GET", f"/v1/masks/{uuid.uuid4().hex}")
            count(f"{phase}-404", status)

    async def timed(phase: str, rate: float) -> dict:
        before, client_cpu, server_cpu = histogram(serve.port), time.process_time(), serve.cpu_s()
        started = time.perf_counter()
        latencies = await load.run([(phase, n) for n in range(args.requests)], post_mask, rate=rate)
        elapsed = time.perf_counter() - started
        client_cpu, server_cpu = time.process_time() - client_cpu, serve.cpu_s() - server_cpu
        ms = [s * 1000 for s in latencies if s is not None]
        out = {"requests": args.requests, "accepted": len(ms), "statuses": statuses.get(phase, {}),
               "offered_per_s": rate or None, "seconds": elapsed, "requests_per_s": args.requests / elapsed,
               "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
               "max_ms": max(ms, default=float("nan")), "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
               "server_cpu_ms_per_request": server_cpu / args.requests * 1000,
               "client_cpu_ms_per_request": client_cpu / args.requests * 1000,
               "server_within_ms": within(before, histogram(serve.port))}
        print(f"{phase}: {len(ms)} of {args.requests} accepted in {elapsed:.1f} s ({out['requests_per_s']:.0f}/s"
              f"{f', offered {rate:.0f}/s' if rate else ''}); latency ms p50 {out['p50_ms']:.1f}, p90 "
              f"{out['p90_ms']:.1f}, p99 {out['p99_ms']:.1f}, max {out['max_ms']:.1f}; CPU ms a request: serve "
              f"{out['server_cpu_ms_per_request']:.2f}, this client {out['client_cpu_ms_per_request']:.2f}", flush=True)
        return out

    figures["fds_at_start"] = serve.fds()
    # 1. Warm-up: every kind of request, --clients at a time, then every connection closed
    await load.run([("warmup", n) for n in range(args.clients)], post_mask)
    await collect(("warmup",))
    await load.run([("warmup", n) for n in range(args.clients, args.clients * 6)], mixed)
    await load.close()
    await asyncio.sleep(1.0)
    figures["fds_after_warmup"], figures["fds_after_warmup_kinds"] = serve.fds(), serve.fd_kinds(ports)

    # 2. The timed requests: a closed loop, then an open loop at --rate (default half the first's rate)
    profile = None
    if args.py_spy:
        profile = subprocess.Popen([str(PY_SPY), "record", "--pid", str(serve.process.pid), "--duration",
                                    str(int(args.py_spy)), "--rate", "200", "--nonblocking", "--format", "raw",
                                    "--output", str(BENCH_DIR / "results" / "api-profile.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1)
    figures["closed"] = await timed("closed", 0.0)
    if profile is not None:
        profile.wait()
    await load.close()  # the pools have grown to the most load there is: the start count
    await asyncio.sleep(1.0)
    figures["answered_start"] = load.answered
    figures["fds_after_closed"], figures["fds_after_closed_kinds"] = serve.fds(), serve.fd_kinds(ports)
    rate = args.rate or round(figures["closed"]["requests_per_s"] / 2, -1)
    figures["open"] = await timed("open", rate)

    # 3. Every result
    figures["results_seconds"] = await collect(("warmup", "closed", "open"))
    timed_ids = [i for i, phase in accepted.items() if phase in ("closed", "open")]
    print(f"results: {sum(i in results for i in timed_ids)} of {len(timed_ids)} after "
          f"{figures['results_seconds']:.1f} s more", flush=True)

    # 4. The mix, up to --total requests answered, and its results
    started, n = time.perf_counter(), 0
    while load.answered < args.total:
        batch = [("loop", i) for i in range(n, n + min(args.clients * 20, args.total - load.answered))]
        await load.run(batch, mixed)
        n += len(batch)
    figures["loop_requests"], figures["loop_seconds"] = n, time.perf_counter() - started
    figures["loop_results_seconds"] = await collect(("loop",))
    figures["statuses"] = statuses
    figures["answered"] = load.answered
    figures.update(load.samples)
    await load.close()

    # 5. Results and webhooks of everything accepted
    figures["accepted_all"] = len(accepted)
    figures["results_reached"] = sum(i in results for i in accepted)
    figures["results_succeeded"] = sum(results.get(i, {}).get("status") == "succeeded" for i in accepted)
    figures["lost"] = len(accepted) - figures["results_reached"]
    deadline = time.monotonic() + args.timeout
    while True:
        hooks = receiver_stats(hook_port)
        missing = [i for i in accepted if f"mask_{i}" not in hooks["ids"]]
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    figures["webhooks_received"] = len(accepted) - len(missing)
    figures["webhooks_duplicates"] = sum(max(0, deliveries - 1) for deliveries in hooks["ids"].values())
    figures["webhooks_invalid"] = hooks["invalid"]
    figures["webhooks_unexpected"] = len(set(hooks["ids"]) - {f"mask_{i}" for i in accepted})

    # 6. Open files once every connection is closed
    await asyncio.sleep(1.0)
    figures["fds_at_end"], figures["fds_at_end_kinds"] = serve.fds(), serve.fd_kinds(ports)
    figures["rss_at_end_mb"] = serve.rss_mb()


def main() -> None:
    args = parse_args()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    figures: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(f"{figures['machine']}, load {os.getloadavg()[0]:.1f}; {args.requests} mask requests from {args.clients} "
          f"clients in a closed loop, then {args.requests} at {f'{args.rate:g}/s' if args.rate else 'half that rate'}; "
          f"{args.total} requests in all; worker: tiny random CLIPSeg on the CPU, {args.image_side}px JPEGs",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        subprocess.run([PYTHON, "-m", "worker.random_model", str(work / "tiny"), "--shape", "tiny"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        redis_server = RedisServer(workdir=str(work)).start()
        stack.callback(redis_server.stop)
        lite = LiteServer(0)
        stack.callback(lite.stop)
        import boto3

        s3 = boto3.client("s3", endpoint_url=lite.endpoint, **{k.lower(): v for k, v in
                          s3_test_env(lite.endpoint).items() if k.startswith("AWS_") and "KEY" in k},
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for i in range(IMAGES):
            s3.put_object(Bucket=BUCKET, Key=f"in/img_{i:02d}.jpg", Body=make_jpeg(args.image_side, i))

        hook_port = free_port()
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        receiver = context.Process(target=receive_webhooks, args=(hook_port, secret, ready), daemon=True)
        receiver.start()
        stack.callback(receiver.terminate)
        ready.wait(30)

        base = redis_server.url.rsplit("/", 1)[0]
        env = {**os.environ, **s3_test_env(lite.endpoint), "CELERY_BROKER_URL": f"{base}/0",
               "CELERY_RESULT_BACKEND": f"{base}/1", "CLIPMASK_MODEL": str(work / "tiny"), "HF_HUB_OFFLINE": "1",
               "CLIPMASK_QUEUE": "bench-api", "CLIPMASK_API_TOKENS": TOKEN,
               "CLIPMASK_API_ALLOWED": f"s3://{BUCKET}/in/,s3://{BUCKET}/out/,s3://{BUCKET}/uploads/",
               "CLIPMASK_API_UPLOADS": f"s3://{BUCKET}/uploads/",
               "CLIPMASK_API_CALLBACKS": f"http://127.0.0.1:{hook_port}/hooks/", "CLIPMASK_WEBHOOK_SECRET": secret}
        worker_log = (work / "worker.log").open("wb")
        stack.callback(worker_log.close)
        worker = subprocess.Popen([CLIPMASK, "worker", "--device", "cpu", "--loglevel", "WARNING", "-n", "benchapi@%h"],
                                  env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)

        stack.callback(stop_group, worker, 60)
        serve = Serve(env, work / "serve.log")
        stack.callback(serve.stop)
        wait_ready(serve.port, serve.process, serve.log_path)
        started = time.perf_counter()
        ports = {redis_server.port: "redis", lite.port: "s3", hook_port: "webhooks"}
        asyncio.run(bench(args, serve, hook_port, ports, figures))
        figures["wall_s"] = time.perf_counter() - started
        serve_log = serve.log_path.read_text(errors="replace")
        figures["serve_tracebacks"] = serve_log.count("Traceback")
    figures["bench_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(figures)
    if not args.no_save:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {RESULTS.relative_to(REPO)}")


def report(f: dict) -> None:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    growth = f["rss_after_total_mb"] - f["rss_after_1000_mb"]
    start, end = f["fds_after_closed_kinds"], f["fds_at_end_kinds"]
    pooled = sum(end.get(kind, 0) - start.get(kind, 0) for kind in POOLED)
    others_same = all(end.get(kind, 0) == start.get(kind, 0) for kind in set(start) | set(end) if kind not in POOLED)
    requests = f["answered"] - f["answered_start"]
    rows = [("accepted (202)", (f"{f['closed']['accepted'] + f['open']['accepted']} of "
             f"{f['closed']['requests'] + f['open']['requests']} timed, {f['accepted_all']} in all"),
             verdict(f["closed"]["accepted"] + f["open"]["accepted"] == f["closed"]["requests"] + f["open"]["requests"])),
            ("results reached", (f"{f['results_reached']} of {f['accepted_all']} accepted ({f['results_succeeded']} "
             f"succeeded), lost {f['lost']}"), verdict(f["lost"] == 0)),
            ("webhooks", (f"{f['webhooks_received']} of {f['accepted_all']} received and verified (duplicates "
             f"{f['webhooks_duplicates']}, not verified {f['webhooks_invalid']})"),
             verdict(f["webhooks_received"] == f["accepted_all"] and not f["webhooks_invalid"]))]
    for phase, label in (("closed", "closed loop"), ("open", f"open {f['open']['offered_per_s']:.0f}/s")):
        t = f[phase]
        rows += [(f"{label} p50", (f"{t['p50_ms']:.1f} ms (target <= {TARGETS['p50_ms']:g}) at "
                  f"{t['requests_per_s']:.0f} requests/s"), verdict(t["p50_ms"] <= TARGETS["p50_ms"])),
                 (f"{label} p99", f"{t['p99_ms']:.1f} ms (target <= {TARGETS['p99_ms']:g}); p90 {t['p90_ms']:.1f}, "
                  f"max {t['max_ms']:.1f}; serve's own clock: " + ", ".join(
                      f"{share:.0%} <= {ms} ms" for ms, share in sorted(t["server_within_ms"].items(), key=lambda kv: float(kv[0]))),
                  verdict(t["p99_ms"] <= TARGETS["p99_ms"]))]
    rows += [("RSS", (f"{f['rss_after_1000_mb']:.1f} MB after 1,000 requests, {f['rss_after_total_mb']:.1f} after "
              f"{f['answered']:,} (+{growth:.1f}; target <= {TARGETS['rss_growth_mb']:g})"),
              verdict(growth <= TARGETS["rss_growth_mb"])),
             ("open fds", (f"{f['fds_at_start']} before any request; clients disconnected: {f['fds_after_warmup']} "
              f"after the warm-up, {f['fds_after_closed']} after the closed loop ({f['answered_start']:,} requests), "
              f"{f['fds_at_end']} after {f['answered']:,} ({pooled:+d} pooled connections)"),
              verdict(others_same and pooled * 1000 < requests))]
    print()
    for name, value, ok in rows:
        print(f"  {name:<17} {value:<118} {ok}")
    for label, key in (("warm-up", "fds_after_warmup_kinds"), ("closed loop", "fds_after_closed_kinds"),
                       ("end", "fds_at_end_kinds")):
        print(f"  fds by kind, {label}: " + ", ".join(f"{kind} {n}" for kind, n in f[key].items()))
    print(f"  serve CPU ms a request: {f['closed']['server_cpu_ms_per_request']:.2f} (closed), "
          f"{f['open']['server_cpu_ms_per_request']:.2f} (open); this client's {f['closed']['client_cpu_ms_per_request']:.2f}"
          f"; the mix: {f['loop_requests']} requests in {f['loop_seconds']:.1f} s; serve tracebacks: "
          f"{f['serve_tracebacks']}; {f['wall_s']:.0f} s in all")


if __name__ == "__main__":
    main()
