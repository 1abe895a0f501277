"""Kill the broker mid-job, again and again: does every job still finish, with nothing lost or doubled?

Real parts only: a private rabbitmq-server node (or a redis-server as broker), a redis-server for
the job records, a moto S3 server holding the images, two ``clipmask worker --device cpu``
processes on the tiny random model (built once under ``bench/.cache/``). Each round:

1. ``--images`` PNGs on S3, a job in chunks of ``--chunk-size`` (default 100 in chunks of 4);
2. once a quarter of its images have an outcome, the broker is SIGKILLed (``--how``), and started
   again on the same data after ``--down`` seconds (default 5);
3. the round waits up to ``--timeout`` seconds for the manifest.

A round that ends without a manifest is a hang: the script prints what the job waits for
(``clipmask status --json``), the queue (``rabbitmqctl list_queues``), what each worker holds
(``celery inspect active/reserved``), and keeps the workers' logs. It prints per round the seconds
to finish, outcomes, manifest rows that repeat an input, images missing, and a final line
``hangs H / rounds R, lost L, duplicate rows D``. Healing is set for a test (visibility timeout
20 s), so a job that heals itself finishes within a minute or two.

Usage: .venv/bin/python bench/bench_broker_restart.py [--broker rabbitmq|redis] [--rounds 10]
       [--how SIGKILL|SIGTERM] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path[:0] = [str(REPO), str(BENCH_DIR)]

import boto3  # noqa: E402

from tests.images import png  # noqa: E402
from tests.processes import FAST_HEALING, Worker, clipmask, job_status  # noqa: E402
from tests.services import MotoServer, RabbitServer, RedisServer, s3_test_env  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("rabbitmq", "redis"), default="rabbitmq")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--how", choices=("SIGKILL", "SIGTERM"), default="SIGKILL")
    parser.add_argument("--down", type=float, default=5.0, help="seconds the broker stays down")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds a round may take after the restart")
    parser.add_argument("--keep", type=Path, help="copy the logs of hung rounds here")
    return parser.parse_args()


def tiny_model() -> str:
    path = BENCH_DIR / ".cache" / "tiny"
    if not (path / "config.json").exists():
        from worker.random_model import build_random_clipseg

        build_random_clipseg(path, shape="tiny")
    return str(path)


def inspect(env: dict) -> str:
    """What each worker holds, as Celery's remote control reports it."""
    code = ("import json; from worker.celery_app import app; i = app.control.inspect(timeout=3); "
            "print(json.dumps({'active': i.active(), 'reserved': i.reserved()}, default=str))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    return done.stdout.strip() or done.stderr.strip()[-2000:]


def rabbit_queues(server: RabbitServer) -> str:
    ctl = shutil.which("rabbitmqctl", path=os.pathsep.join(["/usr/lib/rabbitmq/bin", "/usr/sbin",
                                                              os.environ.get("PATH", "")]))
    if not ctl:
        return "(no rabbitmqctl)"
    env = {**os.environ, "HOME": os.path.join(server.workdir, "home")}
    done = subprocess.run([ctl, "-n", server.nodename, "list_queues", "name", "messages_ready",
                           "messages_unacknowledged", "consumers"], env=env, capture_output=True, text=True,
                          timeout=60)
    return (done.stdout + done.stderr).strip()


def stacks(workers: list[Worker], path: Path) -> None:
    """Every thread's stack of each worker's children (``py-spy dump``, where py-spy is installed)."""
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if not spy:
        return
    with open(path, "w") as out:
        for worker in workers:
            children = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True)
            for pid in children.stdout.split():
                out.write(subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True).stdout)


