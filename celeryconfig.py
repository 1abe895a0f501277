"""Celery settings for clipmask. Every value comes from the environment, with a safe default.

Loaded by ``worker.celery_app`` with ``app.config_from_object("celeryconfig")``. Names are
Celery's own lowercase settings; the environment variables are Celery's (``CELERY_*``) or, for
clipmask's own knobs, ``CLIPMASK_*``.
"""

import os

from tasks import settings as _settings
from tasks.jobs import schedule as _schedule

#: Where tasks are queued. Redis db 0 by default.
broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
#: Where task results (small JSON dicts) go. Redis db 1 by default.
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1")

# JSON only: a pickle payload from the broker would be code execution on a GPU box.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

#: Hard limit for one task (a chunk of images), in seconds. The soft limit comes a tenth earlier
#: (at most a minute): the task then records its unfinished images as failed instead of vanishing.
task_time_limit = _settings.TASK_TIME_LIMIT.get()
task_soft_time_limit = max(1, task_time_limit - min(60, task_time_limit // 10))

# At-least-once delivery: a task is acknowledged after it ran, so a killed worker's chunk goes
# back to the queue; one message at a time, so a dying worker holds no others hostage.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# When the broker connection drops, a running chunk carries on: its results reach storage, and
# its count reaches Redis once Redis is back (the job index retries). Cancelling it instead
# would lose it, as Celery can neither record nor re-queue anything while the broker is away.
# Whatever message is lost that way is sent again by the jobs' healing check (tasks/jobs/healing.py).
worker_cancel_long_running_tasks_on_connection_loss = False
# No prefetch reduction after a reconnect. Celery would then raise the prefetch count again one
# step per acknowledged task, with a synchronous basic.qos sent from the thread that acknowledges:
# under the threads pool a task thread, reading the consumer's AMQP connection at the same time as
# the consumer's own loop (py-amqp is not thread-safe). Replies reach the wrong reader, and every
# reader blocks: the worker takes no task and sends no heartbeat until RabbitMQ drops it (about
# 3 minutes; seen in 4 of 11 broker restarts). Without the reduction a reconnected worker takes a
# full window of messages at once while its last tasks finish: they wait for a free thread.
worker_enable_prefetch_count_reduction = False
# Sending a task rides out a broker restart of about a minute: a finished chunk queues the job's
# next chunks (or its finishing step) once the broker is back, instead of leaving them to the
# healing check a visibility timeout later (Celery's default gives up after about a second).
task_publish_retry_policy = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}
# A worker whose broker is away keeps trying to reconnect, for as long as it takes.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
# Task events on by default, for Flower and monitoring.
worker_send_task_events = True

#: Seconds before Redis redelivers an unacknowledged task. Must exceed the longest task, or a
#: slow chunk would be run twice in parallel.
broker_transport_options = {
    "visibility_timeout": _settings.VISIBILITY_TIMEOUT.get(),
    # How often a worker looks for tasks whose worker died (unacknowledged past the timeout):
    # every interval * throttle seconds. Kombu's defaults, adjustable for small timeouts.
    "unacked_restore_interval": _settings.RESTORE_INTERVAL.get(),
    "unacked_restore_throttle": _settings.RESTORE_THROTTLE.get(),
}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}

#: Results are small and only needed by whoever waits for them (``mask_image``, scans): gone
#: after a day. Chunks and the finishing step store none: they report through the job's files.
result_expires = _settings.RESULT_EXPIRES.get()
task_track_started = True

task_default_queue = _settings.QUEUE.get()

#: Scheduled batches for ``celery beat``: a JSON list of
#: ``{"source": URL, "dest": URL, "prompt": "a|b", "negative": "c", "every_s": 3600}`` (or
#: ``"cron": "0 * * * *"`` instead of ``every_s``). Each run submits a job with ``skip_existing``,
#: one at a time per entry, and none when nothing is new (``tasks/jobs/scans.py``). A malformed
#: entry raises here, so beat stops at start naming it (``tasks/jobs/schedule.py``).
beat_schedule = _schedule.beat_schedule(_settings.SCHEDULE.get())
