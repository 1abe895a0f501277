"""Scheduled batches: Celery beat over real workers. One job of an entry at a time, also under two
beats; cron entries; a malformed entry refused at start; no job when nothing is new; the entry's
last job found in storage after Redis lost its data.

Real parts only: redis-server (the broker and the job index), ``celery beat`` and ``clipmask
worker`` as subprocesses, local folders as SRC and DST (so that the job records' times are exact
to the nanosecond), the tiny random CLIPSeg.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from tests.images import png
from tests.metrics import scrape, total
from tests.processes import REPO, Worker, stop_group, wait_for
from tests.services import free_port

CELERY = str(Path(sys.executable).with_name("celery"))
#: One chunk of one image queued at a time: a job of a few dozen images lasts many beat ticks
#: (every 0.25 s), and the scans that beat sends meanwhile run between its chunks.
SLOW_JOBS = {"CLIPMASK_JOB_WINDOW": "1", "CLIPMASK_WORKER_TASKS": "2"}


class Beat:
    """``celery -A worker.celery_app beat`` in its own process group, logging to a file."""

    def __init__(self, env: dict, folder: Path, name: str = "beat", loglevel: str = "INFO"):
        self.log_path = folder / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [CELERY, "-A", "worker.celery_app", "beat", "--schedule", str(folder / f"{name}-schedule"),
                 "--loglevel", loglevel, "--max-interval", "1"],
                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline and self.process.poll() is None, self.log()
            time.sleep(0.2)
        return self.log()

    def stop(self) -> None:
        stop_group(self.process)


@pytest.fixture
def beats(tmp_path):
    """Start beat processes: ``beats(env, name)``; all stopped at the end."""
    started: list[Beat] = []

    def start(env: dict, name: str = "beat", **options) -> Beat:
        beat = Beat(env, tmp_path, name, **options)
        started.append(beat)
        return beat

    yield start
    for beat in started:
        beat.stop()


def images(folder: Path, first: int, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        (folder / f"img{i:04d}.png").write_bytes(png(i))


def arrive(src: Path, first: int, count: int) -> None:
    """New images under ``src``, all at once (a folder renamed into place): a scan sees all or none."""
    staging = src.parent / f"staging-{first}"
    images(staging, first, count)
    staging.rename(src / f"new-{first}")


def schedule_env(env_of, redis_url: str, entries: list[dict], **extra) -> dict:
    return env_of(redis_url, CLIPMASK_SCHEDULE=json.dumps(entries), **extra)


def jobs_in(out: Path) -> list[dict]:
    """The jobs under ``out/_jobs/``, oldest first: id, when ``job.json`` and ``summary.json``
    were written (ns; None while unfinished), and the summary."""
    found = []
    for folder in sorted((out / "_jobs").glob("*/job.json")):
        summary = folder.parent / "summary.json"
        found.append({"id": folder.parent.name, "created": folder.stat().st_mtime_ns,
                      "finished": summary.stat().st_mtime_ns if summary.exists() else None,
                      "summary": json.loads(summary.read_text()) if summary.exists() else None})
    return sorted(found, key=lambda job: job["created"])


def wait_for_jobs(out: Path, count: int, worker: Worker, timeout: float = 180) -> list[dict]:
    """The jobs under ``out`` once ``count`` of them have finished."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_in(out)
        if sum(job["finished"] is not None for job in jobs) >= count:
            return jobs
        assert time.monotonic() < deadline, (jobs, worker.log())
        time.sleep(0.3)


def assert_one_at_a_time(jobs: list[dict]) -> None:
    """Each job was created after the one before it had finished (its summary written)."""
    for before, after in pairwise(jobs):
        assert before["finished"] is not None and after["created"] > before["finished"], jobs


def scan_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "scheduled scan" in line]


# --- beat over a slow job ------------------------------------------------------------------


def test_beat_over_a_slow_job_starts_the_next_job_only_after_it_finished(tmp_path, redis_url, env_of, workers,
                                                                          beats):
    src, out = tmp_path / "in", tmp_path / "out"
    images(src, 0, 40)
    entry = {"source": str(src), "dest": str(out), "prompt": "a cat", "every_s": 0.25, "chunk_size": 1}
    env = schedule_env(env_of, redis_url, [entry], **SLOW_JOBS)
    # Given a worker and beat firing the entry 4 times a second, over a job of 40 one-image chunks
    worker = workers(env)
    beat = beats(env)
    first = wait_for_jobs(out, 1, worker)[0]
    # When new images arrive after the first job finished
    arrive(src, 100, 3)
    jobs = wait_for_jobs(out, 2, worker)
    beat.stop()
    time.sleep(2)  # the scans beat sent last have run
    jobs = wait_for_jobs(out, len(jobs_in(out)), worker)
    # Then the first job masked everything, the next one only the new images, and no job of the
    # entry began before the one before it had finished
    assert first["summary"]["succeeded"] == 40
    assert jobs[0]["id"] == first["id"] and jobs[1]["summary"]["succeeded"] == 3
    assert_one_at_a_time(jobs)
    # And the scans that came while a job ran said which job they waited for
    log = worker.log()
    busy = [line for line in scan_lines(log) if f"nothing submitted: job {first['id']} has not finished" in line]
    assert busy, log
    assert f"({entry['source']} -> {entry['dest']})" in busy[0]
    assert "Traceback" not in log, log


