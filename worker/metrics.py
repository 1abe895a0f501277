"""Prometheus metrics of the workers, safe under Celery's prefork pool.

``clipmask worker`` with ``CLIPMASK_METRICS_PORT`` set points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh folder before this module (and prometheus_client) is imported and the pool forks, so each pool process writes its samples to files there, and
the worker's main process serves them all (``serve``), with the progress of every unfinished job
read from the Redis index at each scrape. Without a port the metrics stay in memory, unused.

Metrics (labels ``model`` and ``device`` on the per-image ones):

- ``clipmask_images_total{outcome}``: images by outcome: succeeded, failed, skipped
- ``clipmask_stage_seconds{stage}``: seconds per image in each stage (download, decode,
  preprocess, inference, postprocess, encode, upload), for masked images
- ``clipmask_batch_size``: images per model batch
- ``clipmask_job_images{job_id, status}``, ``clipmask_job_total{job_id}``: per unfinished job,
  images with an outcome by status, and images planned (from the job index)
- ``clipmask_jobs_stuck``: unfinished jobs whose missing chunks were sent again several times
  without progress (``tasks.healing``)
- ``clipmask_watchdog_exits_total{reason}``: worker processes that stopped running tasks and
  exited (``worker.watchdog``)
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

PORT_ENV = "CLIPMASK_METRICS_PORT"
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


class JobProgress:
    """A collector: progress of every unfinished job, read from the Redis index per scrape."""

    def collect(self):
        from .jobs import STATUSES, JobIndex, healing_state

        images = GaugeMetricFamily("clipmask_job_images", "Images of a job with an outcome, by status",
                                   labels=("job_id", "status"))
        total = GaugeMetricFamily("clipmask_job_total", "Images planned in a job", labels=("job_id",))
        stuck = GaugeMetricFamily("clipmask_jobs_stuck", "Unfinished jobs sent their missing chunks again "
                                  "several times without progress")
        try:
            jobs, count = JobIndex.from_env(), 0
            for job_id in jobs.active():
                data = jobs.get(job_id) or {}
                for status in STATUSES:
                    images.add_metric([job_id, status], float(data.get(status, 0)))
                total.add_metric([job_id], float(data.get("total", 0)))
                count += healing_state(data)["stuck"]
            stuck.add_metric([], float(count))
        except Exception as err:  # noqa: BLE001 - a scrape while Redis is away shows no jobs
            log.warning("metrics: job progress unavailable: %s", err)
        yield images
        yield total
        yield stuck


def serve(port: int) -> None:
    """Serve the pool processes' metrics and the jobs' progress on ``port`` (all interfaces)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(JobProgress())
    start_http_server(port, registry=registry)
    log.info("metrics on :%d/metrics", port)


def mark_process_dead(pid: int) -> None:
    """A pool process exited: fold its live samples away (prometheus_client's multiprocess rule)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


