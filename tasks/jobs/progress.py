"""The jobs' progress as Prometheus metrics, read from the Redis index at each scrape: served by
``clipmask worker`` beside the workers' own metrics (``worker/metrics.py``).

- ``clipmask_job_images{job_id, status}``, ``clipmask_job_total{job_id}``: per unfinished job,
  images with an outcome by status, and images planned
- ``clipmask_jobs_stuck``: unfinished jobs whose missing chunks were sent again several times
  without progress (``tasks/jobs/healing.py``)
"""

from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily

from tasks.jobs.index import STATUSES, JobIndex, healing_state

log = logging.getLogger(__name__)


class JobProgress:
    """A collector: progress of every unfinished job, read from the Redis index per scrape."""

    def collect(self):
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
