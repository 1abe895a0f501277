"""Prometheus metrics of the workers, added up over the machine's worker processes.

``clipmask worker`` with ``CLIPMASK_METRICS_PORT`` set points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh folder before this module (and prometheus_client) is imported and its worker processes
start (``worker/start.py``), so each process writes its samples to files there, and the main
process serves them all (``serve``), with the progress of every unfinished job read from the
Redis index at each scrape (``tasks/jobs/progress.py``). Without a port the metrics stay in
memory, unused.

Metrics (labels ``model`` and ``device`` on the per-image ones):

- ``clipmask_images_total{outcome}``: images by outcome: succeeded, failed, skipped
- ``clipmask_stage_seconds{stage}``: seconds per image in each stage (download, decode,
  preprocess, inference, postprocess, encode, upload), for masked images
- ``clipmask_batch_size``: images per model batch
- ``clipmask_job_images{job_id, status}``, ``clipmask_job_total{job_id}``: per unfinished job,
  images with an outcome by status, and images planned; ``clipmask_jobs_stuck``: unfinished jobs
  whose missing chunks were sent again several times without progress (``tasks/jobs/progress.py``)
- ``clipmask_watchdog_exits_total{reason}``: worker processes that stopped running tasks and
  exited (``worker.watchdog``)
- ``clipmask_scans_total{entry, result}``: scheduled scans run by this worker's processes, by
  result (``tasks/jobs/scans.py``)
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("download", "decode", "preprocess", "inference", "postprocess", "encode", "upload")
LABELS = ("model", "device")

IMAGES = Counter("clipmask_images", "Images by outcome", ("outcome", *LABELS))
STAGE_SECONDS = Histogram("clipmask_stage_seconds", "Seconds per image in one stage of the pipeline",
                          ("stage", *LABELS),
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH_SIZE = Histogram("clipmask_batch_size", "Images per model batch", LABELS,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


def observe_outcome(status: str, labels: dict[str, str], timings_ms: dict | None = None) -> None:
    """Count one image's outcome and, for a masked image, its per-stage seconds."""
    IMAGES.labels(outcome=status, **labels).inc()
    for stage, ms in (timings_ms or {}).items():
        if stage in STAGES:
            STAGE_SECONDS.labels(stage=stage, **labels).observe(ms / 1000.0)


def observe_batch(size: int, labels: dict[str, str]) -> None:
    BATCH_SIZE.labels(**labels).observe(size)


def serve(port: int, collectors: Iterable = ()) -> None:
    """Serve every worker process's samples, and ``collectors``' (the jobs' progress), on ``port``
    (all interfaces)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    start_http_server(port, registry=registry)
    log.info("metrics on :%d/metrics", port)


def mark_process_dead(pid: int) -> None:
    """A pool process exited: fold its live samples away (prometheus_client's multiprocess rule)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


