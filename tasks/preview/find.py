"""Finding a job under a DST for ``clipmask preview``: its id and ``summary.json``."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from storage import ObjectStore
from storage.layout import JOBS_PREFIX, job_keys

#: The job ids clipmask makes are hex; anything else cannot name a job (and never a path).
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def list_job_ids(store: ObjectStore) -> list[str]:
    """Ids of the jobs under ``_jobs/`` of ``store``, sorted, with one listing request per job.

    After the first key of a job, the listing restarts past all of that job's files (plan and
    result files number in the thousands for a large job): ``start_after`` is the job's folder
    with its trailing "/" replaced by "0", the next character, so no key of the job sorts after it.
    """
    ids: list[str] = []
    after: str | None = None
    while True:
        keys = store.list(JOBS_PREFIX, start_after=after)
        try:
            key = next(iter(keys), None)
        finally:
            getattr(keys, "close", lambda: None)()
        if key is None:
            return ids
        job_id, slash, _ = key[len(JOBS_PREFIX):].partition("/")
        if slash and job_id:
            ids.append(job_id)
            after = f"{JOBS_PREFIX}{job_id}0"
        else:
            after = key  # a stray file directly under _jobs/


def _read_summary(store: ObjectStore, job_id: str) -> dict:
    """The job's ``summary.json``; FileNotFoundError when it has none (yet), ValueError when it
    is not a JSON object."""
    key = job_keys(job_id)["summary"]
    data = store.read_bytes(key)
    try:
        summary = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{store.url_for(key)} is not valid JSON ({err}); rewrite it with "
                         f"`clipmask resume {job_id}`") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{store.url_for(key)} is not a JSON object")
    return summary


def _when(summary: dict) -> datetime:
    """When a job ended (else began), as an aware datetime; the epoch when unknown or malformed."""
    for name in ("finished_at", "created_at"):
        value = summary.get(name)
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(0, timezone.utc)


def find_job(store: ObjectStore, job_id: str | None = None) -> tuple[str, dict]:
    """``(job_id, summary)`` of ``job_id``, or of the most recently finished job in ``store``.

    Raises LookupError naming the jobs there when ``job_id`` is not one of them, and
    FileNotFoundError, saying what to do, when there is no job or it has no summary yet.
    """
    if job_id is not None:
        if _JOB_ID.match(job_id):
            try:
                return job_id, _read_summary(store, job_id)
            except FileNotFoundError:
                pass
        ids = list_job_ids(store)
        if job_id in ids:
            raise FileNotFoundError(
                f"job {job_id} under {store.url} has no summary.json yet: it is still running or was "
                f"interrupted; wait for it (clipmask status {job_id}) or finish it (clipmask resume {job_id})")
        known = ", ".join(ids) if ids else "none"
        raise LookupError(f"no job {job_id!r} under {store.url}; jobs there: {known}")
    ids = list_job_ids(store)
    finished: list[tuple[datetime, str, dict]] = []
    for candidate in ids:
        try:
            finished.append((_when(summary := _read_summary(store, candidate)), candidate, summary))
        except (FileNotFoundError, ValueError):  # running, or a damaged summary: not a candidate
            continue
    if not finished:
        if ids:
            raise FileNotFoundError(
                f"no finished job under {store.url} (jobs there without a summary.json yet: {', '.join(ids)}); "
                "wait for one to finish, or check that DST is the --out of your run")
        raise FileNotFoundError(
            f"no job under {store.url}: there is no {JOBS_PREFIX} folder; pass the --out (DST) of a "
            "finished `clipmask run` or `clipmask submit`")
    _, job_id, summary = max(finished, key=lambda item: (item[0], item[1]))
    return job_id, summary
