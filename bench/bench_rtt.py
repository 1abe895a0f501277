"""A real worker and ``clipmask run`` against S3 at a round trip: images/s at --rtt-ms against 0 ms.

Real S3 answers each request in 30-150 ms. clipmask's target: a worker, and ``clipmask run``, keep
at least 0.8 of their 0 ms images/s at a 150 ms round trip. Nothing here is stubbed: the real
engine on the tiny random CLIPSeg (``worker.random_model``, built into a temporary folder) on the
CPU (fp32, batch 4), the real ``clipmask`` commands as subprocesses, real Celery over a
redis-server of its own. S3 is ``bench/s3_lite.py`` (``LiteServer``: objects in memory, a process
of its own, that round trip added to every request), one server per round trip, each holding the
same ``--images`` 640x480 JPEGs (bench_host.py's photo stand-in, 16 distinct ones repeated, about
134 KB each) under ``s3://bench-rtt/src/``. On a 2-core machine the tiny model masks 50-100 of them
per second, so the default 1,200 make a run of 20+ s at 0 ms.

Per round trip, ``--repeat`` times, round trips and modes interleaved (the best run counts: the
shortest from model loaded, or submit, to the end):

1. ``clipmask run s3://bench-rtt/src/ --out s3://bench-rtt/run-.../ --device cpu --quiet`` (the
   model from ``CLIPMASK_MODEL``): images/s from process start to exit, and "net", from the moment
   its model was loaded to exit. That moment is the process's first request after its preflight
   (a listing, a probe written and deleted) in the server's counts, polled every ``--poll-s``
   (the preflight and the model load, 4-6 s here, left out; the CLI prints no timings and its
   summary's times are whole seconds).
2. A job of the same images through one real ``clipmask worker --device cpu`` (started once per
   round trip, as bench_worker.py starts it, with a redis-server of its own, and warmed up with a
   job of 8 images): images/s from the start of ``clipmask submit`` until the job's manifest is
   recorded in Redis (bench_worker.py's polling, every 0.1 s).
3. Each of the two again over 8 images: seconds (run: from model loaded), which are nearly all
   fixed costs; what the round trip adds to them, divided by the round trip, is how many requests
   every job waits for one after another.

Each measurement also polls the server's counts (``LiteServer.stats()``, the script's own polls
taken out) for a request timeline: "steady" is the images/s between 20% and 80% of the PUTs (3
PUTs per image: two PNGs, then the record), "start" where that steady line crosses zero images
(start-up: listing, probes, planning, the first round trips; a run's counted from its model loaded,
and with its reading ahead), "tail" the time from the steady line reaching all images to the end
(the last writes, manifest, summary). ``--timeline`` prints the counts second by second. CPU per
image is that of clipmask's processes (the run's with its model load, the worker's with submit)
and of the S3 server, from /proc and ``getrusage``.

Printed: per round trip, run and worker images/s and each against 0 ms (the first --rtt-ms) in
the same run (target >= 0.8), and the most requests the server had in flight (``max_in_flight``;
one of them can be the script's own stats request); then start, steady, tail and the 8-image jobs.
Options to try (passed to run and worker alike): ``--env CLIPMASK_S3_CONCURRENCY=800``,
``--chunk-size`` (submit's), ``--tasks`` (the worker's).

Usage: .venv/bin/python bench/bench_rtt.py [--rtt-ms 0 150] [--images 1200] [--repeat 2]
       [--chunk-size 64] [--tasks 8] [--modes run worker] [--timeline] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from bench_host import make_jpeg
from bench_jobs import wait_manifest
from s3_lite import LiteServer

from tests.services import RedisServer, s3_test_env
from worker.random_model import build_random_clipseg

CLIPMASK = str(REPO / ".venv" / "bin" / "clipmask")
PROMPT, NEGATIVE = "a person|a dog|a cat", "background"
BUCKET = "bench-rtt"
WARM_IMAGES = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 150],
                        help="round trips added to every request; the first is the base (default 0 150)")
    parser.add_argument("--images", type=int, default=1200, help="640x480 JPEGs per measurement (default 1200)")
    parser.add_argument("--repeat", type=int, default=2, help="measurements per round trip and mode; best counts")
    parser.add_argument("--modes", nargs="+", choices=("run", "worker"), default=["run", "worker"])
    parser.add_argument("--chunk-size", type=int, help="clipmask submit --chunk-size (default: clipmask's, 64)")
    parser.add_argument("--tasks", type=int, help="clipmask worker --tasks (default: clipmask's, 8)")
    parser.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="extra environment for run and worker, e.g. CLIPMASK_S3_CONCURRENCY=800")
    parser.add_argument("--poll-s", type=float, default=0.05, help="seconds between stats polls (default 0.05)")
    parser.add_argument("--timeline", action="store_true", help="print each measurement's requests second by second")
    return parser.parse_args()


class Timeline:
    """Polls ``server.stats()`` in a thread: ``samples`` of (seconds since start, counts) with the
    script's own stats GETs taken out."""

    def __init__(self, server: LiteServer, interval: float):
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, dict]] = []
        self.max_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self.server.stats(reset=True)
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        stats = self.server.stats()
        polls = len(self.samples) + 1  # every stats GET since the reset, this one included
        counts = dict(stats["counts"])
        counts["GET"] = counts.get("GET", 0) - polls
        self.samples.append((time.perf_counter() - self.started, counts))
        self.max_in_flight = stats["max_in_flight"]

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def when(self, test) -> float | None:
        """Seconds at the first sample whose counts pass ``test``."""
        return next((t for t, counts in self.samples if test(counts)), None)

    def shape(self, images: int, end: float) -> dict:
        """Steady images/s (20% to 80% of the PUTs), start (where that line crosses 0), tail."""
        total = self.samples[-1][1].get("PUT", 0)
        t20 = self.when(lambda c: c.get("PUT", 0) >= 0.2 * total)
        t80 = self.when(lambda c: c.get("PUT", 0) >= 0.8 * total)
        if t20 is None or t80 is None or t80 <= t20:
            return {"steady": float("nan"), "start": float("nan"), "tail": float("nan")}
        steady = 0.6 * images / (t80 - t20)
        start = t20 - 0.2 * images / steady
        return {"steady": steady, "start": start, "tail": end - (start + images / steady)}

    def print(self, label: str) -> None:
        print(f"    timeline of {label} (s: requests so far GET/LIST/PUT/DELETE/POST)")
        shown, line = -1.0, []
        for t, counts in self.samples:
            if t - shown >= 1.0 or (t, counts) == self.samples[-1]:
                shown = t
                line.append(f"{t:5.1f}: " + "/".join(str(counts.get(method, 0)) for method in
                                                      ("GET", "LIST", "PUT", "DELETE", "POST")))
        for at in range(0, len(line), 5):
            print("      " + "   ".join(line[at:at + 5]))


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    variables = s3_test_env(endpoint)
    return boto3.client("s3", endpoint_url=endpoint, region_name=variables["AWS_DEFAULT_REGION"],
                        aws_access_key_id=variables["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=variables["AWS_SECRET_ACCESS_KEY"],
                        config=Config(max_pool_connections=128))


def upload(client, prefix: str, count: int, jpegs: list[bytes]) -> None:
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=BUCKET, Key=f"{prefix}img_{i:05d}.jpg",
                                                  Body=jpegs[i % len(jpegs)]), range(count)))


