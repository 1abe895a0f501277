"""The Celery application. Settings come from ``celeryconfig``; tasks from ``tasks.masks``.

Importing this module is cheap (no torch, no engine): ``clipmask submit`` and a web backend
send tasks through it by name. The engine is loaded only in worker processes
(``worker.lifecycle``).
"""

from __future__ import annotations

from celery import Celery

app = Celery("clipmask", include=["tasks.masks"])
app.config_from_object("celeryconfig")
# Every worker process watches itself: one that stops running tasks exits (worker/watchdog.py).
app.steps["worker"].add("worker.watchdog:WatchdogStep")


def ready_messages(queue: str) -> int:
    """Messages ready (not yet delivered) in ``queue``; 0 when the queue does not exist yet."""
    with app.connection_for_write() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except conn.channel_errors:
            return 0


def visibility_timeout() -> int:
    """Seconds before the broker hands an unacknowledged task to another worker."""
    return int(app.conf.broker_transport_options.get("visibility_timeout", 3600))
