"""What one S3 request costs the client process: boto3 against obstore, PUT and GET, in one run.

Every configuration sends the same requests to the same server, one after another in the same
process: ``--requests`` PUTs of ``--size``-byte objects (random bytes, incompressible like a JPEG;
100,000 by default) from ``--threads`` threads, then as many GETs of them, against ``s3_lite.py``
(objects in memory, a process of its own, so it takes no GIL from the client measured) with no
round trip added, or each ``--rtt-ms``. The configurations:

``boto3``          the project's boto3 client as ``storage.s3_clients.shared_client`` builds it
                   (standard retries, 5 attempts, ``max_pool_connections=1024``): the reference;
``boto3-lean``     the same client with the per-call work cut (``lean_client`` below): checksums only
                   where an operation requires one, no SHA-256 of the body in the signature
                   (``s3={"payload_signing_enabled": False}``: UNSIGNED-PAYLOAD, as botocore does on
                   HTTPS when a checksum header is sent), no client-side parameter validation, HTTP
                   dates parsed by the standard library instead of dateutil, and no
                   ``Expect: 100-continue`` on PUT (which on a real network also costs a round trip
                   before the body is sent; s3_lite answers it at once);
``obstore``        ``obstore.put`` / ``bytes(obstore.get(...).bytes())`` on the store of
                   ``storage.s3_clients.shared_data_store``, what ``S3Store.write_bytes`` and
                   ``read_bytes`` do;
``obstore-async``  ``put_async`` / ``get_async`` on that store, ``--threads`` tasks on one asyncio loop.

Printed per configuration and operation: requests per second on this machine (client and server
share its cores), the CPU time this process spent per request (``time.process_time``: every
thread, Rust's included, the kernel's part too), and with ``--gil`` (py-spy on PATH or in the venv,
and ptrace rights) the time per request some thread held the GIL, sampled by py-spy as
``bench_feed.py`` does: a process cannot send more than 1000 / that many requests per second,
however many cores it has. Then each against ``boto3`` measured in the same run, and the server's
own CPU per request. Every GET's body is compared with what was PUT (each run's payloads are
stamped apart) and the server's request counts are checked, so a failure, a retry or a stale
object stops the run instead of being measured.

Usage: .venv/bin/python bench/bench_clients.py [--gil] [--requests 3000] [--threads 16] [--size 100000]
       [--repeat 2] [--rtt-ms 0 30] [--configs boto3 boto3-lean obstore obstore-async]
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import boto3
import botocore
import botocore.handlers
import botocore.session
import obstore
from botocore.config import Config
from botocore.utils import parse_timestamp
from s3_lite import LiteServer
from sampling import GilSampler, py_spy, server_cpu_s

from storage.s3_clients import MAX_CONNECTIONS, shared_client, shared_data_store
from tests.services import s3_test_env

BUCKET = "bench-clients"
#: S3Store's default budget of attempts per request.
MAX_ATTEMPTS = 5
CONFIGS = ("boto3", "boto3-lean", "obstore", "obstore-async")
#: botocore Config options that cut per-call work; those the installed botocore lacks are skipped.
LEAN_OPTIONS = {
    "request_checksum_calculation": "when_required",  # no CRC32 of every PUT body
    "response_checksum_validation": "when_required",  # no x-amz-checksum-mode, no CRC32 of every GET body
    "parameter_validation": False,  # the server still rejects a bad request
    "s3": {"payload_signing_enabled": False},  # no SHA-256 of the body for the signature
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per configuration and operation")
    parser.add_argument("--threads", type=int, default=16, help="threads sending them (async: tasks on one loop)")
    parser.add_argument("--size", type=int, default=100_000, help="bytes per object")
    parser.add_argument("--keys", type=int, default=128, help="distinct objects, written and read in turn")
    parser.add_argument("--repeat", type=int, default=2, help="runs of every configuration, interleaved; "
                        "the best rate, the least CPU and GIL count")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0], help="round trips s3_lite adds")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="client configurations (boto3, the reference, is always run)")
    parser.add_argument("--gil", action="store_true", help="also sample GIL-held time with py-spy")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args()
    if args.requests < 1 or args.threads < 1 or args.size < 16 or args.keys < 1 or args.repeat < 1:
        parser.error("--requests, --threads, --keys and --repeat must be at least 1, --size at least 16")
    args.keys = min(args.keys, args.requests)
    args.configs = ["boto3", *(name for name in CONFIGS[1:] if name in args.configs)]
    return args


def fast_timestamp(value):
    """HTTP dates (RFC 1123, headers) and ISO 8601 (XML bodies) by the standard library, as
    timezone-aware datetimes; anything else by botocore's own parser (dateutil, about 0.1 ms)."""
    try:
        parsed = datetime.fromisoformat(value) if "T" in value else email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)
    return parsed if parsed.tzinfo is not None else parse_timestamp(value)


