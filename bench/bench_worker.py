"""One ``clipmask worker`` fed two ways, throughput side by side (clipmask's worker targets).

Real parts: its own redis-server on a free port, one ``clipmask worker --device cpu`` (threads
pool, ``--tasks`` tasks sharing one device loop), a local folder of 640x480 JPEGs (bench_host.py's
photo stand-in), or with ``--store s3`` the same JPEGs in a bucket of a moto S3 server started
here (inputs read and masks written there), the random CLIPSeg with rd64's shapes
(bench_engine.py's, built once). Measured,
each after a warm-up request, with the worker already up:

1. A job of ``--images`` images with ``--chunk-size 8`` against the same job as one chunk of
   ``--images`` (256: one task, the batch loop fed by one pipeline): images/s, and the ratio
   (target >= 0.9).
2. 32 one-image ``mask_image`` requests sent together against the same 32 sent one at a time,
   each waiting for its answer: images/s, the ratio (target >= 1.3), and the batch sizes their
   metadata records report.
3. The model's own ceiling for (2), in this process while the worker idles: the forward pass
   alone over the same 32 prepared images, one at a time on every thread (as a lone request
   runs) against batches of the CPU batch size run side by side (as concurrent requests run at
   best). No host work, no queue: what batching and side-by-side passes can gain at most.

CPU figures; these machines are noisy, so compare only within one run.

Usage: .venv/bin/python bench/bench_worker.py [--images 256] [--requests 32] [--precision int8] [--store local|s3]
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

from bench_engine import ensure_model  # noqa: E402
from bench_host import make_jpeg  # noqa: E402
from bench_jobs import wait_manifest  # noqa: E402

from tests.services import MotoServer, RedisServer, s3_test_env  # noqa: E402

CLIPMASK = str(REPO / ".venv" / "bin" / "clipmask")
PROMPT, NEGATIVE = "a person|a dog|a cat", "background"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images in the job (default 256)")
    parser.add_argument("--small-chunk", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="one-image requests (default 32)")
    parser.add_argument("--precision", default="int8", help="worker --precision (default int8, CPU's fastest)")
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / ".cache" / "rd64")
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="where the inputs and masks are: a local folder, or a moto S3 server (default local)")
    return parser.parse_args()


def job_rate(source: str, dest: str, images: int, chunk: int, env: dict, client: redis.Redis) -> float:
    """Images/s of one job, from the start of ``clipmask submit`` to its manifest."""
    started = time.perf_counter()
    out = subprocess.run([CLIPMASK, "submit", source, "--out", dest, "--prompt", PROMPT,
                          "--negative", NEGATIVE, "--chunk-size", str(chunk)],
                         env=env, capture_output=True, text=True, check=True).stdout
    wait_manifest(client, out.strip().splitlines()[-1], timeout=3600, interval=0.1)
    return images / (time.perf_counter() - started)


def offload_rate(app, source: str, dest: str, keys: list[str], together: bool) -> tuple[float, list[int]]:
    """Images/s of ``keys`` as one-image requests, sent together or one at a time."""
    from worker.spec import MaskSpec

    spec = MaskSpec.from_text(PROMPT, NEGATIVE).to_dict()
    send = lambda key: app.send_task("clipmask.mask_image", args=(source, key, dest, spec))  # noqa: E731
    started = time.perf_counter()
    if together:
        rows = [result.get(timeout=600) for result in [send(key) for key in keys]]
    else:
        rows = [send(key).get(timeout=600) for key in keys]
    seconds = time.perf_counter() - started
    assert all(row["status"] == "succeeded" for row in rows), rows
    return len(keys) / seconds, [row["metadata"]["worker"]["batch_images"] for row in rows]


def model_ceiling(model: Path, precision: str, source: Path, keys: list[str]) -> tuple[float, float, int]:
    """Images/s of the forward pass alone over ``keys``: one image at a time on every thread, and
    batches of the engine's batch size ``engine.streams`` at a time; and that batch size."""
    from bench_e2e import forward_rate  # here: it imports the Celery app, which main() configures first

    from worker.engine import MaskEngine
    from worker.spec import MaskSpec

    engine = MaskEngine.load(str(model), device="cpu", precision=precision)
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    pixels = [engine.prepare(engine.decode((source / key).read_bytes(), spec).image, spec) for key in keys]
    return (forward_rate(engine, pixels, spec, 1, 1, alone=True),
            forward_rate(engine, pixels, spec, engine.batch_size, engine.streams, alone=False), engine.batch_size)


