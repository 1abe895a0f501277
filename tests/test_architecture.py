"""The architecture holds: import rules (import-linter's contracts in pyproject.toml), what the job
side loads when it starts, and one list of settings that the operations guide documents."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import CLIPMASK, REPO

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_torch_import_on_the_job_side_breaks_a_contract(tmp_path):
    # Given a copy of the code where a job-side module imports torch
    for name in ("storage", "worker", "tasks"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "tasks" / "jobs" / "tensors.py").write_text("import torch\n")
    # When the contracts are checked
    result = lint_imports(tmp_path)
    # Then the job side's contract is broken, naming the import
    assert result.returncode == 1, result.stdout
    assert "the job side imports no torch, transformers or engine BROKEN" in result.stdout
    assert "tasks.jobs.tensors -> torch" in result.stdout


def test_every_worker_module_is_in_one_contract_or_the_other():
    """A new module of worker/ is either plain (no Celery, no boto3) or one of the three that run
    a Celery worker: it cannot slip past the contracts unlisted."""
    text = (REPO / "pyproject.toml").read_text()
    plain = set(re.findall(r'"worker\.(\w+)"', text.split('name = "the engine', 1)[1].split("forbidden_modules")[0]))
    celery_side = {"celery_app", "start", "watchdog"}
    modules = {path.stem for path in (REPO / "worker").glob("*.py") if path.stem != "__init__"}
    assert plain | celery_side == modules and not plain & celery_side


def imported_modules(code: str) -> set[str]:
    """Top-level packages a fresh interpreter imports for ``code`` (``python -X importtime``)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", result.stderr, re.M)
    return {name.split(".")[0] for name in names}


def test_the_cli_imports_no_torch_and_version_no_celery_or_boto3():
    assert "torch" not in imported_modules("import tasks.cli")
    loaded = imported_modules("import sys; from tasks.cli import main; sys.argv = ['clipmask', '--version']; main()")
    assert not loaded & {"torch", "celery", "kombu", "boto3", "botocore", "redis"}, loaded


@pytest.mark.parametrize("code", ["import tasks.jobs.planning, tasks.jobs.healing, tasks.client, tasks.preview",
                                  "from tasks.cli import commands",
                                  "import tasks.api.app, tasks.api.server"])
def test_the_job_side_imports_no_torch(code):
    assert not imported_modules(code) & {"torch", "torchvision", "transformers"}


def configuration_rows() -> list[str]:
    """The ``CLIPMASK_*`` rows of the configuration table in docs/operations.md."""
    text = (REPO / "docs" / "operations.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `CLIPMASK_")]


def test_the_configuration_table_is_the_settings_tables():
    from tasks.settings import SETTINGS as JOB_SIDE
    from tasks.settings import table_rows
    from worker.settings import SETTINGS as WORKER_SIDE

    # Every variable once, on one side only, each row as the settings say (`python -m tasks.settings`)
    assert not set(JOB_SIDE) & set(WORKER_SIDE)
    assert sorted(configuration_rows()) == sorted(table_rows())


def test_no_module_reads_a_clipmask_variable_of_its_own():
    """Every ``CLIPMASK_*`` variable is read through the settings tables, in one place."""
    readers = subprocess.run(["grep", "-rlE", r"environ(\.get)?[\[(]\s*\"CLIPMASK_", "storage", "worker", "tasks",
                              "celeryconfig.py"], cwd=REPO, capture_output=True, text=True)
    assert readers.stdout.split() == [], readers.stdout


def test_version_answers_without_a_broker(tmp_path):
    result = subprocess.run([*CLIPMASK, "--version"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 0 and result.stdout.startswith("clipmask "), result.stderr