def one_round(n: int, args, broker, bucket: str, env: dict, workdir: Path) -> dict:
    s3 = boto3.client("s3")
    prefix = f"r{n}"
    keys = [f"{prefix}/in/set{i % 3}/img{i:04d}.png" for i in range(args.images)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=png(i))
    env = {**env, "CLIPMASK_QUEUE": f"chaos-{uuid.uuid4().hex[:8]}"}
    logs = workdir / f"round{n}"
    logs.mkdir()
    result: dict = {}
    workers = [Worker(env, logs / f"worker{w}.log", f"chaos{n}-{w}") for w in range(args.workers)]
    try:
        submitted = clipmask("submit", f"s3://{bucket}/{prefix}/in/", "--out", f"s3://{bucket}/{prefix}/out/",
                             "--prompt", "a cat", "--chunk-size", str(args.chunk_size), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().splitlines()[-1]
        while job_status(job_id, env)["done"] < args.images // 4:
            time.sleep(0.2)
        broker.stop(getattr(signal, args.how))
        killed = time.monotonic()
        time.sleep(args.down)
        broker.start()
        deadline = killed + args.timeout
        status = job_status(job_id, env)
        progress, dumped = (status["done"], time.monotonic()), False
        while not status["manifest"] and time.monotonic() < deadline:
            time.sleep(1)
            status = job_status(job_id, env)
            if status["done"] != progress[0]:
                progress = (status["done"], time.monotonic())
            elif not dumped and time.monotonic() - progress[1] > 40:  # stalled: what is every thread doing?
                stacks(workers, logs / "stalled-stacks.txt")
                dumped = True
        result["stalled_stacks"] = dumped
        result.update({"round": n, "seconds": round(time.monotonic() - killed, 1), "finished": bool(status["manifest"]),
                  **{k: status[k] for k in ("succeeded", "failed", "skipped", "total")}})
        if status["manifest"]:
            body = s3.get_object(Bucket=bucket, Key=f"{prefix}/out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
            sources = Counter(json.loads(line)["source"] for line in body.splitlines())
            expected = {f"s3://{bucket}/{key}" for key in keys}
            result["duplicate_rows"] = sum(c - 1 for c in sources.values())
            result["lost"] = len(expected - set(sources))
        else:
            result["status"] = status
            result["queues"] = rabbit_queues(broker) if isinstance(broker, RabbitServer) else "(redis broker)"
            result["inspect"] = inspect(env)
        result["ack_failures"] = sum(w.log().count("Couldn't ack") for w in workers)
        result["restarted_children"] = sum(w.log().count("starting it again") for w in workers)
        result["watchdog_exits"] = sum(w.log().count("watchdog:") for w in workers)
        return result
    finally:
        for worker in workers:
            worker.stop_quietly()
        if args.keep and (not result.get("finished", False) or result.get("stalled_stacks")):
            shutil.copytree(logs, args.keep / f"round{n}", dirs_exist_ok=True)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers and workers on the way out
    with tempfile.TemporaryDirectory(prefix="clipmask-chaos-") as tmp:
        workdir = Path(tmp)
        for name in ("records", "moto", "broker"):
            (workdir / name).mkdir()
        records = RedisServer(workdir=str(workdir / "records")).start()
        moto = MotoServer(workdir=str(workdir / "moto")).start()
        broker = (RabbitServer(workdir=str(workdir / "broker")) if args.broker == "rabbitmq"
                  else RedisServer(workdir=str(workdir / "broker"), appendonly=True)).start()
        try:
            os.environ.update(s3_test_env(moto.endpoint))
            bucket = f"chaos-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            base = records.url.rsplit("/", 1)[0]
            env = {**os.environ, "CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": f"{base}/1",
                   "CLIPMASK_REDIS_URL": f"{base}/2", "CLIPMASK_MODEL": tiny_model(), "HF_HUB_OFFLINE": "1",
                   **FAST_HEALING}
            results = []
            for n in range(args.rounds):
                result = one_round(n, args, broker, bucket, env, workdir)
                results.append(result)
                print(json.dumps(result, default=str), flush=True)
            hangs = sum(not r["finished"] for r in results)
            stalls = sum(r["stalled_stacks"] for r in results)
            lost = sum(r.get("lost", 0) for r in results)
            dups = sum(r.get("duplicate_rows", 0) for r in results)
            finished = [r["seconds"] for r in results if r["finished"]]
            print(f"broker {args.broker} ({args.how}, down {args.down:.0f}s), {args.images} images in chunks of "
                  f"{args.chunk_size}, {args.workers} workers: hangs {hangs} / rounds {len(results)}, stalls (40 s without progress) {stalls}, lost {lost}, "
                  f"duplicate rows {dups}; seconds from the kill to the manifest: "
                  f"{min(finished, default=0):.0f}-{max(finished, default=0):.0f}")
        finally:
            broker.stop()
            moto.stop()
            records.stop()


if __name__ == "__main__":
    main()
