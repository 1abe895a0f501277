"""Shards against files: the same images masked as WebDataset shards and as one object each, over S3.

The host side of ``clipmask run`` with the device stubbed out, as in ``bench_feed.py`` (a
STAND-IN returns ready masks; JPEG headers only are parsed), over ``bench/s3_lite.py`` (objects in
memory, a process of its own; moto would be the bottleneck at these counts), with a round trip
added to every request. The same ``--images`` JPEGs are stored as ``--shards`` WebDataset shards
(``{00000..N}.tar``, each sample a ``.jpg`` and a ``.json`` as img2dataset writes them), as one
object per image and, for mode ``worker``, as the same number of Parquet shards (``{00000..N}.parquet``,
columns ``key``, ``jpg`` and ``json``, written by ``pyarrow.parquet.write_table`` without
dictionary encoding: one row group per shard, or ``--row-group`` rows). For each round trip
(``--rtt-ms``, default 0 and 100), each mode (``--modes``) is masked:

- ``files`` by ``run_local`` (what ``clipmask run`` does with a prefix of images);
- ``shards`` by ``run_local_shards`` (``clipmask run`` over the tar shards, ``SHARDS_IN_FLIGHT``
  of them at a time);
- ``worker``: what one Celery worker process does with a shard job, twice (``worker tar``: tar
  shards into tar shards; ``worker parquet``: Parquet into Parquet): the shards one chunk at a time,
  each by ``mask_shard_chunk`` as the shard task calls it (``tasks/masks.py``: the job's source and
  DST stores opened for the chunk, the same spec, the shard's manifest rows made), with the same
  device STAND-IN. A worker process takes up to ``--tasks`` chunks at once (default 8), each on a
  thread of its own: ``--worker-tasks`` of them here (default 1: one shard in flight, so its memory
  is the worker's per shard in flight; more, to see the round trips of several shards overlap).

Each mode runs in a fresh process of its own, its S3 clients made and its garbage collector set
before the run (as a process of ``clipmask run`` or ``clipmask worker`` has them once started), so
that its peak memory is its own: in one process, memory an earlier run freed and the process kept
would be reused without growing it.

Printed for each:

- images per second, and shards against files in the same run;
- requests per image, by kind (GET, PUT, POST for multipart uploads, LIST, ...), counted by the
  server (targets: <= 0.05 for shards, against about 4 for files);
- the process's peak resident memory above its level before the run (``peak MB``), sampled every
  20 ms, and that per shard in flight (``MB/shard``): ``run_local_shards`` has ``SHARDS_IN_FLIGHT``
  shards in flight, so its peak over that; a worker's over ``--worker-tasks`` (with one, the
  product's "peak worker memory per shard in flight");
- the temporary disk a shard in flight takes (``disk MB``): a Parquet shard read from S3 is first
  copied whole to an unnamed temporary file (``tasks/shards/parquet.py``: pyarrow needs to seek to
  its footer), so the largest input shard's size; a tar shard is read as it arrives, none;
- at each round trip, the rate against the first round trip's (target for shards at 100 ms: >=
  0.9, a shard being one long stream).

Usage: .venv/bin/python bench/bench_shards.py [--images 100000] [--shards 100] [--side 256]
       [--rtt-ms 0 100] [--modes files shards worker] [--row-group ROWS] [--worker-tasks 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_feed import StubDevice  # noqa: E402
from bench_host import NEGATIVE, PROMPT, make_jpeg, standin_logits  # noqa: E402
from s3_lite import LiteServer  # noqa: E402

from storage import open_store  # noqa: E402
from tasks.pipeline.local import SHARDS_IN_FLIGHT, run_local, run_local_shards  # noqa: E402
from tasks.pipeline.shard_chunk import mask_shard_chunk  # noqa: E402
from tasks.shards.names import find_shards  # noqa: E402
from worker import heap, postprocess  # noqa: E402
from worker.random_model import build_random_clipseg  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

BUCKET = "bench-shards"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="images in all (default 100000)")
    parser.add_argument("--shards", type=int, default=100, help="shards they are stored in (default 100)")
    parser.add_argument("--side", type=int, default=256, help="side of the square JPEGs, px (default 256)")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 100], help="round trips (default 0 100)")
    parser.add_argument("--modes", nargs="+", choices=("files", "shards", "worker"),
                        default=["files", "shards", "worker"])
    parser.add_argument("--row-group", type=int, default=None,
                        help="rows per row group of the Parquet shards (default: pyarrow's, one per shard)")
    parser.add_argument("--worker-tasks", type=int, default=1,
                        help="chunks a worker masks at once, each on its own thread (default 1)")
    parser.add_argument("--masking-process", action="store_true", help=argparse.SUPPRESS)  # a mode's process
    return parser.parse_args()


class PeakRss:
    """The process's resident memory, sampled every 20 ms in a thread: ``stop()`` returns the
    peak above the level at ``start``, in MB."""

    def __init__(self) -> None:
        self._stop, self.peak = threading.Event(), 0
        self._base = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(0, self.peak - self._base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_bytes(first: int, count: int, jpegs: list[bytes]) -> bytes:
    """A WebDataset shard of ``count`` samples numbered from ``first``: ``.jpg`` and ``.json``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(first, first + count):
            key = f"{index:09d}"
            for name, data in ((f"{key}.jpg", jpegs[index % len(jpegs)]),
                               (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(first: int, count: int, jpegs: list[bytes], row_group: int | None) -> bytes:
    """A Parquet shard of the same samples: columns ``key``, ``jpg`` and ``json``."""
    keys = [f"{index:09d}" for index in range(first, first + count)]
    table = pa.table({"key": keys,
                      "jpg": pa.array([jpegs[index % len(jpegs)] for index in range(first, first + count)],
                                      pa.binary()),
                      "json": [json.dumps({"key": key}) for key in keys]})
    buffer = io.BytesIO()
    # no dictionary: the 16 JPEGs repeated would be stored once each, where a dataset's images are all different
    pq.write_table(table, buffer, row_group_size=row_group, use_dictionary=False)
    return buffer.getvalue()


def store_inputs(args: argparse.Namespace, jpegs: list[bytes]) -> int:
    """The images as files under ``src/``, as tar shards under ``shards/`` and as Parquet shards
    under ``parquet/``, those the modes mask, at no round trip; returns the largest Parquet
    shard's size in bytes."""
    files, shards = open_store(f"s3://{BUCKET}/src/"), open_store(f"s3://{BUCKET}/shards/")
    parquet = open_store(f"s3://{BUCKET}/parquet/")
    per_shard = -(-args.images // args.shards)
    starts = range(0, args.images, per_shard)

    def store_parquet(first: int) -> int:
        data = parquet_bytes(first, min(per_shard, args.images - first), jpegs, args.row_group)
        parquet.write_bytes(f"{first // per_shard:05d}.parquet", data)
        return len(data)

    with ThreadPoolExecutor(64) as pool:
        if "files" in args.modes:
            list(pool.map(lambda i: files.write_bytes(f"{i:09d}.jpg", jpegs[i % len(jpegs)]), range(args.images)))
        if "shards" in args.modes or "worker" in args.modes:
            list(pool.map(lambda first: shards.write_bytes(
                f"{first // per_shard:05d}.tar", shard_bytes(first, min(per_shard, args.images - first), jpegs)),
                starts))
        if "worker" in args.modes:
            return max(pool.map(store_parquet, starts))
    return 0


def stub_engine(model: Path, side: int) -> StubDevice:
    """The device STAND-IN, its masks those of a smooth stand-in at ``side`` px."""
    engine = StubDevice.load(str(model), device="cpu", batch_size=32, device_decode=True)
    rendered = postprocess.render(standin_logits("smooth", 0), MaskSpec.from_text(PROMPT, NEGATIVE), (side, side))
    engine.masks = (rendered.raw_pixels.numpy(), rendered.binary_pixels.numpy())
    return engine


def measure(mode: str, server: LiteServer, run: int, model: Path, side: int, worker_tasks: int = 1) -> dict:
    """One mode at the current round trip, in a fresh process (``masking_process``)."""
    out = f"s3://{BUCKET}-out{run}/"
    server.control("/_drop", {"bucket": f"{BUCKET}-out{run - 1}"})  # the last run's outputs: memory back
    boto3.client("s3").create_bucket(Bucket=f"{BUCKET}-out{run}")
    source = {"files": "src", "shards": "shards", "worker tar": "shards", "worker parquet": "parquet"}[mode]
    job = {"mode": mode, "model": str(model), "side": side, "source": f"s3://{BUCKET}/{source}/", "dest": out,
           "worker_tasks": worker_tasks}
    server.stats(reset=True)
    process = subprocess.run([sys.executable, __file__, "--masking-process"], input=json.dumps(job),
                             capture_output=True, text=True)
    if process.returncode:
        raise RuntimeError(f"{mode}: the masking process exited with {process.returncode}:\n{process.stderr}")
    figures = json.loads(process.stdout.splitlines()[-1])
    counts = server.stats()["counts"]
    return {**figures, "requests": {kind: n / figures["images"] for kind, n in sorted(counts.items())}}


def masking_process() -> None:
    """The process that masks one mode: the job on stdin (``mode``, ``model``, ``side``,
    ``source``, ``dest``); prints its figures as JSON. Before the run, as a process of
    ``clipmask run`` or ``clipmask worker`` is once started: the engine loaded, the S3 clients
    made (they are kept for life) and the garbage collector set."""
    job = json.loads(sys.stdin.read())
    engine = stub_engine(Path(job["model"]), job["side"])
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    for url in (job["source"], job["dest"]):
        store = open_store(url)
        store._s3(), store._data(url)
    heap.for_pipelines()
    rss, cpu, wall = PeakRss(), time.process_time(), time.perf_counter()
    if job["mode"] == "files":
        summary = run_local(open_store(job["source"]), open_store(job["dest"]), spec, engine, progress=False)
    elif job["mode"] == "shards":
        summary = run_local_shards(find_shards(job["source"]), open_store(job["dest"]), spec, engine, progress=False)
    else:
        summary = worker_chunks(engine, spec, job["source"], job["dest"], job["worker_tasks"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss.stop()
    images = summary["succeeded"]
    print(json.dumps({"images": images, "failed": summary["failed"], "rate": images / wall,
                      "cpu_ms": cpu / images * 1e3, "peak_mb": peak}))


def worker_chunks(engine: StubDevice, spec: MaskSpec, source_url: str, dest_url: str, tasks: int = 1) -> Counter:
    """Every shard of ``source_url`` masked into ``dest_url``, ``tasks`` chunks at a time on as many
    threads (a worker's threads pool), each as the shard task masks its chunk (``tasks/masks.py``,
    ``_run_shard_chunk``: the shard's rows made from its result); the samples' statuses (a shard
    that failed: its samples failed)."""
    def chunk(numbered: tuple[int, str]) -> list[str]:
        number, key = numbered
        source, dest = open_store(source_url), open_store(dest_url)  # the job's stores, opened by each chunk
        result, _errors = mask_shard_chunk(engine, spec, source, key, dest, f"job bench chunk {number} task bench")
        return [row["status"] for row in result.rows()]

    statuses: Counter = Counter()
    with ThreadPoolExecutor(tasks, thread_name_prefix="bench-task") as pool:
        for done in pool.map(chunk, enumerate(find_shards(source_url).keys())):
            statuses.update(done)
    return statuses


def main() -> None:
    args = parse_args()
    if args.masking_process:
        masking_process()
        return
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    server = LiteServer(0)
    try:
        from tests.services import s3_test_env

        os.environ.update(s3_test_env(server.endpoint))
        model = build_random_clipseg(work / "tiny", shape="tiny")
        jpegs = [make_jpeg(args.side, args.side, i) for i in range(16)]
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        spool = store_inputs(args, jpegs)
        print(f"{args.images} {args.side}x{args.side} JPEGs ({len(jpegs[0]) // 1024} KB), as files and in "
              f"{args.shards} WebDataset shards ({-(-args.images // args.shards)} images each)"
              f"{' and the same number of Parquet shards' if 'worker' in args.modes else ''}, stored in "
              f"{time.perf_counter() - started:.0f} s; device STAND-IN; s3_lite; {os.cpu_count()} cores")
        print(f"{'rtt ms':>6} {'mode':>14} {'img/s':>7} {'x files':>7} {'x 0 ms':>7} {'CPU ms/img':>10} "
              f"{'peak MB':>8} {'MB/shard':>8} {'disk MB':>7}  requests per image")
        modes = [part for mode in args.modes
                 for part in (("worker tar", "worker parquet") if mode == "worker" else (mode,))]
        in_flight = {"shards": SHARDS_IN_FLIGHT, "worker tar": args.worker_tasks, "worker parquet": args.worker_tasks}
        disk = {"shards": 0, "worker tar": 0, "worker parquet": spool / 2**20}
        first: dict[str, float] = {}
        run = 0
        for rtt in args.rtt_ms:
            server.control("/_rtt", {"rtt_ms": rtt})
            rates = {}
            for mode in modes:
                run += 1
                figures = measure(mode, server, run, model, args.side, args.worker_tasks)
                rates[mode] = figures["rate"]
                first.setdefault(mode, figures["rate"])
                against_files = f"{figures['rate'] / rates['files']:7.2f}" if "files" in rates else f"{'':>7}"
                per_shard = f"{figures['peak_mb'] / in_flight[mode]:8.0f}" if mode in in_flight else f"{'':>8}"
                on_disk = f"{disk[mode]:7.0f}" if mode in disk else f"{'':>7}"
                requests = ", ".join(f"{kind} {n:.4f}" for kind, n in figures["requests"].items())
                print(f"{rtt:6g} {mode:>14} {figures['rate']:7.0f} {against_files} "
                      f"{figures['rate'] / first[mode]:7.2f} {figures['cpu_ms']:10.2f} {figures['peak_mb']:8.0f} "
                      f"{per_shard} {on_disk}  "
                      f"{sum(figures['requests'].values()):.4f} ({requests})"
                      + (f"; {figures['failed']} FAILED" if figures["failed"] else ""), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