def remove(client, prefix: str) -> None:
    """Delete everything under ``prefix`` (s3_lite keeps objects in memory)."""
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])]
    with ThreadPoolExecutor(128) as pool:
        list(pool.map(lambda key: client.delete_object(Bucket=BUCKET, Key=key), keys))


def read_json(client, key: str) -> dict:
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def session_cpu_s(sid: int, pid: int | None = None) -> float:
    """CPU seconds (user + system) of the live processes of session ``sid`` (or of process
    ``pid`` alone), from /proc."""
    total = 0.0
    for stat in [Path(f"/proc/{pid}/stat")] if pid else Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if pid or int(fields[3]) == sid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Side:
    """One round trip: its S3 server (images uploaded), redis-server and worker."""

    def __init__(self, rtt: float, args: argparse.Namespace, model: Path, jpegs: list[bytes], work: Path,
                 stack: contextlib.ExitStack):
        self.rtt, self.args = rtt, args
        self.server = LiteServer(rtt)
        stack.callback(self.server.stop)
        self.client = s3_client(self.server.endpoint)
        self.client.create_bucket(Bucket=BUCKET)
        upload(self.client, "src/", args.images, jpegs)
        upload(self.client, "warm/", WARM_IMAGES, jpegs)
        self.env = {**os.environ, **s3_test_env(self.server.endpoint), "CLIPMASK_MODEL": str(model),
                    "HF_HUB_OFFLINE": "1", "CLIPMASK_QUEUE": "bench-rtt",
                    **dict(item.split("=", 1) for item in args.env)}
        self.worker = None
        if "worker" in args.modes:
            folder = work / f"rtt-{rtt:g}"
            folder.mkdir()
            redis_server = RedisServer(workdir=str(folder)).start()
            stack.callback(redis_server.stop)
            self.env.update(CELERY_BROKER_URL=redis_server.url, CELERY_RESULT_BACKEND=redis_server.url)
            self.redis = redis.Redis.from_url(redis_server.url)
            log = stack.enter_context((folder / "worker.log").open("wb"))
            tasks = ["--tasks", str(args.tasks)] if args.tasks else []
            self.worker = subprocess.Popen([CLIPMASK, "worker", "--device", "cpu", *tasks, "--loglevel", "WARNING",
                                            "-n", f"rtt{rtt:g}@%h"], env=self.env, cwd=REPO, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(self.stop_worker)
            started = time.perf_counter()
            self.job("warm/", "warm-out/", WARM_IMAGES)  # up, model loaded, one job through
            print(f"  worker for {rtt:g} ms up and warm in {time.perf_counter() - started:.1f} s", flush=True)

    def stop_worker(self) -> None:
        if self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait(30)

    def job(self, src: str, out: str, images: int) -> float:
        """Seconds from the start of ``clipmask submit`` to the job's manifest in Redis."""
        chunk = ["--chunk-size", str(self.args.chunk_size)] if self.args.chunk_size else []
        started = time.perf_counter()
        result = subprocess.run([CLIPMASK, "submit", f"s3://{BUCKET}/{src}", "--out", f"s3://{BUCKET}/{out}",
                                 "--prompt", PROMPT, "--negative", NEGATIVE, *chunk],
                                env=self.env, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"clipmask submit failed:\n{result.stderr}")
        job_id = result.stdout.strip().splitlines()[-1]
        wait_manifest(self.redis, job_id, timeout=3600, interval=0.1)
        seconds = time.perf_counter() - started
        summary = read_json(self.client, f"{out}_jobs/{job_id}/summary.json")
        if summary["succeeded"] != images:
            sys.exit(f"job {job_id}: {summary}")
        return seconds

    def cpu_s(self) -> tuple[float, float, float]:
        """CPU seconds so far of this script's finished children (run, submit), of the worker's
        processes and of the S3 server."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (usage.ru_utime + usage.ru_stime, session_cpu_s(self.worker.pid) if self.worker else 0.0,
                session_cpu_s(0, self.server.process.pid))

    def measure(self, mode: str, src: str, images: int, out: str) -> dict:
        """``clipmask run`` (mode "run") or a job through the worker ("worker") over ``src``'s
        ``images`` images into ``out``, watched by a ``Timeline``; ``out`` is deleted after."""
        loaded = None
        cpu = self.cpu_s()
        with Timeline(self.server, self.args.poll_s) as timeline:
            if mode == "worker":
                seconds = self.job(src, out, images)
            else:
                started = time.perf_counter()
                result = subprocess.run([CLIPMASK, "run", f"s3://{BUCKET}/{src}", "--out", f"s3://{BUCKET}/{out}",
                                         "--prompt", PROMPT, "--negative", NEGATIVE, "--device", "cpu", "--quiet"],
                                        env=self.env, cwd=REPO, capture_output=True, text=True, check=False)
                seconds = time.perf_counter() - started
        children, worker, server = (after - before for after, before in zip(self.cpu_s(), cpu))
        client_cpu = children + worker if mode == "worker" else children  # run: only the run process
        if mode == "run":
            if result.returncode or f"{images} succeeded" not in result.stdout:
                sys.exit(f"clipmask run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
            # The model loads after the preflight (a listing, a probe written and deleted: over
            # within a second of the DELETE) and before the next request, the run's own listing.
            probe = timeline.when(lambda c: c.get("DELETE", 0) >= 1)
            preflight = next(sum(c.values()) for t, c in timeline.samples if t >= probe + 1.0)
            loaded = timeline.when(lambda c: c.get("DELETE", 0) >= 1 and sum(c.values()) > preflight)
        remove(self.client, out)
        shape = timeline.shape(images, seconds)
        shape["start"] -= loaded or 0.0  # a run's from its model loaded
        return {"mode": mode, "rtt": self.rtt, "images": images, "seconds": seconds, "rate": images / seconds,
                "loaded": loaded, "net_s": seconds - loaded if loaded is not None else seconds,
                "net": images / (seconds - loaded) if loaded is not None else None,
                "max_in_flight": timeline.max_in_flight, "counts": timeline.samples[-1][1],
                "client_ms": client_cpu / images * 1e3, "server_ms": server / images * 1e3,
                **shape, "timeline": timeline}


def describe(f: dict) -> str:
    counts = "/".join(str(f["counts"].get(m, 0)) for m in ("GET", "LIST", "PUT", "DELETE", "POST"))
    net = f" net {f['net']:6.2f} img/s (model loaded at {f['loaded']:.1f} s)," if f["net"] else ""
    idle = f" (idle workers: {f['idle_cpu']:.2f} s CPU meanwhile)" if f.get("idle_cpu") is not None else ""
    shape = (f" steady {f['steady']:6.2f} img/s, start {f['start']:4.1f} s, tail {f['tail']:4.1f} s;"
             if f["images"] > WARM_IMAGES else "")
    return (f"  {f['mode']:>6} {f['rtt']:5g} ms, {f['images']:4d} images: {f['seconds']:6.1f} s, "
            f"{f['rate']:6.2f} img/s,{net}{shape} requests GET/LIST/PUT/DELETE/POST {counts}, at most "
            f"{f['max_in_flight']} in flight; CPU ms/img: clipmask {f['client_ms']:.1f}, S3 server "
            f"{f['server_ms']:.1f}{idle}")


def main() -> None:
    args = parse_args()
    jpegs = [make_jpeg(640, 480, i) for i in range(16)]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"tiny random CLIPSeg on cpu (fp32), {args.images} 640x480 JPEGs (~{len(jpegs[0]) // 1000} KB), prompts "
          f"{PROMPT!r} - {NEGATIVE!r}; s3_lite at {' and '.join(f'{r:g}' for r in args.rtt_ms)} ms per request; "
          f"chunk size {args.chunk_size or 'default'}, worker tasks {args.tasks or 'default'}"
          + (f"; env {' '.join(args.env)}" if args.env else ""), flush=True)
    best: dict[tuple[str, float], dict] = {}  # the fastest of each (mode, round trip)
    small: dict[tuple[str, float], dict] = {}  # the fastest 8-image job of each
    with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        model = build_random_clipseg(work / "tiny", shape="tiny")
        sides = [Side(rtt, args, model, jpegs, work, stack) for rtt in args.rtt_ms]
        workers = [side.worker.pid for side in sides if side.worker is not None]
        for repeat in range(args.repeat):
            for mode in args.modes:
                for side in sides:
                    for src, images, kept in (("src/", args.images, best), ("warm/", WARM_IMAGES, small)):
                        cpu = sum(map(session_cpu_s, workers))
                        figures = side.measure(mode, src, images, f"{mode}-{repeat}-{images}/")
                        if mode == "run" and workers:
                            figures["idle_cpu"] = sum(map(session_cpu_s, workers)) - cpu
                        print(describe(figures), flush=True)
                        if args.timeline and kept is best:
                            figures["timeline"].print(f"{mode} at {side.rtt:g} ms")
                        key = (mode, side.rtt)
                        if key not in kept or figures["net_s"] < kept[key]["net_s"]:
                            kept[key] = figures
    report(args, best, small)


def report(args: argparse.Namespace, best: dict, small: dict) -> None:
    base = args.rtt_ms[0]
    ratio = lambda figures, field: figures[field] / best[(figures["mode"], base)][field]
    print(f"\nbest of {args.repeat}, same run; x = against {base:g} ms (target >= 0.8). run: images/s from process "
          "start to exit; net: from its model loaded (its first request after the preflight) to exit. "
          "worker: images/s from submit to the manifest")
    print(f"{'rtt ms':>7} {'run img/s':>10} {'x':>5} {'run net':>8} {'x':>5} {'worker img/s':>13} {'x':>5}"
          f" {'max in flight run/worker':>25}")
    for rtt in args.rtt_ms:
        run, job = best.get(("run", rtt)), best.get(("worker", rtt))
        cells = [f"{rtt:7g}"]
        cells += ([f"{run['rate']:10.2f}", f"{ratio(run, 'rate'):5.2f}", f"{run['net']:8.2f}", f"{ratio(run, 'net'):5.2f}"]
                  if run else [f"{'-':>10} {'':>5} {'-':>8} {'':>5}"])
        cells += [f"{job['rate']:13.2f}", f"{ratio(job, 'rate'):5.2f}"] if job else [f"{'-':>13} {'':>5}"]
        flight = "/".join(str(f["max_in_flight"]) if f else "-" for f in (run, job))
        print(" ".join(cells) + f" {flight:>25}")
    print(f"\nwhere the time goes (the same best runs): steady = images/s from 20% to 80% of the PUTs, start = where "
          f"that line crosses 0 images, tail = end - where it reaches all; {WARM_IMAGES}-image job = seconds of a "
          f"job of {WARM_IMAGES} images (run: from model loaded), best of {args.repeat}; its extra seconds over "
          f"{base:g} ms divided by the round trip = round trips one after another in every job")
    print(f"{'mode':>7} {'rtt ms':>7} {'seconds':>8} {'start s':>8} {'steady img/s':>13} {'x':>5} {'tail s':>7}"
          f" {'CPU ms/img':>11} {f'{WARM_IMAGES}-image job s':>17} {'round trips':>12}")
    for mode in args.modes:
        for rtt in args.rtt_ms:
            f, tiny = best[(mode, rtt)], small[(mode, rtt)]
            extra = (tiny["net_s"] - small[(mode, base)]["net_s"]) / ((rtt - base) / 1000) if rtt != base else None
            print(f"{mode:>7} {rtt:7g} {f['net_s']:8.1f} {f['start']:8.1f} {f['steady']:13.2f} {ratio(f, 'steady'):5.2f}"
                  f" {f['tail']:7.1f} {f['client_ms']:11.1f} {tiny['net_s']:17.2f} {'' if extra is None else f'{extra:.1f}':>12}")
    print("(seconds: run from model loaded to exit, worker from submit to manifest; CPU: clipmask's processes, "
          "the run's with its model load, the worker's with submit)")


if __name__ == "__main__":
    main()