def test_two_beats_of_the_same_schedule_start_one_job_at_a_time(tmp_path, redis_url, env_of, workers, beats):
    src, out = tmp_path / "in", tmp_path / "out"
    images(src, 0, 40)
    entry = {"source": str(src), "dest": str(out), "prompt": "a cat", "every_s": 0.25, "chunk_size": 1}
    env = schedule_env(env_of, redis_url, [entry], **SLOW_JOBS)
    # Given two beats started by mistake with the same schedule, each firing the entry 4 times a second
    worker = workers(env)
    beat_a, beat_b = beats(env, "beat-a"), beats(env, "beat-b")
    wait_for_jobs(out, 1, worker)
    arrive(src, 100, 3)
    wait_for_jobs(out, 2, worker)
    for beat in (beat_a, beat_b):
        assert "Sending due task clipmask-scan-0" in beat.log(), beat.log()
        beat.stop()
    time.sleep(2)
    jobs = wait_for_jobs(out, len(jobs_in(out)), worker)
    # Then their scans never made two jobs of the entry at once
    assert_one_at_a_time(jobs)
    assert [job["summary"]["succeeded"] for job in jobs[:2]] == [40, 3], jobs
    assert "Traceback" not in worker.log()


# --- cron entries and malformed entries ------------------------------------------------------


