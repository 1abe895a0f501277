"""What each ``clipmask`` subcommand does, given its parsed arguments (``parser.py``). Each
imports what it needs when it runs: ``status`` never loads torch, ``run`` only once its options,
SRC and DST are checked."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tqdm import tqdm

from tasks.cli.parser import spec_from_args
from tasks.errors import UsageError

#: Seconds between polls of ``clipmask status --watch``.
WATCH_INTERVAL_S = 2.0


def run(args: argparse.Namespace, _extra: list[str]) -> int:
    """Options, SRC and DST are checked before torch is imported or a model loaded: a typo or an
    unwritable DST is reported in about a second."""
    from tasks.shards.names import find_shards
    from worker.options import validate_device

    spec = spec_from_args(args)
    validate_device(args.device)
    shards = find_shards(args.source)
    _check_output_format(args, shards)
    if shards is not None:
        return _run_shards(args, spec, shards)
    from tasks.jobs.preflight import check_run

    source, dest, total = check_run(args.source, args.out)
    from tasks.pipeline.local import run_local

    summary = run_local(source, dest, spec, _load_engine(args), total=total, skip_existing=args.skip_existing,
                        progress=not args.quiet)
    return _report(summary, args.skip_existing)


def _run_shards(args: argparse.Namespace, spec, shards) -> int:
    from tasks.jobs.preflight import check_shard_run

    dest = check_shard_run(shards, args.out)
    from tasks.pipeline.local import run_local_shards

    summary = run_local_shards(shards, dest, spec, _load_engine(args), skip_existing=args.skip_existing,
                               output_format=args.output_format, image_column=args.image_column,
                               progress=not args.quiet)
    return _report(summary, args.skip_existing)


def _check_output_format(args: argparse.Namespace, shards) -> None:
    """``--output-format`` and ``--image-column`` fit SRC: shards in, shards out; an image column
    for Parquet shards only."""
    from tasks.shards.names import check_image_column

    sharded = shards is not None
    if sharded and args.output_format == "files":
        raise UsageError(f"SRC {args.source} holds shards, which are written as shards: leave out "
                         "--output-format or pass --output-format webdataset or parquet")
    check_image_column(shards, args.image_column, args.source)
    if not sharded and args.output_format in ("webdataset", "parquet"):
        raise UsageError(f"--output-format {args.output_format} needs WebDataset shards (.tar) or Parquet shards "
                         f"(.parquet) in SRC, or a brace pattern such as s3://bucket/data/{{00000..00099}}.tar; "
                         f"{args.source} holds images: leave out --output-format")


def _load_engine(args: argparse.Namespace):
    from worker import heap
    from worker.engine import MaskEngine

    engine = MaskEngine.load(args.model, args.device, args.precision, args.batch_size)
    heap.for_pipelines()  # the model stays for life; hundreds of images will be in flight
    return engine


def _report(summary: dict, skip_existing: bool) -> int:
    up_to_date = f", {summary['up_to_date']} up to date" if skip_existing else ""
    print(f"{summary['succeeded']} succeeded, {summary['failed']} failed, {summary['skipped']} skipped{up_to_date}; "
          f"manifest: {summary['manifest']}")
    return 1 if summary["failed"] else 0


def submit(args: argparse.Namespace, _extra: list[str]) -> int:
    from tasks.jobs.planning import submit_job

    def named(job_id: str) -> None:
        print(f"job {job_id}: planning {args.source} -> {args.out}; if this is interrupted, "
              f"finish the plan with: clipmask resume {job_id}", file=sys.stderr)

    from tasks.errors import NothingNewError

    try:
        with _ProgressBar("queued") as bar:
            job_id = submit_job(args.source, args.out, spec_from_args(args), chunk_size=args.chunk_size,
                                skip_existing=args.skip_existing, image_column=args.image_column, on_named=named,
                                on_chunk=bar.update)
    except NothingNewError as err:
        print(f"clipmask submit: {err}", file=sys.stderr)
        return 0
    print(f"submitted; follow it with: clipmask status {job_id} --watch", file=sys.stderr)
    print(job_id)
    return 0


def resume(args: argparse.Namespace, _extra: list[str]) -> int:
    from tasks.jobs.planning import resume_job

    with _ProgressBar("planned") as bar:
        done = resume_job(args.job_id, args.out, on_chunk=bar.update)
    print(f"job {args.job_id}: {done['planned']} more image(s) planned, {done['requeued']} chunk(s) queued again; "
          f"follow it with: clipmask status {args.job_id} --watch")
    return 0


class _ProgressBar:
    """A tqdm bar on stderr that appears with the first progress to show, not before (an error
    or the job's name first, not a "0img" bar)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def update(self, n: int) -> None:
        if self.bar is None:
            self.bar = tqdm(unit="img", desc=self.desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        self.bar.update(n)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *_exc) -> None:
        if self.bar is not None:
            self.bar.close()


def status(args: argparse.Namespace, _extra: list[str]) -> int:
    from tasks.jobs.index import JobIndex, retry_note, waiting_note

    jobs = JobIndex.from_env()
    if args.watch:
        _watch(jobs, args.job_id)
    report = jobs.status(args.job_id)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        done = (f"{report['chunks_done']}/{report['chunks']} shards done, {report['done']} samples"
                if report.get("shards") else f"{report['done']}/{report['total']} done")
        print(f"job {report['job_id']}: {report['state']}, {done} "
              f"({report['succeeded']} succeeded, {report['failed']} failed, {report['skipped']} skipped)"
              f"{_up_to_date_note(report)}{_planning_note(report)}")
        if waiting_note(report):
            print(("stuck: " if report["stuck"] else "") + waiting_note(report))
        if retry_note(report):
            print(retry_note(report))
        if report["manifest"]:
            print(f"manifest: {report['manifest']}")
    return 0


def _up_to_date_note(report: dict) -> str:
    """", 32 up to date left alone" for a plan of what is new, else nothing."""
    return f", {report['up_to_date']} up to date left alone" if report.get("up_to_date") else ""


def _planning_note(report: dict) -> str:
    if report["planning_interrupted"]:
        return (f"; planning was interrupted after {report['total']} images: "
                f"complete it with: clipmask resume {report['job_id']}")
    return "" if report["planned"] else ", still planning"


def _watch(jobs, job_id: str) -> None:
    report = jobs.status(job_id)
    total, done = ("chunks", "chunks_done") if report.get("shards") else ("total", "done")
    with tqdm(total=report[total], unit="shard" if report.get("shards") else "img", dynamic_ncols=True,
              file=sys.stderr) as bar:
        while True:
            bar.total = report[total]
            bar.update(report[done] - bar.n)
            bar.set_postfix(succeeded=report["succeeded"], failed=report["failed"], refresh=True)
            if report["manifest"]:  # written once the job has ended
                return
            if report["planning_interrupted"]:
                bar.write(f"planning was interrupted: complete it with: clipmask resume {job_id}")
                return
            time.sleep(WATCH_INTERVAL_S)
            report = jobs.status(job_id)


def cancel(args: argparse.Namespace, _extra: list[str]) -> int:
    from tasks.jobs.control import cancel_job

    cancel_job(args.job_id)
    print(f"job {args.job_id} cancelled; images still queued will be recorded as skipped")
    return 0


def preview(args: argparse.Namespace, _extra: list[str]) -> int:
    from tasks.preview import write_preview

    print(write_preview(args.dest, out_dir=args.out_dir, job_id=args.job_id, limit=args.limit, seed=args.seed))
    return 0


def serve(args: argparse.Namespace, _extra: list[str]) -> int:
    """The HTTP API (``tasks/api``): never imports torch or the engine."""
    from tasks.api.server import serve as run_server

    return run_server(args)


def worker(args: argparse.Namespace, extra: list[str]) -> int:
    """This machine's worker processes, one per device or ``--processes-per-device``, each a
    supervised child of this process (``worker/start.py``); the jobs' progress among the metrics."""
    for option, variable in (("tasks", "CLIPMASK_WORKER_TASKS"),
                             ("processes_per_device", "CLIPMASK_PROCESSES_PER_DEVICE")):
        if getattr(args, option) < 1:  # a default from the environment skips argparse's check
            raise UsageError(f"--{option.replace('_', '-')} (default ${variable}) must be at least 1, "
                             f"got {getattr(args, option)}")
    from worker.start import start_workers

    def job_progress():
        from tasks.jobs.progress import JobProgress

        return [JobProgress()]

    return start_workers(args, extra, job_progress)
