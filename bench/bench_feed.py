"""Can one worker process feed a GPU? The host side of ``clipmask run`` as on a GPU, device stubbed.

What a process does per image around a GPU: read the file (local folder or S3), parse its JPEG
header (the device decodes it: ``CLIPMASK_DEVICE_DECODE``), then, when the masks come back,
encode the two PNGs and write them and the metadata record, plus the manifest. Here the device
is a STAND-IN (``predict_prepared`` returns ready 640x480 mask pixels at once, no model, no
decode), so everything measured is the host's: ``run_local``, the code of ``clipmask run``, over
640x480 JPEGs, with the engine's pipeline and its threads as they are.

Printed per store (a local folder; S3 on a moto server started here, ``python -m moto.server``):
images per second on this machine, and the CPU time this process spent per image (``process_time``:
every thread, the kernel's part included; moto's own CPU is not counted, but it runs on the same
cores and slows the S3 wall-clock figure). With ``--gil`` (needs ``py-spy`` on PATH or in the
venv, and ptrace rights), the time per image some thread held the GIL, sampled by py-spy:
a process cannot go faster than 1000 / that many images per second, however many cores it has.
That ceiling, against a GPU's 2,000+ images per second, is what ``clipmask worker
--processes-per-device`` is for.

With ``--rtt-ms 0 30 100`` S3 is also served by ``s3_lite.py`` (objects in memory, a process of
its own that is not the bottleneck) with that round trip added to every request, as real S3 has:
images per second per round trip and against 0 ms, the most requests the server had in flight at
once, and the server's own CPU per request.

Usage: .venv/bin/python bench/bench_feed.py [--images 2000] [--s3-images 400] [--repeat 2] [--gil]
       [--rtt-ms 0 30 100] [--stores local s3 lite]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_host import NEGATIVE, PROMPT, make_jpeg, standin_logits  # noqa: E402
from sampling import GilSampler, py_spy, server_cpu_s  # noqa: E402

from storage import open_store  # noqa: E402
from tasks.jobs.preflight import check_run  # noqa: E402
from tasks.pipeline.local import run_local  # noqa: E402
from worker import heap, postprocess  # noqa: E402
from worker.engine import MaskEngine  # noqa: E402
from worker.random_model import build_random_clipseg  # noqa: E402
from worker.result import MaskResult  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

SIZE = (640, 480)
BUCKET = "bench-feed"


class StubDevice(MaskEngine):
    """STAND-IN for the GPU: ready mask pixels for every image, no model and no decode."""

    masks: tuple = ()
    fed: list = []  # (time, images) of every batch it was given

    def predict_prepared(self, items, spec):
        self.fed.append((time.perf_counter(), len(items)))
        raw, binary = self.masks
        return [MaskResult(raw_pixels={spec.raw_bits: raw.copy()}, binary_pixels=binary.copy()) for _ in items]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images per run, local folder")
    parser.add_argument("--s3-images", type=int, default=400, help="images per run, S3 (moto is slow)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per store; the best counts")
    parser.add_argument("--gil", action="store_true", help="also sample GIL-held time with py-spy")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 30, 100],
                        help="round trips added by s3_lite to every request (store 'lite')")
    parser.add_argument("--stores", nargs="+", choices=("local", "s3", "lite"), default=["local", "s3", "lite"],
                        help="local folder, moto, s3_lite at each --rtt-ms")
    return parser.parse_args()


def measure(source: str, dest: str, spec: MaskSpec, engine: MaskEngine, gil: bool, work: Path) -> dict:
    spy = GilSampler(work / "gil.txt").start() if gil else None
    engine.fed = []
    cpu, wall = time.process_time(), time.perf_counter()
    stores = check_run(source, dest)  # what `clipmask run` does before it loads the model
    summary = run_local(*stores[:2], spec, engine, total=stores[2], progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    images = summary["succeeded"]
    figures = {"images": images, "rate": images / wall, "cpu_ms": cpu / images * 1e3, "steady": steady_rate(engine.fed)}
    if spy is not None:
        figures["gil_ms"] = spy.stop() / images * 1e3
    return figures


def steady_rate(fed: list[tuple[float, int]]) -> float:
    """Images per second the device was given between its 10th and 90th percentile image: the
    rate once the pipeline is full, without its first read and last write (a round trip or three
    each, which a short run at 100 ms feels and a long one does not)."""
    total, done, marks = sum(n for _, n in fed), 0, []
    for when, n in fed:
        done += n
        marks.append((when, done))
    first = next((when, n) for when, n in marks if n >= total * 0.1)
    last = next((when, n) for when, n in marks if n >= total * 0.9)
    return (last[1] - first[1]) / max(1e-9, last[0] - first[0])


def upload(store, count: int, jpegs: list[bytes]) -> None:
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda i: store.write_bytes(f"{i:05d}.jpg", jpegs[i % len(jpegs)]), range(count)))


def report(name: str, runs: list[dict], gil: bool, extra: str = "") -> dict:
    best = max(runs, key=lambda figures: figures["rate"])
    line = (f"{name:>14} {best['images']:7d} {best['rate']:7.0f} {max(r['steady'] for r in runs):7.0f} "
            f"{min(r['cpu_ms'] for r in runs):11.2f}")
    if gil:
        held = min(r["gil_ms"] for r in runs)
        line += f" {held:11.2f} {1000 / held:22.0f}"
    print(line + extra, flush=True)
    return best


def main() -> None:
    args = parse_args()
    if args.gil and py_spy() is None:
        sys.exit("--gil needs py-spy: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    from s3_lite import LiteServer

    from tests.services import MotoServer, s3_test_env  # the tests' own moto server helpers

    moto = MotoServer(workdir=str(work)).start() if "s3" in args.stores else None
    try:
        import boto3

        engine = StubDevice.load(str(build_random_clipseg(work / "tiny", shape="tiny")), device="cpu",
                                 batch_size=32, device_decode=True)  # the processor only; headers parsed
        spec = MaskSpec.from_text(PROMPT, NEGATIVE)
        rendered = postprocess.render(standin_logits("smooth", 0), spec, (SIZE[1], SIZE[0]))
        engine.masks = (rendered.raw_pixels.numpy(), rendered.binary_pixels.numpy())
        jpegs = [make_jpeg(*SIZE, i) for i in range(16)]
        heap.for_pipelines()  # as `clipmask run` does once its model is loaded
        print(f"host side of clipmask run as on a GPU: device STAND-IN (ready {SIZE[0]}x{SIZE[1]} masks, JPEGs "
              f"left to the device), 3 prompts + 1 negative, {os.cpu_count()} cores, best of {args.repeat}")
        print(f"{'store':>14} {'images':>7} {'img/s':>7} {'steady':>7} {'CPU ms/img':>11}" + (
            f" {'GIL ms/img':>11} {'ceiling img/s/process':>22}" if args.gil else ""))
        if "local" in args.stores:
            local = work / "src"
            local.mkdir()
            for i in range(args.images):
                (local / f"{i:05d}.jpg").write_bytes(jpegs[i % 16])
            report("local", [measure(str(local), str(work / f"out{run}"), spec, engine, args.gil, work)
                             for run in range(args.repeat)], args.gil)
        if moto is not None:
            os.environ.update(s3_test_env(moto.endpoint))
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            upload(open_store(f"s3://{BUCKET}/src/"), args.s3_images, jpegs)
            report("s3 (moto)", [measure(f"s3://{BUCKET}/src/", f"s3://{BUCKET}/out{run}/", spec, engine, args.gil, work)
                                 for run in range(args.repeat)], args.gil)
        base = None
        for rtt in args.rtt_ms if "lite" in args.stores else ():
            server = LiteServer(rtt)
            try:
                os.environ.update(s3_test_env(server.endpoint))
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                upload(open_store(f"s3://{BUCKET}/src/"), args.s3_images, jpegs)
                server.stats(reset=True)
                cpu = server_cpu_s(server.process.pid)
                runs = [measure(f"s3://{BUCKET}/src/", f"s3://{BUCKET}/out{run}/", spec, engine, args.gil, work)
                        for run in range(args.repeat)]
                stats, cpu = server.stats(), server_cpu_s(server.process.pid) - cpu
                requests = sum(stats["counts"].values())
                base = base or (max(r["rate"] for r in runs), max(r["steady"] for r in runs))
                report(f"s3-lite {rtt:g} ms", runs, args.gil,
                       f"   x{max(r['rate'] for r in runs) / base[0]:.2f} of {args.rtt_ms[0]:g} ms (steady "
                       f"x{max(r['steady'] for r in runs) / base[1]:.2f}); at most "
                       f"{stats['max_in_flight']} requests in flight; server {cpu / requests * 1e3:.2f} ms CPU/request")
            finally:
                server.stop()
        print("(moto serves every request in Python on the same cores; no server's CPU is in the CPU column)")
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