@contextlib.contextmanager
def s3_copy(source: Path, work: Path, env: dict):
    """A moto S3 server holding ``source``'s files under ``s3://bench-worker/in/``; points ``env``
    and this process at it (the tests' ``s3_test_env``); yields ``s3://bench-worker``."""
    import boto3

    from storage import open_store

    with MotoServer(workdir=str(work)).start() as moto:
        variables = s3_test_env(moto.endpoint)
        env.update(variables)
        os.environ.update(variables)
        boto3.session.Session().client("s3").create_bucket(Bucket="bench-worker")
        inputs = open_store("s3://bench-worker/in/")
        for path in source.iterdir():
            inputs.write_bytes(path.name, path.read_bytes())
        yield "s3://bench-worker"


def main() -> None:
    args = parse_args()
    model = ensure_model(args.model_dir)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; worker on cpu, "
          f"precision {args.precision}, random rd64-shaped CLIPSeg, 640x480 JPEGs, prompts {PROMPT!r} - {NEGATIVE!r}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp, \
            RedisServer(workdir=tmp).start() as server, contextlib.ExitStack() as stack:
        work = Path(tmp)
        source = work / "in"
        source.mkdir()
        for i in range(args.images):
            (source / f"img_{i:04d}.jpg").write_bytes(make_jpeg(640, 480, i))
        env = {**os.environ, "CELERY_BROKER_URL": server.url, "CELERY_RESULT_BACKEND": server.url,
               "CLIPMASK_MODEL": str(model), "HF_HUB_OFFLINE": "1", "CLIPMASK_QUEUE": "bench",
               "CLIPMASK_PRECISION": args.precision}
        root = str(work)  # where inputs and outputs are, as the worker sees them
        if args.store == "s3":
            root = stack.enter_context(s3_copy(source, work, env))
        os.environ.update({k: v for k, v in env.items() if k.startswith(("CELERY_", "CLIPMASK_QUEUE", "AWS_"))})
        from tasks.jobs.queue import app

        client = redis.Redis.from_url(server.url)
        with open(work / "worker.log", "wb") as log:
            worker = subprocess.Popen([CLIPMASK, "worker", "--device", "cpu", "--precision", args.precision,
                                       "--loglevel", "WARNING", "-n", "bench@%h"], env=env, cwd=REPO,
                                      stdout=log, stderr=log)
            try:
                keys = sorted(p.name for p in source.iterdir())
                inputs = f"{root}/in"
                offload_rate(app, inputs, f"{root}/warm", keys[:2], together=False)  # the worker is up and warm
                print(f"\n1. a job of {args.images} images, chunk {args.small_chunk} vs one chunk of {args.images}"
                      f" ({args.store})", flush=True)
                small = job_rate(inputs, f"{root}/small", args.images, args.small_chunk, env, client)
                large = job_rate(inputs, f"{root}/large", args.images, args.images, env, client)
                print(f"  chunk {args.small_chunk:>4}: {small:6.2f} img/s\n  chunk {args.images:>4}: {large:6.2f} img/s\n"
                      f"  ratio {small / large:.2f} (target >= 0.9)", flush=True)
                requests = keys[:args.requests]
                print(f"\n2. {len(requests)} one-image offload requests (mask_image, {args.store})", flush=True)
                alone, alone_batches = offload_rate(app, inputs, f"{root}/alone", requests, together=False)
                together, batches = offload_rate(app, inputs, f"{root}/together", requests, together=True)
                print(f"  one at a time: {alone:6.2f} img/s (batch sizes {sorted(set(alone_batches))})\n"
                      f"  {len(requests):>2} together:   {together:6.2f} img/s (batch sizes: mean {sum(batches) / len(batches):.1f}, "
                      f"max {max(batches)})\n  ratio {together / alone:.2f} (target >= 1.3)", flush=True)
                one, batched, size = model_ceiling(model, args.precision, source, requests)
                print(f"\n3. the model alone, the same {len(requests)} images (the ceiling of 2.)\n"
                      f"  one at a time, all threads:     {one:6.2f} img/s\n"
                      f"  batches of {size}, side by side: {batched:6.2f} img/s\n  ratio {batched / one:.2f}", flush=True)
            finally:
                worker.terminate()
                worker.wait(120)


if __name__ == "__main__":
    main()
