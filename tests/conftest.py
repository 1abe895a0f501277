"""Shared fixtures: real Redis and S3 (moto) servers for the whole test session."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from tests.images import sample_inputs
from tests.services import MotoServer, RedisServer, s3_test_env

# --- services: Redis -------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server; tests may stop() and start() it (same port)."""
    server = RedisServer(workdir=str(tmp_path_factory.mktemp("redis")))
    with server.start():
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


# --- services: S3 (moto) ---------------------------------------------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's S3 HTTP server, running for the whole session."""
    server = MotoServer(workdir=str(tmp_path_factory.mktemp("moto")))
    with server.start():
        yield server


@pytest.fixture(scope="session")
def s3_env(moto_server):
    """Point boto3 (here and in subprocesses) at moto, from now until session end."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in s3_test_env(moto_server.endpoint).items():
            mp.setenv(name, value)
        yield dict(os.environ)


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """Name of a fresh, empty bucket on the moto server."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def env_of(tiny_model, s3_env):
    """The environment (S3 on moto, the tiny model) of a user's shell for a given Redis, with a queue of the test's own."""
    def make(redis_url: str, **extra) -> dict:
        base = redis_url.rsplit("/", 1)[0]
        return {**s3_env, "CELERY_BROKER_URL": f"{base}/0", "CELERY_RESULT_BACKEND": f"{base}/1",
                "CLIPMASK_MODEL": tiny_model, "CLIPMASK_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
                "HF_HUB_OFFLINE": "1", **extra}
    return make


@pytest.fixture
def job_env(env_of, redis_url):
    """Environment of a user's shell: broker, results, S3 and model, a queue of this test's own."""
    return env_of(redis_url)


# --- models ----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny random CLIPSeg with tokenizer and processor, built offline."""
    from worker.random_model import build_random_clipseg

    return str(build_random_clipseg(tmp_path_factory.mktemp("models") / "tiny", shape="tiny"))


@pytest.fixture(scope="session")
def engine(tiny_model):
    """A CPU mask engine on the tiny model, shared by the tests that only read from it."""
    from worker.engine import MaskEngine

    return MaskEngine.load(tiny_model, device="cpu", batch_size=3)


# --- inputs ----------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    """The sample inputs (JPEG, grey PNG, RGBA PNG, WebP, a corrupt JPEG) in nested folders."""
    root = tmp_path / "images"
    for key, data in sample_inputs().items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


# --- workers ---------------------------------------------------------------


@pytest.fixture
def workers(tmp_path):
    """Start ``clipmask worker`` processes: ``workers(env, name)``; all killed at the end."""
    from tests.processes import Worker

    started: list[Worker] = []

    def start(env: dict, name: str = "w") -> Worker:
        worker = Worker(env, tmp_path / f"{name}-{len(started)}.log", f"{name}{len(started)}-{uuid.uuid4().hex[:6]}")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop_quietly()


@pytest.fixture
def start_worker(job_env, tmp_path):
    """Start ``clipmask worker`` in ``job_env`` (``env`` on top): ``start_worker(name, **env)``; all
    killed at the end."""
    from tests.processes import Worker

    started: list[Worker] = []

    def start(name: str = "w1", **env) -> Worker:
        worker = Worker({**job_env, **env}, tmp_path / f"{name}.log", f"{name}-{uuid.uuid4().hex[:6]}")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop_quietly()
