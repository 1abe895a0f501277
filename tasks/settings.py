"""clipmask's own environment variables on the job side: where job records live, the queue and
its delivery settings (read by ``celeryconfig``), jobs' window, healing and schedules, and the
HTTP API's (``clipmask serve``: tokens, allowed locations, uploads, limits). The worker
side's are in ``worker/settings.py``; both are ``Setting``s, read when asked, never at import.
"""

from __future__ import annotations

import os

from worker.settings import Setting

#: Images per task when ``--chunk-size`` is not given: large enough to batch on a GPU, small
#: enough that a redelivered chunk repeats little work.
DEFAULT_CHUNK_SIZE = 64
#: Chunks of one job queued or running at once, unless ``CLIPMASK_JOB_WINDOW`` says otherwise:
#: enough to keep a few hundred GPUs busy, few enough that the broker holds about a megabyte.
DEFAULT_WINDOW = 1000

REDIS_URL = Setting("CLIPMASK_REDIS_URL", None, "Redis for job records (progress, outcomes)", "text",
                    shown="the result backend, else the broker")
QUEUE = Setting("CLIPMASK_QUEUE", "clipmask", "Celery queue name", "text")
TASK_TIME_LIMIT = Setting("CLIPMASK_TASK_TIME_LIMIT", 3600, "limit of one task (a chunk), seconds: at its soft "
                          "limit, a tenth earlier, its unfinished images fail, or run again later if they wait on "
                          "storage", minimum=1)
VISIBILITY_TIMEOUT = Setting("CLIPMASK_VISIBILITY_TIMEOUT", lambda: 2 * TASK_TIME_LIMIT.get(),
                             "seconds before an unacknowledged task is redelivered, and a job without progress is "
                             "healed; keep it above the time limit", minimum=1, shown="2 x time limit")
RESTORE_INTERVAL = Setting("CLIPMASK_RESTORE_INTERVAL", 10, "Redis broker only: a worker looks for tasks of dead "
                           "workers every interval x throttle seconds (kombu's settings)", minimum=1)
RESTORE_THROTTLE = Setting("CLIPMASK_RESTORE_THROTTLE", 10, "... the throttle", minimum=1)
RESULT_EXPIRES = Setting("CLIPMASK_RESULT_EXPIRES", 24 * 3600, "seconds task results stay in the result backend",
                         minimum=1)
JOB_WINDOW = Setting("CLIPMASK_JOB_WINDOW", DEFAULT_WINDOW, "chunks of one job queued or running at once (fixed "
                     "per job when submitted)", minimum=1)
STORAGE_RETRY_S = Setting("CLIPMASK_STORAGE_RETRY_S", 6 * 3600, "seconds a chunk keeps running again while "
                          "storage is away (not answering, a full or read-only disk, a share unmounted) before the "
                          "images it left are recorded failed", minimum=1, shown="21600 (6 h)")
RETRY_MAX_DELAY_S = Setting("CLIPMASK_RETRY_MAX_DELAY_S", 600, "longest wait before a chunk runs again (from 5 s, "
                            "doubling); at most half of what the visibility timeout leaves over the time limit",
                            minimum=1)
HEAL_INTERVAL = Setting("CLIPMASK_HEAL_INTERVAL", None, "seconds between the workers' checks for stalled jobs",
                        minimum=1, shown="visibility timeout / 4, 5 to 60")
SCHEDULE = Setting("CLIPMASK_SCHEDULE", [], "beat schedule, JSON: a list of "
                   '`{"source", "dest", "prompt", "negative", "every_s" or "cron"}`', "json", shown="none")
API_TOKENS = Setting("CLIPMASK_API_TOKENS", None, "bearer tokens `clipmask serve` accepts: comma-separated, or "
                     "`@/path/to/file` (one a line); read at start. None: `serve` refuses to start unless "
                     "`--no-auth`", "text", shown="none")
API_ALLOWED = Setting("CLIPMASK_API_ALLOWED", None, "URL prefixes a request's `source` and `dest` may name, "
                      "comma-separated (`s3://uploads/,s3://masks/`); a local folder only if listed. None: "
                      "every request naming a location is refused", "text", shown="none")
API_UPLOADS = Setting("CLIPMASK_API_UPLOADS", None, "where `POST /v1/masks` stores uploaded images before "
                      "they are masked: an S3 prefix or a folder. None: uploads are refused", "text", shown="none")
API_CALLBACKS = Setting("CLIPMASK_API_CALLBACKS", None, "URL prefixes a request's `callback_url` may start with, "
                        "comma-separated (`https://hooks.example.com/clipmask/`); anything else is `403`. None: "
                        "callbacks are refused", "text", shown="none")
WEBHOOK_SECRET = Setting("CLIPMASK_WEBHOOK_SECRET", None, "key that signs callbacks (Standard Webhooks): `whsec_` "
                         "and base64; the workers sign with it, `serve` needs it to take callbacks", "text",
                         shown="none")
API_MAX_BYTES = Setting("CLIPMASK_API_MAX_BYTES", 64 * 1024 * 1024, "largest request body `clipmask serve` "
                        "takes (an upload), bytes; larger is `413`", minimum=1, shown="67108864 (64 MiB)")

#: Every job-side variable, by name.
SETTINGS: dict[str, Setting] = {setting.name: setting for setting in (
    REDIS_URL, QUEUE, TASK_TIME_LIMIT, VISIBILITY_TIMEOUT, RESTORE_INTERVAL, RESTORE_THROTTLE, RESULT_EXPIRES,
    JOB_WINDOW, STORAGE_RETRY_S, RETRY_MAX_DELAY_S, HEAL_INTERVAL, SCHEDULE, API_TOKENS, API_ALLOWED, API_UPLOADS,
    API_CALLBACKS, WEBHOOK_SECRET, API_MAX_BYTES)}


def redis_url() -> str:
    """``CLIPMASK_REDIS_URL``, else the Redis among the Celery backend and broker URLs."""
    explicit = REDIS_URL.get()
    if explicit:
        return explicit
    for name in ("CELERY_RESULT_BACKEND", "CELERY_BROKER_URL"):
        value = os.environ.get(name, "")
        if value.startswith(("redis://", "rediss://", "unix://")):
            return value
    return "redis://127.0.0.1:6379/0"


def table_rows() -> list[str]:
    """The configuration table's ``CLIPMASK_*`` rows (docs/operations.md), worker side first."""
    from worker.settings import SETTINGS as WORKER_SIDE

    return [f"| `{s.name}` | {s.meaning} | {s.default_text} |" for s in (*WORKER_SIDE.values(), *SETTINGS.values())]


if __name__ == "__main__":  # prints the rows for docs/operations.md
    print("\n".join(table_rows()))
