"""What each ``clipmask`` subcommand does, given its parsed arguments (see ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

from tqdm import tqdm

#: Seconds between polls of ``clipmask status --watch``.
WATCH_INTERVAL_S = 2.0


def run(args: argparse.Namespace, _extra: list[str]) -> int:
    from worker.devices import validate_device
    from worker.engine import MaskEngine

    from .cli import spec_from_args
    from .local import run_local

    spec = spec_from_args(args)
    validate_device(args.device)  # a typo fails before the source is listed
    summary = run_local(args.source, args.out, spec,
                        lambda: MaskEngine.load(args.model, args.device, args.precision, args.batch_size),
                        skip_existing=args.skip_existing, progress=not args.quiet)
    print(f"{summary['succeeded']} succeeded, {summary['failed']} failed, {summary['skipped']} skipped; "
          f"manifest: {summary['manifest']}")
    return 1 if summary["failed"] else 0


def submit(args: argparse.Namespace, _extra: list[str]) -> int:
    from .cli import spec_from_args
    from .planning import submit_job

    def named(job_id: str) -> None:
        tqdm.write(f"job {job_id}: planning {args.source} -> {args.out}; if this is interrupted, "
                   f"finish the plan with: clipmask resume {job_id}", file=sys.stderr)

    with tqdm(unit="img", desc="queued", file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        job_id = submit_job(args.source, args.out, spec_from_args(args), chunk_size=args.chunk_size,
                            skip_existing=args.skip_existing, on_named=named, on_chunk=bar.update)
    print(f"submitted; follow it with: clipmask status {job_id} --watch", file=sys.stderr)
    print(job_id)
    return 0


def resume(args: argparse.Namespace, _extra: list[str]) -> int:
    from .planning import resume_job

    with tqdm(unit="img", desc="planned", file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        done = resume_job(args.job_id, args.out, on_chunk=bar.update)
    print(f"job {args.job_id}: {done['planned']} more image(s) planned, {done['requeued']} chunk(s) queued again; "
          f"follow it with: clipmask status {args.job_id} --watch")
    return 0


def status(args: argparse.Namespace, _extra: list[str]) -> int:
    from .jobs import JobIndex, waiting_note

    jobs = JobIndex.from_env()
    if args.watch:
        _watch(jobs, args.job_id)
    report = jobs.status(args.job_id)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"job {report['job_id']}: {report['state']}, {report['done']}/{report['total']} done "
              f"({report['succeeded']} succeeded, {report['failed']} failed, {report['skipped']} skipped)"
              f"{_planning_note(report)}")
        if waiting_note(report):
            print(("stuck: " if report["stuck"] else "") + waiting_note(report))
        if report["manifest"]:
            print(f"manifest: {report['manifest']}")
    return 0


def _planning_note(report: dict) -> str:
    if report["planning_interrupted"]:
        return (f"; planning was interrupted after {report['total']} images: "
                f"complete it with: clipmask resume {report['job_id']}")
    return "" if report["planned"] else ", still planning"


def _watch(jobs, job_id: str) -> None:
    report = jobs.status(job_id)
    with tqdm(total=report["total"], unit="img", dynamic_ncols=True, file=sys.stderr) as bar:
        while True:
            bar.total = report["total"]
            bar.update(report["done"] - bar.n)
            bar.set_postfix(succeeded=report["succeeded"], failed=report["failed"], refresh=True)
            if report["manifest"]:  # written once the job has ended
                return
            if report["planning_interrupted"]:
                bar.write(f"planning was interrupted: complete it with: clipmask resume {job_id}")
                return
            time.sleep(WATCH_INTERVAL_S)
            report = jobs.status(job_id)


def cancel(args: argparse.Namespace, _extra: list[str]) -> int:
    from storage import open_store

    from .jobfiles import JobFiles
    from .jobs import JobIndex, now_iso

    from .queue import send_finish

    data, idle = JobIndex.from_env().cancel(args.job_id)
    JobFiles(open_store(data["dest"]), args.job_id).mark_cancelled(now_iso())
    if idle:  # no chunk in flight to finish it
        send_finish(args.job_id, data["dest"], data.get("queue"))
    print(f"job {args.job_id} cancelled; images still queued will be recorded as skipped")
    return 0


def preview(args: argparse.Namespace, _extra: list[str]) -> int:
    from .preview import write_preview

    print(write_preview(args.dest, out_dir=args.out_dir, job_id=args.job_id, limit=args.limit, seed=args.seed))
    return 0


def worker(args: argparse.Namespace, extra: list[str]) -> int:
    """One Celery worker process per device (or ``--processes-per-device``), each a child of this
    process (``tasks.supervise``), which forwards SIGTERM to them (a warm shutdown) and starts again
    one that exits on its own."""
    from worker.model import check_model_available, model_reference

    for option, variable in (("tasks", "CLIPMASK_WORKER_TASKS"),
                             ("processes_per_device", "CLIPMASK_PROCESSES_PER_DEVICE")):
        if getattr(args, option) < 1:  # a default from the environment skips argparse's check
            raise ValueError(f"--{option.replace('_', '-')} (default ${variable}) must be at least 1, "
                             f"got {getattr(args, option)}")
    devices = _worker_devices(args)
    if args.model:
        os.environ["CLIPMASK_MODEL"] = args.model
    if args.batch_size:
        os.environ["CLIPMASK_BATCH_SIZE"] = str(args.batch_size)
    os.environ["CLIPMASK_PRECISION"] = args.precision
    from .supervise import CHILD_ENV, supervise_workers

    if os.environ.get(CHILD_ENV):  # started by the supervisor below (which checked the model)
        return _serve_device(devices[0], args, extra)
    check_model_available(model_reference())
    _serve_metrics()  # here, for all devices: children write their samples to its folder
    return supervise_workers([device for device in devices for _ in range(args.processes_per_device)], args, extra)


def _serve_device(device: str, args: argparse.Namespace, extra: list[str]) -> int:
    """Celery's threads pool, ``--tasks`` threads: the tasks held share this process's engine
    and its device loop. Acks stay late, so a killed process loses no task (README, "Workers")."""
    from worker import lifecycle
    from worker.celery_app import app
    from worker.errors import ClipmaskError

    os.environ[lifecycle.DEVICES_ENV] = device
    try:
        lifecycle.setup()
    except ClipmaskError as err:  # tasks retry the load, and report it if it keeps failing
        logging.getLogger("clipmask").error("could not load the mask engine: %s", err)
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(args.tasks),
                     "--queues", app.conf.task_default_queue, "--loglevel", args.loglevel, *extra])
    return 0


def _serve_metrics() -> None:
    """With ``CLIPMASK_METRICS_PORT``, serve Prometheus metrics from this (the main) process."""
    from worker.config import env_int

    port = env_int("CLIPMASK_METRICS_PORT", 0)
    if not port:
        return
    # Before prometheus_client is first imported, so that pool processes write their samples there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clipmask-metrics-")
    from . import metrics

    try:
        metrics.serve(port)
    except OSError as err:
        raise OSError(f"CLIPMASK_METRICS_PORT={port}: cannot listen ({err}); choose a free port") from None


def _worker_devices(args: argparse.Namespace) -> list[str]:
    """One entry per worker process: ``cuda:N`` per chosen GPU, or the one ``--device``."""
    from worker.devices import count_gpus, validate_device

    available = count_gpus()
    if args.device != "auto" or (not args.gpus and not available):
        return [validate_device(args.device)]
    if not args.gpus or args.gpus == "all":
        return [f"cuda:{i}" for i in range(available)]
    try:
        indices = [int(i) for i in args.gpus.split(",")]
    except ValueError:
        raise ValueError(f"--gpus must be 'all' or indices like 0,2; got {args.gpus!r}") from None
    missing = [i for i in indices if not 0 <= i < available]
    if missing:
        raise ValueError(f"--gpus {args.gpus}: no GPU {missing} on this machine ({available} visible); "
                         "leave --gpus out to use every GPU, or --device cpu")
    return [f"cuda:{i}" for i in indices]
