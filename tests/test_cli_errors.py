"""Every wrong input a user types gets a message that says what to change, and a documented
exit code (``clipmask --help``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.processes import REPO, clipmask
from tests.services import free_port


@pytest.fixture
def env(redis_url, tiny_model):
    base = redis_url.rsplit("/", 1)[0]
    return {**os.environ, "CELERY_BROKER_URL": f"{base}/0", "CELERY_RESULT_BACKEND": f"{base}/1",
            "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1", "CLIPMASK_QUEUE": "cli-errors"}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not really a png")
    return tmp_path / "in"


def test_help_documents_the_exit_codes_and_version_is_printed(env):
    for args in (["--help"], ["submit", "--help"], ["status", "--help"]):
        result = clipmask(*args, env=env)
        assert result.returncode == 0 and "exit codes:" in result.stdout and "usage or configuration" in result.stdout
    version = clipmask("--version", env=env)
    assert version.returncode == 0 and version.stdout.startswith("clipmask ")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
    (["--batch-size", "many"], "--batch-size: must be a whole number, got 'many'"),
    (["--max-side", "0"], "--max-side: must be at least 1"),
])
def test_run_rejects_bad_numbers_with_their_bound(folder, tmp_path, env, args, message):
    result = clipmask("run", str(folder), "--out", str(tmp_path / "out"), "--prompt", "dog", *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_submit_rejects_a_chunk_size_below_one(folder, tmp_path, env):
    result = clipmask("submit", str(folder), "--out", str(tmp_path / "out"), "--prompt", "dog", "--chunk-size", "0",
                      env=env)
    assert result.returncode == 2 and "--chunk-size: must be at least 1" in result.stderr


@pytest.mark.parametrize("args, variables, message", [
    (["--processes-per-device", "0"], {}, "--processes-per-device: must be at least 1, got 0"),
    ([], {"CLIPMASK_PROCESSES_PER_DEVICE": "0"},
     "--processes-per-device (default $CLIPMASK_PROCESSES_PER_DEVICE) must be at least 1, got 0"),
    ([], {"CLIPMASK_WORKER_TASKS": "0"}, "--tasks (default $CLIPMASK_WORKER_TASKS) must be at least 1, got 0"),
])
def test_worker_rejects_a_process_or_task_count_below_one_before_starting(env, args, variables, message):
    result = clipmask("worker", "--device", "cpu", *args, env={**env, **variables}, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_missing_source_or_a_file_is_named_as_such(folder, tmp_path, env, command):
    missing = clipmask(command, str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--prompt", "dog", env=env)
    assert missing.returncode == 2 and "does not exist: pass a folder of images" in missing.stderr
    a_file = clipmask(command, str(folder / "a.png"), "--out", str(tmp_path / "out"), "--prompt", "dog", env=env)
    assert a_file.returncode == 2 and "is a file: pass the folder that holds the images" in a_file.stderr
    assert "Traceback" not in missing.stderr + a_file.stderr


@pytest.mark.skipif(os.geteuid() == 0 and not os.environ.get("CLIPMASK_TEST_AS_USER"),
                    reason="root writes anywhere: an unwritable folder needs a non-root user")
def test_an_unwritable_out_is_found_before_any_image(folder, tmp_path, env):
    out = tmp_path / "locked"
    out.mkdir(mode=0o500)
    result = clipmask("run", str(folder), "--out", str(out), "--prompt", "dog", env=env)
    assert result.returncode == 2 and "cannot write to --out" in result.stderr


def test_an_out_below_a_file_is_found_before_any_image(folder, tmp_path, env):
    (tmp_path / "plain-file").write_text("x")
    for command in ("run", "submit"):
        result = clipmask(command, str(folder), "--out", str(tmp_path / "plain-file" / "out"), "--prompt", "dog",
                          env=env)
        assert result.returncode == 2 and "cannot write to --out" in result.stderr, result.stderr
        assert "choose a writable folder or bucket" in result.stderr


@pytest.mark.parametrize("broker, message", [
    ("amqp://guest:guest@127.0.0.1:{port}//", "cannot reach the broker at amqp://guest:***@127.0.0.1"),
    ("redis//localhost:6379/0", "CELERY_BROKER_URL 'redis//localhost:6379/0' is not a broker URL"),
    ("localhost:6379", "is not a broker URL: expected redis://host:6379/0 or amqp://"),
])
def test_a_wrong_broker_url_is_named_before_a_job_is_recorded(folder, tmp_path, env, broker, message):
    bad = {**env, "CELERY_BROKER_URL": broker.format(port=free_port())}
    result = clipmask("submit", str(folder), "--out", str(tmp_path / "out"), "--prompt", "dog", env=bad, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "cannot reach Redis" not in result.stderr
    assert not list((tmp_path / "out").glob("_jobs/*/job.json")), "no job is recorded"


@pytest.mark.parametrize("command", ["status", "cancel", "resume"])
def test_an_unknown_job_exits_1_with_its_id(env, command):
    result = clipmask(command, "nosuchjob", env=env)
    assert result.returncode == 1 and "no job 'nosuchjob'" in result.stderr


def test_verbose_works_after_the_subcommand_too(folder, tmp_path, env):
    result = clipmask("run", str(folder), "--out", str(tmp_path / "out"), "--prompt", "dog", "--quiet", "-v",
                      "--device", "cpu", env=env)
    assert result.returncode == 1  # the one input is corrupt
    assert "INFO" in result.stderr and "a.png" in result.stderr


def imports_of(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``clipmask ARGS`` under ``python -X importtime``: its result, and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "tasks.cli", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    modules = {name.split(".")[0] for name in re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$",
                                                            result.stderr, re.M)}
    return result, modules


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "--threshold must be in [0, 1]"),
    (["--prompt", ""], "--prompt"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--source-is-missing"], "does not exist: pass a folder of images"),
])
def test_run_reports_a_bad_option_or_source_before_it_loads_torch(folder, tmp_path, env, args, message):
    source = str(tmp_path / "nope") if args == ["--source-is-missing"] else str(folder)
    extra = [] if args == ["--source-is-missing"] else args
    result, modules = imports_of(["run", source, "--out", str(tmp_path / "out"), "--prompt", "dog", *extra], env)
    assert result.returncode == 2 and message.lower() in result.stderr.lower(), result.stderr[-2000:]
    assert "torch" not in modules and "transformers" not in modules


def test_an_unwritable_out_is_reported_before_a_missing_model(folder, tmp_path, env):
    (tmp_path / "plain-file").write_text("x")
    result = clipmask("run", str(folder), "--out", str(tmp_path / "plain-file" / "out"), "--prompt", "dog",
                      env={**env, "CLIPMASK_MODEL": str(tmp_path / "no-such-model")})
    assert result.returncode == 2 and "cannot write to --out" in result.stderr, result.stderr
    assert "no-such-model" not in result.stderr


def test_a_submit_the_broker_refuses_leaves_nothing_in_out(folder, tmp_path, env):
    bad = {**env, "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}
    result = clipmask("submit", str(folder), "--out", str(tmp_path / "out"), "--prompt", "dog", env=bad, timeout=60)
    assert result.returncode == 2 and "cannot reach the broker" in result.stderr
    assert not (tmp_path / "out" / "_jobs").exists()


def test_no_progress_bar_is_drawn_before_there_is_progress(tmp_path, env):
    (tmp_path / "empty").mkdir()
    submitted = clipmask("submit", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--prompt", "dog", env=env)
    assert submitted.returncode == 2 and "no images under" in submitted.stderr
    resumed = clipmask("resume", "nosuchjob", env=env)
    assert resumed.returncode == 1
    for stderr in (submitted.stderr, resumed.stderr):
        assert "img" not in stderr and "queued" not in stderr and "planned" not in stderr, stderr


@pytest.mark.parametrize("command", ["status", "cancel", "resume", "preview"])
def test_only_commands_that_mask_images_offer_to_log_every_image(env, command):
    result = clipmask(command, "--help", env=env)
    assert result.returncode == 0 and "log every image" not in result.stdout
    assert "log every image" in clipmask("run", "--help", env=env).stdout
