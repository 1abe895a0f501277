"""Shards against files: the same images masked as WebDataset shards and as one object each, over S3.

The host side of ``clipmask run`` with the device stubbed out, as in ``bench_feed.py`` (a
STAND-IN returns ready masks; JPEG headers only are parsed), over ``bench/s3_lite.py`` (objects in
memory, a process of its own; moto would be the bottleneck at these counts), with a round trip
added to every request. The same ``--images`` JPEGs are stored twice: as ``--shards`` WebDataset
shards (``{00000..N}.tar``, each sample a ``.jpg`` and a ``.json`` as img2dataset writes them),
and as one object per image. For each round trip (``--rtt-ms``, default 0 and 100), both are
masked: files by ``run_local`` (what ``clipmask run`` does with a prefix of images), shards by
``run_local_shards``. Printed for each:

- images per second, and shards against files in the same run;
- requests per image, by kind (GET, PUT, POST for multipart uploads, LIST, ...), counted by the
  server (targets: <= 0.05 for shards, against about 4 for files);
- the process's peak resident memory above its level before the run, sampled every 20 ms
  (shards are masked one at a time: this is the memory of one shard in flight);
- at each round trip, the rate against the first round trip's (target for shards at 100 ms: >=
  0.9, a shard being one long stream).

Usage: .venv/bin/python bench/bench_shards.py [--images 100000] [--shards 100] [--side 256]
       [--rtt-ms 0 100] [--modes files shards]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_feed import StubDevice  # noqa: E402
from bench_host import NEGATIVE, PROMPT, make_jpeg, standin_logits  # noqa: E402
from s3_lite import LiteServer  # noqa: E402

from storage import open_store  # noqa: E402
from tasks.pipeline.local import run_local, run_local_shards  # noqa: E402
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
    parser.add_argument("--modes", nargs="+", choices=("files", "shards"), default=["files", "shards"])
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


def store_inputs(args: argparse.Namespace, jpegs: list[bytes]) -> None:
    """The images as files under ``src/`` and as shards under ``shards/``, at no round trip."""
    files, shards = open_store(f"s3://{BUCKET}/src/"), open_store(f"s3://{BUCKET}/shards/")
    per_shard = -(-args.images // args.shards)
    with ThreadPoolExecutor(64) as pool:
        if "files" in args.modes:
            list(pool.map(lambda i: files.write_bytes(f"{i:09d}.jpg", jpegs[i % len(jpegs)]), range(args.images)))
        if "shards" in args.modes:
            starts = range(0, args.images, per_shard)
            list(pool.map(lambda first: shards.write_bytes(
                f"{first // per_shard:05d}.tar", shard_bytes(first, min(per_shard, args.images - first), jpegs)),
                starts))


def measure(mode: str, server: LiteServer, spec: MaskSpec, engine: StubDevice, run: int) -> dict:
    out = f"s3://{BUCKET}-out{run}/"
    server.control("/_drop", {"bucket": f"{BUCKET}-out{run - 1}"})  # the last run's outputs: memory back
    boto3.client("s3").create_bucket(Bucket=f"{BUCKET}-out{run}")
    server.stats(reset=True)
    rss, cpu, wall = PeakRss(), time.process_time(), time.perf_counter()
    if mode == "files":
        summary = run_local(open_store(f"s3://{BUCKET}/src/"), open_store(out), spec, engine, progress=False)
    else:
        summary = run_local_shards(find_shards(f"s3://{BUCKET}/shards/"), open_store(out), spec, engine,
                                   progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss.stop()
    images = summary["succeeded"]
    counts = server.stats()["counts"]
    return {"images": images, "failed": summary["failed"], "rate": images / wall, "cpu_ms": cpu / images * 1e3,
            "peak_mb": peak, "requests": {kind: n / images for kind, n in sorted(counts.items())}}


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    server = LiteServer(0)
    try:
        from tests.services import s3_test_env

        os.environ.update(s3_test_env(server.endpoint))
        engine = StubDevice.load(str(build_random_clipseg(work / "tiny", shape="tiny")), device="cpu",
                                 batch_size=32, device_decode=True)
        spec = MaskSpec.from_text(PROMPT, NEGATIVE)
        rendered = postprocess.render(standin_logits("smooth", 0), spec, (args.side, args.side))
        engine.masks = (rendered.raw_pixels.numpy(), rendered.binary_pixels.numpy())
        jpegs = [make_jpeg(args.side, args.side, i) for i in range(16)]
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        started = time.perf_counter()
        store_inputs(args, jpegs)
        heap.for_pipelines()  # as `clipmask run` does once its model is loaded
        print(f"{args.images} {args.side}x{args.side} JPEGs ({len(jpegs[0]) // 1024} KB), as files and in "
              f"{args.shards} WebDataset shards, stored in {time.perf_counter() - started:.0f} s; device STAND-IN; "
              f"s3_lite; {os.cpu_count()} cores")
        print(f"{'rtt ms':>6} {'mode':>6} {'img/s':>7} {'x files':>7} {'x 0 ms':>7} {'CPU ms/img':>10} "
              f"{'peak MB':>8}  requests per image")
        first: dict[str, float] = {}
        run = 0
        for rtt in args.rtt_ms:
            server.control("/_rtt", {"rtt_ms": rtt})
            rates = {}
            for mode in args.modes:
                run += 1
                figures = measure(mode, server, spec, engine, run)
                rates[mode] = figures["rate"]
                first.setdefault(mode, figures["rate"])
                against_files = f"{figures['rate'] / rates['files']:7.2f}" if "files" in rates else f"{'':>7}"
                requests = ", ".join(f"{kind} {n:.4f}" for kind, n in figures["requests"].items())
                print(f"{rtt:6g} {mode:>6} {figures['rate']:7.0f} {against_files} "
                      f"{figures['rate'] / first[mode]:7.2f} {figures['cpu_ms']:10.2f} {figures['peak_mb']:8.0f}  "
                      f"{sum(figures['requests'].values()):.4f} ({requests})"
                      + (f"; {figures['failed']} FAILED" if figures["failed"] else ""), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
