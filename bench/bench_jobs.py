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

Usage: .venv/bin/python bench/bench_jobs.py [--sizes 100000 1000000] [--small-chunk 8]
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


def make_source(n: int) -> Path:
    """N empty .jpg files, 1,000 per folder, made once and reused."""
    folder = BENCH_DIR / ".cache" / f"keys-{n}"
    stamp = folder / ".complete"
    if not stamp.exists():
        started = time.perf_counter()
        for i in range(n):
            shard = folder / f"s{i // 1000:05d}"
            if i % 1000 == 0:
                shard.mkdir(parents=True, exist_ok=True)
            (shard / f"k{i:08d}.jpg").touch()
        stamp.touch()
        print(f"  made {n} files in {time.perf_counter() - started:.0f}s", flush=True)
    return folder


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--small-chunk", type=int, default=8)
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "jobs.json")
    args = parser.parse_args()
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
