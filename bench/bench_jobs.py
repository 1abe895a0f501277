"""The job layer at scale: what a job of N keys costs Redis, the submitting process and the
process that writes the manifest, and how fast it is planned, cancelled and drained.

For each N (default 10^5 and 10^6), with its own redis-server on a free port and a local folder of
N empty ``.jpg`` files (1,000 per sub-folder, made once under ``bench/.cache/``):

1. ``clipmask submit`` (a subprocess, start-up included): keys/s and peak RSS; Redis
   ``used_memory`` growth while the job is queued, per key.
2. ``clipmask cancel``, then one ``clipmask worker`` (tiny random model) drains the queue and
   writes the manifest: seconds, manifest rows, Redis growth once the job has finished, per key.
3. The manifest written again in a fresh process (``write_job_manifest``): memory growth.
4. With ``--chunk-size 8`` as well: submit keys/s (no drain), to show many tasks do not stall.

No image is masked: the figures are the job layer's own. clipmask's own limits are printed beside
each figure (PASS/MISS, informational).

``--listing`` measures S3 listing instead, at a real round trip: ``bench/s3_lite.py`` in a process
of its own adds ``--rtt-ms`` (30) to every request and holds ``--listing-keys`` (10^5) empty keys
under ``--listing-prefixes`` (16) sub-prefixes of the source. In one run, best of ``--repeat``:
``S3Store.list`` over the source one page after another (``list_concurrency=1``) and side by side
(the default), and boto3's own paginator as listing was before ``storage/listing.py``: keys/s,
the client's CPU per 1,000 keys, requests and the most in flight; then the whole planning step,
``submit_job`` in this process until the job is planned (its own redis-server; plans written to a
local folder, so that the source's listing is what differs), with each listing.

``--incremental`` measures scans of what is new (``clipmask submit --skip-existing``) instead: a
local folder of ``--incremental-keys`` (10^6) keys with their three outputs each in place, 1% of
the keys without outputs (new) and 0.1% modified after their record (changed): a full submit's
seconds, the two listings' seconds (names alone, and with each file's size and mtime, what a scan
must know), then the incremental submit's seconds, peak RSS and keys planned; the limit: at most a
fifth of the full submit plus the listings. Then ``--incremental-s3-keys`` (10^5) the same way on
``bench/s3_lite.py`` at ``--rtt-ms`` a request (moto takes minutes to hold 4 x 10^5 objects): the
requests by method (LIST at most 1.1 x (source keys + output keys) / 1,000, no GET or HEAD), and a
scan with nothing new against the two listings' time.

Usage: .venv/bin/python bench/bench_jobs.py [--sizes 100000 1000000] [--small-chunk 8]
       .venv/bin/python bench/bench_jobs.py --listing [--listing-keys 100000] [--listing-prefixes 16] [--rtt-ms 30]
       .venv/bin/python bench/bench_jobs.py --incremental [--incremental-keys 1000000] [--incremental-s3-keys 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from tests.services import RedisServer  # noqa: E402 - the same throwaway redis-server the tests use

CLIPMASK = str(REPO / ".venv" / "bin" / "clipmask")
PYTHON = str(REPO / ".venv" / "bin" / "python")
#: (figure, comparison, bound): clipmask's own limits for the job layer.
LIMITS = {
    "submit_peak_rss_mb": ("<=", 250), "submit_keys_per_s": (">=", 50_000),
    "redis_bytes_per_key_queued": ("<=", 32), "redis_bytes_per_key_finished": ("<=", 16),
    "manifest_writer_growth_mb": ("<=", 200), "cancel_drain_s": ("<", 120),
}
MANIFEST_PROBE = """
import resource, sys, time
from storage import open_store
from tasks.jobs.files import JobFiles
from tasks.jobs.manifest import write_job_manifest
dest, job_id, source = sys.argv[1:4]
files = JobFiles(open_store(dest), job_id)
chunks = files.read_planned()["chunks"]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
counter = write_job_manifest(files, open_store(source), chunks, cancelled=True)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - started, counter.total)
"""


def make_files(name: str, n: int, names: Callable[[int], Iterable[str]], what: str) -> Path:
    """Empty files ``names(i)`` for i < N, 1,000 i per folder, made once under ``bench/.cache/name``."""
    folder = BENCH_DIR / ".cache" / name
    stamp = folder / ".complete"
    if not stamp.exists():
        started = time.perf_counter()
        for i in range(n):
            shard = folder / f"s{i // 1000:05d}"
            if i % 1000 == 0:
                shard.mkdir(parents=True, exist_ok=True)
            for file_name in names(i):
                (shard / file_name).touch()
        stamp.touch()
        print(f"  made {what} in {time.perf_counter() - started:.0f}s", flush=True)
    return folder


def make_source(n: int) -> Path:
    """N empty .jpg files, 1,000 per folder, made once and reused."""
    return make_files(f"keys-{n}", n, lambda i: (f"k{i:08d}.jpg",), f"{n} files")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_measured(args: list[str], env: dict) -> tuple[float, int, str]:
    """Run a command; returns (seconds, peak RSS in MB, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{args} exited {proc.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss // 1024, out


def wait_manifest(client: redis.Redis, job_id: str, timeout: float = 1800, interval: float = 0.2) -> float:
    """Seconds until the job's manifest is written (polling its Redis record every ``interval``)."""
    started = time.perf_counter()
    while not client.hget(f"clipmask:job:{job_id}", "manifest"):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"job {job_id} not finished after {timeout}s")
        time.sleep(interval)
    return time.perf_counter() - started


def bench_size(n: int, chunk: int, small_chunk: int, model: str, workdir: Path) -> dict:
    source = make_source(n)
    figures: dict = {"keys": n, "chunk_size": chunk}
    with RedisServer(workdir=str(workdir)).start() as server:
        env = {**os.environ, "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url,
               "CLIPMASK_MODEL": model, "HF_HUB_OFFLINE": "1", "CLIPMASK_QUEUE": "bench"}
        client = redis.Redis.from_url(server.url)
        dest = workdir / f"out-{n}"
        base = used_memory(client)
        seconds, rss, out = run_measured([CLIPMASK, "submit", str(source), "--out", str(dest), "--prompt", "cat",
                                          "--chunk-size", str(chunk)], env)
        job_id = out.strip().splitlines()[-1]
        queued = used_memory(client) - base
        figures.update(submit_s=round(seconds, 2), submit_keys_per_s=round(n / seconds),
                       submit_peak_rss_mb=rss, redis_bytes_per_key_queued=round(queued / n, 2))
        print(f"  submit: {seconds:.1f}s, {n / seconds:,.0f} keys/s, peak RSS {rss} MB, "
              f"Redis +{queued / n:.1f} B/key queued", flush=True)

        subprocess.run([CLIPMASK, "cancel", job_id], env=env, check=True, capture_output=True)
        with open(workdir / f"worker-{n}.log", "wb") as log:
            worker = subprocess.Popen([CLIPMASK, "worker", "--device", "cpu", "--loglevel", "WARNING",
                                       "-n", f"bench{n}@%h"], env=env, cwd=REPO, stdout=log, stderr=log)
            try:
                drain = wait_manifest(client, job_id)
            finally:
                worker.terminate()
                worker.wait(60)
        finished = used_memory(client) - base
        rows = sum(1 for _ in open(dest / "_jobs" / job_id / "manifest.jsonl", "rb"))
        figures.update(cancel_drain_s=round(drain, 1), manifest_rows=rows,
                       redis_bytes_per_key_finished=round(finished / n, 3))
        print(f"  cancel + drain by one worker (start-up included): {drain:.1f}s, {rows:,} manifest rows, "
              f"Redis +{finished / n:.3f} B/key once finished", flush=True)

        probe = subprocess.run([PYTHON, "-c", MANIFEST_PROBE, str(dest), job_id, str(source)], cwd=REPO,
                               env=env, capture_output=True, text=True, check=True).stdout.split()
        growth = (int(probe[1]) - int(probe[0])) / 1024
        figures.update(manifest_writer_growth_mb=round(growth, 1), manifest_write_s=round(float(probe[2]), 1))
        print(f"  manifest of {int(probe[3]):,} rows written again: {float(probe[2]):.1f}s, "
              f"memory growth {growth:.1f} MB", flush=True)

        client.flushall()
        seconds, rss, _ = run_measured([CLIPMASK, "submit", str(source), "--out", str(workdir / f"small-{n}"),
                                        "--prompt", "cat", "--chunk-size", str(small_chunk)], env)
        figures.update(small_chunk_size=small_chunk, small_chunk_tasks=-(-n // small_chunk),
                       small_chunk_submit_s=round(seconds, 1), small_chunk_keys_per_s=round(n / seconds))
        print(f"  submit with --chunk-size {small_chunk} ({-(-n // small_chunk):,} tasks): {seconds:.1f}s, "
              f"{n / seconds:,.0f} keys/s, peak RSS {rss} MB", flush=True)
    return figures


def verdict(name: str, value: float) -> str:
    if name not in LIMITS:
        return ""
    op, bound = LIMITS[name]
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
    return f"{'PASS' if ok else 'MISS'} ({op} {bound:,})"


def fill_lite(server, bucket: str, keys: list[str]) -> None:
    """Make ``bucket`` with ``keys`` (empty) on an s3_lite server at once."""
    import urllib.request

    body = json.dumps({"bucket": bucket, "keys": keys}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.endpoint + "/_fill", data=body, method="POST"),
                                timeout=60) as response:
        response.read()


def timed_listing(list_keys, repeat: int) -> tuple[float, float, int]:
    """Best of ``repeat`` runs of ``list_keys()`` (an iterable of keys): (seconds, CPU seconds of
    this process, keys)."""
    best = (float("inf"), 0.0, 0)
    for _ in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        count = sum(1 for _ in list_keys())
        best = min(best, (time.perf_counter() - started, time.process_time() - cpu, count))
    return best


def bench_listing(n: int, prefixes: int, rtt_ms: float, repeat: int, chunk: int, workdir: Path) -> dict:
    from bench.s3_lite import LiteServer
    from storage.listing import LIST_CONCURRENCY
    from storage.s3 import S3Store
    from tests.services import s3_test_env

    bucket, root = "bench-listing", "src/"
    keys = [f"{root}p{i * prefixes // n:03d}/k{i:08d}.jpg" for i in range(n)]
    server = LiteServer(rtt_ms)
    os.environ.update(s3_test_env(server.endpoint))
    figures: dict = {"keys": n, "sub_prefixes": prefixes, "rtt_ms": rtt_ms, "concurrency": LIST_CONCURRENCY}
    try:
        fill_lite(server, bucket, keys)
        parallel, sequential = S3Store(bucket, root), S3Store(bucket, root, list_concurrency=1)
        client = sequential._s3()

        def boto3_paginator():  # S3Store.list before storage/listing.py
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
                for item in page.get("Contents", ()):
                    if not item["Key"].endswith("/"):
                        yield item["Key"]

        print(f"listing {n:,} keys under {prefixes} sub-prefixes, {rtt_ms:g} ms a request, best of {repeat}",
              flush=True)
        rows = [("before", "one page after another, boto3's paginator (before)", boto3_paginator),
                ("sequential", "one page after another (list_concurrency=1)", sequential.list),
                ("parallel", f"side by side (list_concurrency={LIST_CONCURRENCY})", parallel.list)]
        for name, label, list_keys in rows:
            server.stats(reset=True)
            seconds, cpu, count = timed_listing(list_keys, repeat)
            stats = server.stats()
            if count != n:
                raise RuntimeError(f"{label}: listed {count} keys of {n}")
            requests = stats["counts"].get("LIST", 0) // repeat
            figures[name] = {"s": round(seconds, 3), "keys_per_s": round(n / seconds),
                             "cpu_ms_per_1000_keys": round(cpu / n * 1e6, 2), "requests": requests,
                             "max_in_flight": stats["max_in_flight"]}
            print(f"  {label:52} {seconds:6.2f}s {n / seconds:>10,.0f} keys/s  CPU {cpu / n * 1e6:5.2f} ms/1000 keys"
                  f"  {requests} requests, at most {stats['max_in_flight']} in flight", flush=True)
        figures["parallel_vs_sequential"] = round(figures["sequential"]["s"] / figures["parallel"]["s"], 2)
        print(f"  side by side / one after another: {figures['parallel_vs_sequential']}x  (target >= 5x)")

        figures["planning"] = bench_planning(bucket, root, n, chunk, workdir, repeat)
        plan = figures["planning"]
        figures["planning_parallel_vs_sequential"] = round(plan["sequential"]["s"] / plan["parallel"]["s"], 2)
        print(f"  planning, side by side / one after another: {figures['planning_parallel_vs_sequential']}x")
    finally:
        server.stop()
    return figures


def bench_planning(bucket: str, root: str, n: int, chunk: int, workdir: Path, repeat: int) -> dict:
    """``submit_job`` in this process until the job is planned, the source listed each way (best
    of ``repeat``)."""
    from storage import open_store
    from tasks.jobs import planning
    from worker.spec import MaskSpec

    figures = {}
    with RedisServer(workdir=str(workdir)).start() as server:
        os.environ.update(CELERY_BROKER_URL=server.url, CELERY_RESULT_BACKEND=server.url, CLIPMASK_QUEUE="bench")
        client = redis.Redis.from_url(server.url)
        for name, concurrency in (("sequential", 1), ("parallel", None)):
            options = {} if concurrency is None else {"list_concurrency": concurrency}

            def opened(url, options=options, **more):
                return open_store(url, **options, **more) if str(url).startswith("s3://") else open_store(url, **more)

            seconds = float("inf")
            for attempt in range(repeat):  # best of ``repeat``, as the listings
                client.flushall()
                planning.open_store, dest = opened, workdir / f"plans-{name}-{attempt}"
                try:
                    started = time.perf_counter()
                    job_id = planning.submit_job(f"s3://{bucket}/{root}", str(dest), MaskSpec(prompts=("cat",)),
                                                 chunk_size=chunk)
                    seconds = min(seconds, time.perf_counter() - started)
                finally:
                    planning.open_store = open_store
            planned = json.loads((dest / "_jobs" / job_id / "planned.json").read_text())
            if planned["total"] != n:
                raise RuntimeError(f"planned {planned['total']} keys of {n}")
            figures[name] = {"s": round(seconds, 2), "keys_per_s": round(n / seconds), "chunks": planned["chunks"]}
            print(f"  planning (submit_job until planned, chunks of {chunk}), {name:10} {seconds:6.2f}s "
                  f"{n / seconds:>10,.0f} keys/s", flush=True)
    return figures


# --- incremental scans --------------------------------------------------------------------

#: Every NEW_EVERY-th key has no outputs yet (1% new); every CHANGED_EVERY-th key, offset by one,
#: was modified after its record (0.1% changed).
NEW_EVERY, CHANGED_EVERY = 100, 1000
OUTPUT_SUFFIXES = (".mask.png", ".raw.png", ".json")


def is_new(i: int) -> bool:
    return i % NEW_EVERY == 0


def is_changed(i: int) -> bool:
    return i % CHANGED_EVERY == 1


def make_outputs(n: int) -> Path:
    """The outputs of ``make_source(n)``'s keys but the new ones, made once, after the source."""
    return make_files(f"outputs-{n}", n, lambda i: () if is_new(i) else [f"k{i:08d}.jpg{suffix}" for suffix in
                                                                        OUTPUT_SUFFIXES], f"the outputs of {n} files")


def source_path(source: Path, i: int) -> Path:
    return source / f"s{i // 1000:05d}" / f"k{i:08d}.jpg"


def listed_both(source_url: str, dest_url: str, details: bool = True) -> float:
    """Seconds to list the source's and the destination's keys one after the other, with each
    key's details (size, modification time) read: a ``stat`` a file on a local disk, in the
    answer on S3; or the names alone."""
    from storage import open_store

    started = time.perf_counter()
    for url in (source_url, dest_url):
        store = open_store(url)
        if details:
            for entry in store.list_entries():
                entry.modified  # noqa: B018 - what a scan of the folder must know of each file
        else:
            for _ in store.list():
                pass
    return time.perf_counter() - started


def bench_incremental_local(n: int, workdir: Path) -> dict:
    """``clipmask submit --skip-existing`` over N local keys with their outputs in place, against a
    full submit of the same keys."""
    import shutil

    source, outputs = make_source(n), make_outputs(n)
    changed = [source_path(source, i) for i in range(n) if is_changed(i)]
    expected = sum(1 for i in range(n) if is_new(i) or is_changed(i))
    figures: dict = {"keys": n, "new": sum(1 for i in range(n) if is_new(i)), "changed": len(changed)}
    later = time.time() + 3600  # modified after any record
    originals = {path: path.stat().st_mtime for path in changed}
    with RedisServer(workdir=str(workdir)).start() as server:
        env = {**os.environ, "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url,
               "CLIPMASK_QUEUE": "bench"}
        client = redis.Redis.from_url(server.url)
        try:
            for path in changed:
                os.utime(path, (later, later))
            seconds, rss, _ = run_measured([CLIPMASK, "submit", str(source), "--out", str(workdir / "full"),
                                            "--prompt", "cat"], env)
            figures.update(full_submit_s=round(seconds, 1), full_submit_rss_mb=rss)
            print(f"  full submit: {seconds:.1f}s, {rss} MB", flush=True)
            client.flushall()
            figures["names_listing_s"] = round(listed_both(str(source), str(outputs), details=False), 1)
            figures["listing_s"] = round(listed_both(str(source), str(outputs)), 1)
            print(f"  both listings: {figures['names_listing_s']}s for the names, {figures['listing_s']}s with "
                  "each file's size and mtime (a stat each)", flush=True)
            seconds, rss, out = run_measured([CLIPMASK, "submit", str(source), "--out", str(outputs),
                                              "--prompt", "cat", "--skip-existing"], env)
            job_id = out.strip().splitlines()[-1]
            planned = json.loads((outputs / "_jobs" / job_id / "planned.json").read_text())
            if planned["total"] != expected or planned["up_to_date"] != n - expected:
                raise RuntimeError(f"planned {planned}, expected {expected} of {n}")
            figures.update(incremental_submit_s=round(seconds, 1), incremental_submit_rss_mb=rss,
                           planned=planned["total"], up_to_date=planned["up_to_date"])
            bound = figures["full_submit_s"] / 5 + figures["listing_s"]
            figures["incremental_bound_s"] = round(bound, 1)
            print(f"  incremental submit: {seconds:.1f}s, {rss} MB, {planned['total']:,} planned, "
                  f"{planned['up_to_date']:,} up to date; limit full / 5 + listings = {bound:.1f}s "
                  f"{'PASS' if seconds <= bound else 'MISS'}; RSS {verdict('submit_peak_rss_mb', rss)}", flush=True)
        finally:
            for path, mtime in originals.items():
                os.utime(path, (mtime, mtime))
            shutil.rmtree(outputs / "_jobs", ignore_errors=True)
    return figures


def bench_incremental_s3(n: int, workdir: Path, rtt_ms: float) -> dict:
    """The same on S3 (``s3_lite``: moto takes minutes to hold 4 x 10^5 objects), with the requests
    it served by method; then a scan with nothing new."""
    from s3_lite import LiteServer

    keys = [f"in/s{i // 1000:05d}/k{i:08d}.jpg" for i in range(n)]
    outputs = [f"out/s{i // 1000:05d}/k{i:08d}.jpg{suffix}" for i in range(n) if not is_new(i)
               for suffix in OUTPUT_SUFFIXES]
    figures: dict = {"keys": n, "output_keys": len(outputs), "rtt_ms": rtt_ms}
    server = LiteServer(rtt_ms)
    try:
        fill_lite(server, "bench-incremental", keys)
        time.sleep(0.01)
        fill_lite(server, "bench-incremental", outputs)
        time.sleep(0.01)
        fill_lite(server, "bench-incremental", [key for i, key in enumerate(keys) if is_changed(i)])
        with RedisServer(workdir=str(workdir)).start() as redis_server:
            env = {**os.environ, "CELERY_BROKER_URL": redis_server.url, "CELERY_RESULT_BACKEND": redis_server.url,
                   "CLIPMASK_QUEUE": "bench", "AWS_ENDPOINT_URL_S3": server.endpoint,
                   "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            src, dst = "s3://bench-incremental/in/", "s3://bench-incremental/out/"
            server.stats(reset=True)
            seconds, rss, _ = run_measured([CLIPMASK, "submit", src, "--out", dst, "--prompt", "cat",
                                            "--skip-existing"], env)
            counts = server.stats(reset=True)["counts"]
            lists = counts.get("LIST", 0)
            bound = 1.1 * (n + len(outputs)) / 1000
            figures.update(incremental_submit_s=round(seconds, 1), incremental_submit_rss_mb=rss, requests=counts,
                           list_bound=round(bound))
            print(f"  S3, {n:,} keys and {len(outputs):,} outputs: incremental submit {seconds:.1f}s, {rss} MB; "
                  f"requests {counts}; LIST {lists} (limit <= {bound:.0f}: {'PASS' if lists <= bound else 'MISS'})",
                  flush=True)
            # Nothing new: every image given a record newer than it
            fill_lite(server, "bench-incremental", [f"out/{key[3:]}.json" for i, key in enumerate(keys)
                                                    if is_new(i) or is_changed(i)])
            os.environ.update({name: value for name, value in env.items() if name.startswith("AWS_")})
            listing = listed_both(src, dst)
            server.stats(reset=True)
            seconds, _, _ = run_measured([CLIPMASK, "submit", src, "--out", dst, "--prompt", "cat",
                                          "--skip-existing"], env)
            counts = server.stats(reset=True)["counts"]
            figures.update(nothing_new_s=round(seconds, 1), nothing_new_listing_s=round(listing, 1),
                           nothing_new_requests=counts)
            print(f"  nothing new: submit {seconds:.1f}s (start-up included) against {listing:.1f}s for the two "
                  f"listings in-process; requests {counts}", flush=True)
    finally:
        server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--small-chunk", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None,
                        help="where the figures go (default bench/results/jobs.json, with --listing listing.json)")
    parser.add_argument("--listing", action="store_true", help="measure S3 listing at a round trip instead")
    parser.add_argument("--listing-keys", type=int, default=100_000)
    parser.add_argument("--listing-prefixes", type=int, default=16)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--incremental", action="store_true",
                        help="measure scans of what is new (--skip-existing) instead")
    parser.add_argument("--incremental-keys", type=int, default=1_000_000, help="local keys (default 10^6)")
    parser.add_argument("--incremental-s3-keys", type=int, default=100_000, help="S3 keys (default 10^5)")
    args = parser.parse_args()
    if args.incremental:
        with tempfile.TemporaryDirectory(prefix="clipmask-bench-incremental-") as tmp:
            print(f"local folder, {args.incremental_keys:,} keys, 1% new, 0.1% changed", flush=True)
            figures = {"local": bench_incremental_local(args.incremental_keys, Path(tmp))}
            print(f"S3 (s3_lite), {args.incremental_s3_keys:,} keys, 1% new, 0.1% changed, {args.rtt_ms:g} ms a "
                  "request", flush=True)
            figures["s3"] = bench_incremental_s3(args.incremental_s3_keys, Path(tmp), args.rtt_ms)
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {' '.join(sys.argv)}")
        path = args.json or BENCH_DIR / "results" / "incremental.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        return
    if args.listing:
        with tempfile.TemporaryDirectory(prefix="clipmask-bench-listing-") as tmp:
            figures = bench_listing(args.listing_keys, args.listing_prefixes, args.rtt_ms, args.repeat,
                                    args.chunk_size, Path(tmp))
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {' '.join(sys.argv)}")
        path = args.json or BENCH_DIR / "results" / "listing.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        return
    args.json = args.json or BENCH_DIR / "results" / "jobs.json"
    model = BENCH_DIR / ".cache" / "tiny"
    if not (model / "config.json").exists():
        subprocess.run([PYTHON, "-m", "worker.random_model", str(model), "--shape", "tiny"], cwd=REPO, check=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="clipmask-bench-jobs-") as tmp:
        for n in args.sizes:
            print(f"N = {n:,}", flush=True)
            results.append(bench_size(n, args.chunk_size, args.small_chunk, str(model), Path(tmp)))
    names = [name for name in results[0] if name not in ("keys",)]
    print(f"\n{'figure':34}" + "".join(f"{r['keys']:>14,}" for r in results) + "  limit")
    for name in names:
        values = [r[name] for r in results]
        print(f"{name:34}" + "".join(f"{v:>14,}" for v in values) + "  " + verdict(name, max(values) if
              LIMITS.get(name, ("<=",))[0] != ">=" else min(values)))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {' '.join(sys.argv)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
