"""Running clipmask's own commands as a user would: subprocesses with an environment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# The installed console script, as users run it (the test command installs the project).
CLIPMASK = [str(Path(sys.executable).with_name("clipmask"))]
REPO = Path(__file__).resolve().parent.parent
#: Healing settings that fit a test: redelivery and healing after 20 s without progress.
FAST_HEALING = {"CLIPMASK_VISIBILITY_TIMEOUT": "20", "CLIPMASK_TASK_TIME_LIMIT": "15",
                "CLIPMASK_HEAL_INTERVAL": "3", "CLIPMASK_RESTORE_INTERVAL": "1", "CLIPMASK_RESTORE_THROTTLE": "1"}
#: Redelivery settings that fit a test: a task a dead worker held is handed out again after 4 s.
FAST_REDELIVERY = {"CLIPMASK_VISIBILITY_TIMEOUT": "4", "CLIPMASK_TASK_TIME_LIMIT": "60",
                   "CLIPMASK_RESTORE_INTERVAL": "1", "CLIPMASK_RESTORE_THROTTLE": "1"}


def clipmask(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``clipmask ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run([*CLIPMASK, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def stop_group(process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM ``process``'s group (started with ``start_new_session``) and wait; SIGKILL it if
    it has not ended within ``grace`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


class Worker:
    """``clipmask worker`` in its own process group, logging to a file."""

    def __init__(self, env: dict, log_path: Path, name: str):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [*CLIPMASK, "worker", "--device", "cpu", "--loglevel", "INFO", "-n", f"{name}@%h"],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tasks(self, event: str) -> set[str]:
        """Ids of the tasks this worker logged as ``received`` or ``succeeded``."""
        return set(re.findall(rf"Task clipmask\.\w+\[([0-9a-f-]+)\] {event}", self.log()))

    def in_flight(self) -> set[str]:
        return self.tasks("received") - self.tasks("succeeded")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (Celery's warm shutdown) and wait; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crashed machine would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def stop_quietly(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        if not self._log.closed:
            self._log.close()


def kill_mid_task(worker: Worker, timeout: float = 120) -> set[str]:
    """Wait until ``worker`` is in the middle of a task, then SIGKILL it; returns the ids of the
    tasks it held."""
    deadline = time.monotonic() + timeout
    while not worker.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.kill()
    held = worker.in_flight()
    assert held, worker.log()
    return held


def job_status(job_id: str, env: dict) -> dict:
    result = clipmask("status", job_id, "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(job_id: str, env: dict, done: int | None = None, timeout: float = 240,
             worker: Worker | None = None) -> dict:
    """Poll ``clipmask status --json`` until the job's records are written (or ``done`` outcomes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(job_id, env)
        if status["manifest"] or (done is not None and status["done"] >= done):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout}s: {status}\n" + (worker.log() if worker else ""))


def named_job(submit_proc: subprocess.Popen) -> str:
    """The job id that ``clipmask submit`` prints on stderr before it lists anything."""
    for line in submit_proc.stderr:
        if match := re.search(r"job (\w+): planning", line):
            return match.group(1)
    raise AssertionError("submit never named its job")


def manifest_rows(out: Path, job_id: str) -> list[dict]:
    """The rows of a job's manifest in a local DST."""
    return [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]


def submit(src, out, env: dict, *extra: str) -> str:
    """``clipmask submit SRC --out DST --prompt 'a cat' EXTRA``; returns the job id it printed."""
    result = clipmask("submit", str(src), "--out", str(out), "--prompt", "a cat", *extra, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def assert_each_input_once(rows: list[dict], expected_sources: set[str]) -> None:
    """Every expected input has exactly one manifest row, and no other row exists."""
    sources = [row["source"] for row in rows]
    assert len(sources) == len(set(sources)), "a manifest row is duplicated"
    assert set(sources) == expected_sources