def lean_client(max_attempts: int):
    """A boto3 S3 client as ``shared_client(max_attempts)`` builds it, its per-call work cut:
    LEAN_OPTIONS, ``fast_timestamp``, no ``Expect: 100-continue``. Returns (client, options applied)."""
    options = {name: value for name, value in LEAN_OPTIONS.items() if name in Config.OPTION_DEFAULTS}
    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=fast_timestamp)
    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                    max_pool_connections=MAX_CONNECTIONS, **options)
    client = boto3.session.Session(botocore_session=session).client("s3", config=config)
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
    applied = [f"{name}={value!r}" for name, value in options.items()]
    return client, applied + ["timestamp_parser=fast_timestamp", "no Expect: 100-continue"]


def py_spy_problem() -> str | None:
    """Why py-spy cannot sample this process (no py-spy, no ptrace rights), or None."""
    spy = py_spy()
    if spy is None:
        return "py-spy not found (.venv/bin/pip install py-spy)"
    done = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(os.getpid())],
                          check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"py-spy cannot attach (ptrace rights?): {lines[-1] if lines else f'exit {done.returncode}'}"
    return None


def in_threads(call, threads: int, requests: int) -> None:
    """``call(i)`` for every i < requests, spread over ``threads`` threads; the first error raised again."""
    errors: list[BaseException] = []

    def loop(first: int) -> None:
        try:
            for i in range(first, requests, threads):
                call(i)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller
            errors.append(err)

    workers = [threading.Thread(target=loop, args=(first,)) for first in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def in_tasks(loop: asyncio.AbstractEventLoop, call, tasks: int, requests: int) -> None:
    """``await call(i)`` for every i < requests, spread over ``tasks`` tasks of ``loop``."""
    async def one(first: int) -> None:
        for i in range(first, requests, tasks):
            await call(i)

    async def every() -> None:
        await asyncio.gather(*(one(first) for first in range(tasks)))

    loop.run_until_complete(every())


class Target:
    """One configuration's objects: its keys, the payloads of the current run, the check of a GET."""

    def __init__(self, name: str, keys: int, bases: list[bytes]):
        self.name = name
        self.keys = [f"bench-clients/{name}/{k:04d}.jpg" for k in range(keys)]
        self.bases = bases
        self.payloads: list[bytes] = []

    def stamp(self, run: str) -> None:
        """New payloads, told apart from every earlier run's by their first 16 bytes."""
        self.payloads = [f"{run}:{k}".encode().ljust(16)[:16] + base[16:] for k, base in enumerate(self.bases)]

    def key(self, i: int) -> str:
        return self.keys[i % len(self.keys)]

    def payload(self, i: int) -> bytes:
        return self.payloads[i % len(self.keys)]

    def check(self, i: int, data) -> None:
        if data != self.payloads[i % len(self.keys)]:
            raise AssertionError(f"{self.name}: GET {self.key(i)} returned {len(data)} bytes, not what was PUT")


def runners(name: str, target: Target, threads: int, loop: asyncio.AbstractEventLoop):
    """{"PUT": run(requests), "GET": run(requests)} of configuration ``name``, and its notes."""
    notes: list[str] = []
    if name.startswith("boto3"):
        if name == "boto3":
            client = shared_client(MAX_ATTEMPTS)
        else:
            client, notes = lean_client(MAX_ATTEMPTS)

        def put(i):
            client.put_object(Bucket=BUCKET, Key=target.key(i), Body=target.payload(i))

        def get(i):
            target.check(i, client.get_object(Bucket=BUCKET, Key=target.key(i))["Body"].read())

        return {"PUT": lambda n: in_threads(put, threads, n), "GET": lambda n: in_threads(get, threads, n)}, notes
    store = shared_data_store(BUCKET, MAX_ATTEMPTS)
    if name == "obstore":
        def put(i):
            obstore.put(store, target.key(i), target.payload(i), use_multipart=False)

        def get(i):
            target.check(i, bytes(obstore.get(store, target.key(i)).bytes()))

        return {"PUT": lambda n: in_threads(put, threads, n), "GET": lambda n: in_threads(get, threads, n)}, notes

    async def put_async(i):
        await obstore.put_async(store, target.key(i), target.payload(i), use_multipart=False)

    async def get_async(i):
        result = await obstore.get_async(store, target.key(i))
        target.check(i, bytes(await result.bytes_async()))

    return {"PUT": lambda n: in_tasks(loop, put_async, threads, n),
            "GET": lambda n: in_tasks(loop, get_async, threads, n)}, notes


def measure(run, op: str, requests: int, server: LiteServer, gil_rate: int, work: Path) -> dict:
    """One phase: ``requests`` of ``op``; rate, client CPU, GIL (gil_rate > 0), server CPU per request."""
    server.stats(reset=True)
    server_cpu = server_cpu_s(server.process.pid)
    spy = GilSampler(work / "gil.txt", gil_rate).start() if gil_rate else None
    cpu, wall = time.process_time(), time.perf_counter()
    run(requests)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    figures = {"rate": requests / wall, "cpu_ms": cpu / requests * 1e3}
    if spy is not None:
        figures["gil_ms"] = spy.stop() / requests * 1e3
    figures["server_ms"] = (server_cpu_s(server.process.pid) - server_cpu) / requests * 1e3
    counts = server.stats(reset=True)["counts"]
    counts.pop("POST", None)  # the reset itself
    if counts != {op: requests}:
        raise AssertionError(f"the server saw {counts}, not {{{op!r}: {requests}}} (retries? failures?)")
    return figures


def ratio(value: float, base: float) -> str:
    return f"x{value / base:.2f}" if base else "-"


def report(results: dict, gil: bool) -> None:
    print(f"{'client':>14} {'op':>3} {'req/s':>7} {'CPU ms/req':>10}"
          + (f" {'GIL ms/req':>10} {'GIL ceiling req/s':>17}" if gil else "")
          + f" {'server ms/req':>13}   against boto3: req/s, CPU" + (", GIL" if gil else ""))
    for op in ("PUT", "GET"):
        best = {}
        for name, runs in results.items():
            runs = runs[op]
            best[name] = {"rate": max(r["rate"] for r in runs), "cpu_ms": min(r["cpu_ms"] for r in runs),
                          "server_ms": min(r["server_ms"] for r in runs)}
            if gil:
                best[name]["gil_ms"] = min(r["gil_ms"] for r in runs)
        base = best["boto3"]
        for name, figures in best.items():
            line = f"{name:>14} {op:>3} {figures['rate']:7.0f} {figures['cpu_ms']:10.3f}"
            if gil:
                held = figures["gil_ms"]
                line += f" {held:10.3f} {(1000 / held if held else float('inf')):17.0f}"
            line += f" {figures['server_ms']:13.3f}   {ratio(figures['rate'], base['rate'])}, " \
                    f"{ratio(figures['cpu_ms'], base['cpu_ms'])}"
            if gil:
                line += f", {ratio(figures['gil_ms'], base['gil_ms'])}"
            print(line, flush=True)


def main() -> None:
    args = parse_args()
    gil_rate = 0
    if args.gil:
        problem = py_spy_problem()
        if problem:
            print(f"GIL not measured: {problem}; CPU only")
        else:
            gil_rate = args.rate
    work = Path(tempfile.mkdtemp(prefix="bench-clients-"))
    loop = asyncio.new_event_loop()
    bases = [os.urandom(args.size) for _ in range(args.keys)]
    started, notes = time.perf_counter(), []
    print(f"S3 client cost per request: {args.size:,}-byte objects, {args.threads} threads (async: tasks on one "
          f"loop), {args.requests} requests per row, best of {args.repeat}; s3_lite in its own process; "
          f"{os.cpu_count()} cores shared by client and server")
    print(f"boto3 {boto3.__version__}, botocore {botocore.__version__}, obstore {obstore.__version__}, "
          f"Python {sys.version.split()[0]}" + (f"; GIL sampled by py-spy at {gil_rate} Hz" if gil_rate else ""))
    try:
        for rtt in args.rtt_ms:
            server = LiteServer(rtt)
            try:
                os.environ.update(s3_test_env(server.endpoint))
                shared_client(MAX_ATTEMPTS).create_bucket(Bucket=BUCKET)
                targets = {name: Target(name, args.keys, bases) for name in args.configs}
                made = {name: runners(name, targets[name], args.threads, loop) for name in args.configs}
                notes = made.get("boto3-lean", ((), []))[1]
                results = {name: {"PUT": [], "GET": []} for name in args.configs}
                for name, (run, _) in made.items():  # connections opened, first-call paths taken
                    targets[name].stamp("warm-up")
                    run["PUT"](args.keys)
                    run["GET"](args.keys)
                server.stats(reset=True)
                for repeat in range(args.repeat):
                    for name, (run, _) in made.items():
                        targets[name].stamp(f"{rtt:g}/{repeat}")
                        for op in ("PUT", "GET"):
                            results[name][op].append(measure(run[op], op, args.requests, server, gil_rate, work))
                print(f"\nround trip {rtt:g} ms added by s3_lite")
                report(results, bool(gil_rate))
            finally:
                server.stop()
        if notes:
            print(f"\nboto3-lean: {', '.join(notes)}")
        print(f"every GET checked against what was PUT; {time.perf_counter() - started:.0f} s in all")
    finally:
        loop.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
