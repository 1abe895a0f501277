"""Scheduled batches: ``CLIPMASK_SCHEDULE`` read into Celery beat's schedule, and each entry's id.

An entry is ``{"source", "dest", "prompt", "negative"?, "chunk_size"?, mask options...}`` with
either ``"every_s": seconds`` or ``"cron": "m h dom mon dow"`` (five fields, Celery's own
``crontab``, in UTC). ``beat_schedule`` checks every entry, so that a malformed one stops beat
(and the workers, which read the same ``celeryconfig``) at start, naming the entry and the reason.

An entry is known by the hash of what it scans (``entry_id``: everything but when it runs), so
that every beat started from the same schedule, and every worker, agrees on it
(``tasks/jobs/scans.py``). Light to import: ``celeryconfig`` loads it.
"""

from __future__ import annotations

import hashlib
import json

from worker.spec import MaskSpec

TASK = "clipmask.scheduled_scan"
#: The keys that say when an entry runs (exactly one of them), and those that say what it scans.
WHEN = ("every_s", "cron")
REQUIRED = ("source", "dest", "prompt")
#: Celery's crontab arguments, in the order of a cron expression's five fields.
CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


def entry_id(scan: dict) -> str:
    """A stable id of a scan (an entry's kwargs: source, dest, prompt, negative, options): the
    same for the same content, whatever the entry's place in the list or its schedule."""
    content = {**scan, "negative": scan.get("negative") or ""}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def beat_schedule(entries: object) -> dict:
    """Celery's ``beat_schedule`` for the entries of ``CLIPMASK_SCHEDULE``: ``clipmask-scan-<i>``
    sends ``clipmask.scheduled_scan`` with the entry's scan as kwargs. Raises ``ValueError``
    naming the first malformed entry (its index in the list) and what is wrong with it, or
    ``TypeError`` when the schedule is not a list."""
    if not isinstance(entries, list):
        raise TypeError(f"CLIPMASK_SCHEDULE must be a JSON list of entries, got {json.dumps(entries)[:80]}")
    return {f"clipmask-scan-{i}": {"task": TASK, "schedule": _when(i, entry), "kwargs": _scan(i, entry)}
            for i, entry in enumerate(entries)}


def _scan(index: int, entry: dict) -> dict:
    """The entry's kwargs for ``scheduled_scan``, once they make a valid job."""
    scan = {key: value for key, value in entry.items() if key not in WHEN}
    missing = [key for key in REQUIRED if not isinstance(scan.get(key), str) or not scan[key]]
    if missing:
        raise _bad(index, f"needs {', '.join(repr(key) for key in missing)} (text)")
    if not isinstance(scan.get("negative") or "", str):
        raise _bad(index, f'"negative" must be text, got {json.dumps(scan["negative"])}')
    chunk_size = scan.get("chunk_size", 1)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise _bad(index, f'"chunk_size" must be a whole number of at least 1, got {chunk_size!r}')
    options = {key: value for key, value in scan.items() if key not in (*REQUIRED, "negative", "chunk_size")}
    known = sorted(set(MaskSpec.__dataclass_fields__) - {"prompts", "negative_prompts"})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise _bad(index, f"unknown key(s) {', '.join(map(repr, unknown))}; an entry takes {', '.join(WHEN)}, "
                          f"{', '.join(REQUIRED)}, negative, chunk_size and the mask options {', '.join(known)}")
    try:
        MaskSpec.from_text(scan["prompt"], scan.get("negative"), **options)
    except ValueError as err:  # InvalidSpecError: the option and what it takes
        raise _bad(index, str(err)) from None
    return scan


def _when(index: int, entry: object) -> float | object:
    """Seconds between runs, or a ``celery.schedules.crontab``."""
    if not isinstance(entry, dict):
        raise _bad(index, f"must be a JSON object, got {json.dumps(entry)}")
    given = [key for key in WHEN if key in entry]
    if len(given) != 1:
        raise _bad(index, f'has {"both" if given else "neither"} of "every_s" (seconds between runs) and "cron" '
                          '(five fields, e.g. "0 * * * *"): give one')
    if given == ["cron"]:
        return crontab_of(index, entry["cron"])
    every = entry["every_s"]
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0:
        raise _bad(index, f'"every_s" must be a number of seconds above 0, got {json.dumps(every)}')
    return float(every)


def crontab_of(index: int, expression: object):
    """``expression`` ("0 * * * *": minute, hour, day of month, month, day of week) as Celery's
    ``crontab``; ``ValueError`` naming the entry and the field it cannot read."""
    from celery.schedules import crontab

    fields = expression.split() if isinstance(expression, str) else []
    if len(fields) != len(CRON_FIELDS):
        raise _bad(index, f"bad cron {json.dumps(expression)}: five fields expected "
                          "(minute hour day-of-month month day-of-week), e.g. \"0 * * * *\"")
    for name, value in zip(CRON_FIELDS, fields):
        try:
            crontab(**{name: value})
        except ValueError as err:
            raise _bad(index, f"bad cron {json.dumps(expression)}: {name.replace('_', ' ')} {value}: {err}") from None
    try:
        return crontab(**dict(zip(CRON_FIELDS, fields)))
    except ValueError as err:  # fields that never meet (the 31st of February)
        raise _bad(index, f"bad cron {json.dumps(expression)}: {err}") from None


def _bad(index: int, reason: str) -> ValueError:
    return ValueError(f"CLIPMASK_SCHEDULE entry {index}: {reason}")