def test_a_cron_entry_is_celerys_crontab(monkeypatch):
    from celery.schedules import crontab

    from tasks.jobs.schedule import beat_schedule
    from tasks.settings import SCHEDULE

    entry = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog", "cron": "*/5 * * * *"}
    monkeypatch.setenv("CLIPMASK_SCHEDULE", json.dumps([entry]))
    schedule = beat_schedule(SCHEDULE.get())
    assert schedule["clipmask-scan-0"]["kwargs"] == {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog"}
    cron = schedule["clipmask-scan-0"]["schedule"]
    assert cron == crontab(minute="*/5", hour="*", day_of_month="*", month_of_year="*", day_of_week="*")
    now = datetime.now(UTC)
    due, _ = cron.is_due(now - timedelta(minutes=6))
    assert due
    due, next_s = cron.is_due(now)
    assert not due and 0 < next_s <= 300
    assert timedelta(0) < cron.remaining_estimate(now) <= timedelta(minutes=5)


def test_beat_runs_a_cron_entry(tmp_path, redis_url, env_of, beats):
    entry = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog", "cron": "15 */6 * * mon-fri"}
    beat = beats(schedule_env(env_of, redis_url, [entry]), loglevel="DEBUG")
    log = beat.wait_for_log("<crontab: 15 */6 * * mon-fri")
    assert "clipmask-scan-0" in log and "Traceback" not in log


def test_beat_refuses_a_bad_cron_entry_at_start_naming_it(tmp_path, redis_url, env_of, beats):
    good = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog", "every_s": 60}
    bad = {**good, "dest": "s3://b/other/", "cron": "61 * * * *"}
    del bad["every_s"]
    beat = beats(schedule_env(env_of, redis_url, [good, bad]))
    assert beat.process.wait(60) != 0
    assert 'CLIPMASK_SCHEDULE entry 1: bad cron "61 * * * *": minute 61: Invalid end range' in beat.log()


@pytest.mark.parametrize("change, reason", [
    ({"cron": "0 * * * *"}, 'has both of "every_s"'),
    ({"every_s": None}, 'has neither of "every_s"'),
    ({"every_s": 0}, '"every_s" must be a number of seconds above 0, got 0'),
    ({"every_s": None, "cron": "0 * * *"}, 'bad cron "0 * * *": five fields expected'),
    ({"every_s": None, "cron": "0 0 31 2 *"}, "never occurs"),
    ({"every_s": None, "cron": "* 24 * * *"}, 'bad cron "* 24 * * *": hour 24:'),
    ({"chunk_size": 0}, '"chunk_size" must be a whole number of at least 1'),
    ({"threshold": 2}, "threshold must be in [0, 1]"),
    ({"treshold": 0.4}, "unknown key(s) 'treshold'"),
    ({"prompt": None}, "needs 'prompt'"),
])
def test_a_malformed_entry_is_refused_with_its_index_and_reason(change, reason):
    from tasks.jobs.schedule import beat_schedule

    good = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog", "every_s": 60}
    entry = {key: value for key, value in {**good, **change}.items() if value is not None}
    with pytest.raises(ValueError) as raised:
        beat_schedule([good, good, entry])
    assert str(raised.value).startswith("CLIPMASK_SCHEDULE entry 2: ") and reason in str(raised.value)


def test_an_entry_is_known_by_what_it_scans():
    from tasks.jobs.schedule import entry_id

    scan = {"source": "s3://b/in/", "dest": "s3://b/out/", "prompt": "dog"}
    assert entry_id(scan) == entry_id({**scan, "negative": None}) == entry_id(dict(reversed(scan.items())))
    assert len({entry_id(scan), entry_id({**scan, "dest": "s3://b/o2/"}), entry_id({**scan, "threshold": 0.4}),
                entry_id({**scan, "negative": "tree"})}) == 4


# --- nothing new, and Redis losing its data ------------------------------------------------------


@pytest.fixture
def backend_app(monkeypatch):
    """This process configured as a worker is, from an environment: ``backend_app(env)``."""
    from worker.celery_app import app

    saved = {name: app.conf[name] for name in ("broker_url", "result_backend", "task_default_queue")}

    def configure(env: dict):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        app.conf.update(broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
                        task_default_queue=env["CLIPMASK_QUEUE"])
        return app

    yield configure
    app.conf.update(saved)


def test_a_scan_with_nothing_new_creates_no_job(tmp_path, redis_url, env_of, workers, backend_app):
    src, out = tmp_path / "in", tmp_path / "out"
    images(src, 0, 3)
    port = free_port()
    env = env_of(redis_url, CLIPMASK_METRICS_PORT=str(port))
    app = backend_app(env)
    worker = workers(env)
    scan = {"source": str(src), "dest": str(out), "prompt": "a cat"}
    # Given a scan whose job masked every image
    first = app.send_task("clipmask.scheduled_scan", kwargs=scan).get(timeout=120)
    assert wait_for(first, env, worker=worker)["succeeded"] == 3
    # When the schedule fires again with nothing new under the source
    second = app.send_task("clipmask.scheduled_scan", kwargs=scan).get(timeout=120)
    # Then no job is created, the scan says so and counts it
    assert second is None
    assert [job["id"] for job in jobs_in(out)] == [first]
    assert sorted(path.name for path in (out / "_jobs").iterdir() if path.is_dir()) == [first]
    assert "nothing new: 3 image(s) up to date, no job created" in worker.log(), worker.log()
    samples = scrape(port)
    assert total(samples, "clipmask_scans_total", result="nothing_new") == 1
    assert total(samples, "clipmask_scans_total", result="submitted") == 1


def test_a_scan_finds_the_last_job_in_storage_after_redis_lost_its_data(tmp_path, redis_server, env_of, workers,
                                                                        backend_app, caplog):
    from tasks.jobs import scans
    from tasks.jobs.schedule import entry_id

    src, out = tmp_path / "in", tmp_path / "out"
    images(src, 0, 4)
    env = env_of(redis_server.url)
    backend_app(env)
    scan = {"source": str(src), "dest": str(out), "prompt": "a cat", "chunk_size": 2}
    # Given a scheduled job queued while no worker runs
    first = scans.run_scan(**scan)
    assert first and json.loads((out / scans.last_job_key(entry_id(scan))).read_text())["job_id"] == first
    # When Redis restarts without its data (the job's index, its queued chunks, the entry's lock
    # and last job are gone)
    redis_server.stop()
    redis_server.start()
    # Then the next scan finds the unfinished job in storage, submits nothing, and resumes it
    with caplog.at_level(logging.INFO, logger="tasks.jobs"):
        assert scans.run_scan(**scan) is None
    assert f"job {first}: Redis had lost its records; resumed it" in caplog.text
    assert f"nothing submitted: job {first} has not finished (Redis had lost its records; resumed)" in caplog.text
    assert [job["id"] for job in jobs_in(out)] == [first]
    # And once a worker finished it, the next scan submits the next job
    worker = workers(env)
    assert wait_for(first, env, worker=worker)["succeeded"] == 4
    images(src, 100, 1)
    second = scans.run_scan(**scan)
    assert second not in (None, first)
    assert wait_for(second, env, worker=worker)["succeeded"] == 1
    assert_one_at_a_time(jobs_in(out))


# --- the lock ----------------------------------------------------------------------------------


def test_a_lease_has_one_holder_is_renewed_while_held_and_freed_only_by_its_holder(redis_url):
    import redis

    from tasks.jobs.lease import Lease

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = f"clipmask:lock:test-{os.getpid()}-{time.monotonic_ns()}"
    # Given a lease of 0.3 s, held for longer than that
    with Lease(client, key, seconds=0.3) as first:
        assert first.held
        time.sleep(0.8)
        # Then it was renewed: a second holder is refused and told who holds it
        with Lease(client, key) as second:
            assert not second.held and second.holder == first.token.rpartition(":")[0]
    # And released, it is free again
    assert client.get(key) is None
    # And a holder whose lease ran out, the lock taken by another meanwhile, neither renews nor
    # frees the other's lock
    with Lease(client, key, seconds=0.3):
        client.set(key, "elsewhere:1:0123abcd", px=5000)
        time.sleep(0.3)
    assert client.get(key) == "elsewhere:1:0123abcd" and 1000 < client.pttl(key) <= 5000
