"""``clipmask serve`` as a backend in any language uses it: a real server (uvicorn, a subprocess on a
free port) in front of a real ``clipmask worker``, redis-server and moto's S3, called over HTTP
with requests, curl and Node."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import struct
import subprocess
import threading
import time
import uuid
import zlib
from pathlib import Path

import boto3
import pytest
import requests

from tests.images import sample_inputs
from tests.processes import CLIPMASK, REPO, Worker, clipmask
from tests.services import free_port
from tests.test_shards import samples, tar_bytes

TOKEN = "tok-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Request bodies over this are refused (small, so that the test sends little).
MAX_BYTES = 200_000
CAT = sample_inputs()["photos/cat.jpg"]
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


# --- the services ------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(s3_env) -> str:
    name = f"api-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=name)
    for key, data in sample_inputs().items():
        s3.put_object(Bucket=name, Key=f"in/{key}", Body=data)
    return name


class Receiver:
    """An HTTP server in this process that records the callbacks it is sent; ``/hooks/flaky``
    answers 503 to its first message."""

    def __init__(self):
        self.messages: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.messages.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    first = sum(path == self.path for path, _, _ in receiver.messages) == 1
                self.send_response(503 if self.path.endswith("flaky") and first else 204)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, msg_id: str, attempts: int = 1, timeout: float = 90) -> list[tuple[dict, bytes]]:
        """The messages with ``webhook-id`` ``msg_id``, once there are ``attempts`` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [(headers, body) for _, headers, body in self.messages if headers.get("webhook-id") == msg_id]
            if len(found) >= attempts:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no callback {msg_id}: {self.messages}")


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def env(s3_env, redis_url, tiny_model, bucket, tmp_path_factory, receiver, node_port) -> dict:
    base = redis_url.rsplit("/", 1)[0]
    allowed = tmp_path_factory.mktemp("allowed")
    return {**s3_env, "CELERY_BROKER_URL": f"{base}/0", "CELERY_RESULT_BACKEND": f"{base}/1",
            "CLIPMASK_MODEL": tiny_model, "CLIPMASK_QUEUE": f"test-{uuid.uuid4().hex[:8]}", "HF_HUB_OFFLINE": "1",
            "CLIPMASK_API_TOKENS": f"other-token,{TOKEN}",
            "CLIPMASK_API_ALLOWED": f"s3://{bucket}/in/,s3://{bucket}/out,{allowed}",
            "CLIPMASK_API_UPLOADS": f"s3://{bucket}/uploads/", "CLIPMASK_API_MAX_BYTES": str(MAX_BYTES),
            "CLIPMASK_API_CALLBACKS": f"{receiver.url},http://127.0.0.1:{node_port}/",
            "CLIPMASK_WEBHOOK_SECRET": SECRET}


class Server:
    """``clipmask serve`` on a free port, its log in a file."""

    def __init__(self, env: dict, log: Path):
        self.port, self.log_path = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "ab") as out:
            self.process = subprocess.Popen([*CLIPMASK, "serve", "--port", str(self.port)], env=env, cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._answers():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, headers=kwargs.pop("headers", AUTH), timeout=90, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, headers=kwargs.pop("headers", AUTH), timeout=90, **kwargs)


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    server = Server(env, tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    # SIGTERM stops it cleanly (uvicorn exits by the signal it was sent, once shut down)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) in (0, -signal.SIGTERM), server.log()
    assert "Application shutdown complete" in server.log() and "Traceback" not in server.log()


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory):
    worker = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log", f"api-{uuid.uuid4().hex[:6]}")
    yield worker
    worker.stop_quietly()


def read_object(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def keys_under(bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def upload(server: Server, data: bytes, name: str = "cat.jpg", wait: float = 0, **fields) -> requests.Response:
    return server.post(f"/v1/masks?wait={wait}", files={"file": (name, data)}, data=fields)


def problem(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:clipmask:problem:") and body["detail"]
    return body


def wait_for_job(server: Server, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get(f"/v1/jobs/{job_id}").json()
        if status.get("manifest"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished: {status}")


def bomb_png(side: int = 50_000) -> bytes:
    """A PNG of a few bytes whose header claims ``side`` x ``side`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# --- before a worker runs ------------------------------------------------------


def test_requests_wait_for_a_worker_and_a_queued_job_can_be_cancelled(server, bucket, request):
    # Given a server, and no worker yet
    # When an image is asked for with ?wait=1
    asked = server.post("/v1/masks?wait=1", json={"source": f"s3://{bucket}/in/photos/cat.jpg",
                                                   "dest": f"s3://{bucket}/out/one/", "prompt": "a cat"})
    # Then the wait runs out: 202, its id and where to ask again
    assert asked.status_code == 202, asked.text
    mask_id = asked.json()["id"]
    assert asked.json() == {"id": mask_id, "state": "queued"}
    assert asked.headers["location"] == f"/v1/masks/{mask_id}"
    assert server.get(asked.headers["location"]).status_code == 202
    # And its outputs are not there yet
    assert problem(server.get(f"/v1/masks/{mask_id}/mask.png"), 409)["state"] == "queued"

    # When a job is submitted, it is named at once and planned behind the answer
    submitted = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/", "dest": f"s3://{bucket}/out/cancelled/",
                                              "prompt": "a cat", "chunk_size": 1})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/v1/jobs/{job_id}"
    deadline = time.monotonic() + 60
    while not (status := server.get(f"/v1/jobs/{job_id}").json()).get("planned"):
        assert status["state"] in ("planning", "queued") and time.monotonic() < deadline, status
        time.sleep(0.1)
    assert (status["state"], status["total"]) == ("queued", 5)
    # Then it has no manifest yet
    assert problem(server.get(f"/v1/jobs/{job_id}/manifest"), 409)["state"] == "queued"
    # And cancelling it answers its status, cancelled
    cancelled = server.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text

    # When a worker comes up
    request.getfixturevalue("worker")
    # Then the waiting request gets its result within its wait: 200
    done = server.get(f"/v1/masks/{mask_id}?wait=60")
    assert done.status_code == 200, done.text
    assert (done.json()["state"], done.json()["status"]) == ("finished", "succeeded")
    # And the cancelled job ends with every image skipped, nothing masked
    status = wait_for_job(server, job_id)
    assert (status["state"], status["skipped"], status["succeeded"]) == ("cancelled", 5, 0)
    rows = [json.loads(line) for line in server.get(f"/v1/jobs/{job_id}/manifest").text.splitlines()]
    assert len(rows) == 5 and {row["error"] for row in rows} == {"job cancelled"}
    assert keys_under(bucket, "out/cancelled/photos/") == []


# --- masks ---------------------------------------------------------------------


def test_an_upload_is_masked_and_its_outputs_download_as_stored(server, worker, bucket):
    # When an image is uploaded with ?wait=60
    answer = upload(server, CAT, name="../My Cat!.jpg", wait=60, dest=f"s3://{bucket}/out/up/", prompt="a cat|dog",
                    negative="tree", threshold="0.4", outputs="mask,raw")
    # Then it answers 200 with the result: the manifest row and the metadata record
    assert answer.status_code == 200, answer.text
    result = answer.json()
    mask_id = result["id"]
    assert (result["state"], result["status"]) == ("finished", "succeeded")
    stored = f"uploads/{mask_id}/My_Cat_.jpg"
    assert result["source"] == f"s3://{bucket}/{stored}"
    assert read_object(bucket, stored) == CAT
    assert result["outputs"]["mask"] == f"s3://{bucket}/out/up/{mask_id}/My_Cat_.jpg.mask.png"
    meta = result["metadata"]
    assert (meta["width"], meta["height"], meta["prompts"], meta["negative_prompts"], meta["threshold"]) == (
        96, 64, ["a cat", "dog"], ["tree"], 0.4)
    # And both outputs download through the API, byte for byte what is in storage
    for role in ("mask", "raw"):
        got = server.get(result["files"][role])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.content == read_object(bucket, f"out/up/{mask_id}/My_Cat_.jpg.{role}.png")
    # And asking again gives the same result
    again = server.get(f"/v1/masks/{mask_id}")
    assert again.status_code == 200 and again.json() == result


def test_a_json_source_is_masked_and_a_corrupt_one_fails_with_its_reason(server, worker, bucket):
    # When an image in storage is named by its URL
    asked = server.post("/v1/masks", json={"source": f"s3://{bucket}/in/photos/pic.webp",
                                           "dest": f"s3://{bucket}/out/json/", "prompt": "a cat", "outputs": ["mask"]})
    assert asked.status_code == 202, asked.text
    # Then polling its Location gives the result
    result = server.get(asked.headers["location"] + "?wait=60").json()
    assert (result["status"], result["metadata"]["width"]) == ("succeeded", 64)
    assert result["outputs"]["mask"] == f"s3://{bucket}/out/json/pic.webp.mask.png"
    # And the output it was not asked for is not there
    assert "raw" not in result["files"]
    problem(server.get(f"/v1/masks/{result['id']}/raw.png"), 404)
    # When the image is corrupt, the answer is a 200 whose status is failed, with the reason
    broken = server.post("/v1/masks?wait=60", json={"source": f"s3://{bucket}/in/photos/broken.jpg",
                                                     "dest": f"s3://{bucket}/out/json/", "prompt": "a cat"})
    assert broken.status_code == 200, broken.text
    assert broken.json()["status"] == "failed" and "ImageDecodeError" in broken.json()["error"]
    assert "not-found" in problem(server.get(f"/v1/masks/{broken.json()['id']}/mask.png"), 404)["type"]
    # And an id the server never gave is unknown
    problem(server.get(f"/v1/masks/{uuid.uuid4().hex}"), 404)


def test_calls_need_a_token_of_the_list(server):
    body = {"source": "s3://b/in/a.jpg", "dest": "s3://b/out/", "prompt": "cat"}
    assert "Bearer" in problem(server.post("/v1/masks", json=body, headers={}), 401)["detail"]
    assert problem(server.post("/v1/masks", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert problem(server.get("/v1/jobs/abc", headers={"Authorization": TOKEN}), 401)
    assert problem(server.post("/v1/jobs", json={"prompt": 3}, headers={}), 401)  # before the body is judged
    # The other token of the list works too; probes need none
    other = server.get(f"/v1/masks/{uuid.uuid4().hex}", headers={"Authorization": "Bearer other-token"})
    assert other.status_code == 404
    assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}


def test_sources_and_dests_outside_the_allowed_prefixes_are_refused(server, bucket):
    before = keys_under(bucket, "uploads/")
    cases = [
        ("source", {"source": f"s3://{bucket}/private/a.jpg", "dest": f"s3://{bucket}/out/"}),
        ("source", {"source": f"s3://{bucket}-in/in/a.jpg", "dest": f"s3://{bucket}/out/"}),
        ("source", {"source": "/etc/passwd", "dest": f"s3://{bucket}/out/"}),
        ("source", {"source": "file:///etc/hostname", "dest": f"s3://{bucket}/out/"}),
        ("dest", {"source": f"s3://{bucket}/in/photos/cat.jpg", "dest": f"s3://{bucket}/in-other/"}),
        ("dest", {"source": f"s3://{bucket}/in/photos/cat.jpg", "dest": "/tmp/masks/"}),
    ]
    for field, body in cases:
        refused = problem(server.post("/v1/masks", json={**body, "prompt": "cat"}), 403)
        assert refused["field"] == field and f"s3://{bucket}/in/" in refused["allowed"], refused
        assert body[field] in refused["detail"] and "CLIPMASK_API_ALLOWED" in refused["detail"]
    assert "local path" in problem(server.post("/v1/masks", json={**cases[2][1], "prompt": "cat"}), 403)["detail"]
    # ...for jobs and uploads alike
    job = {"source": "/", "dest": f"s3://{bucket}/out/", "prompt": "cat"}
    assert problem(server.post("/v1/jobs", json=job), 403)["field"] == "source"
    assert problem(upload(server, CAT, dest="s3://elsewhere/", prompt="cat"), 403)["field"] == "dest"
    assert keys_under(bucket, "uploads/") == before


def test_bodies_over_the_limit_are_413(server, bucket):
    big = b"\xff\xd8" + os.urandom(MAX_BYTES)
    # Declared too large (Content-Length)
    refused = problem(upload(server, big, dest=f"s3://{bucket}/out/", prompt="cat"), 413)
    assert "CLIPMASK_API_MAX_BYTES" in refused["detail"]

    # Sent without a length (chunked): cut off once past the limit
    def chunks():
        for _ in range(MAX_BYTES // 10_000 + 5):
            yield b"x" * 10_000

    chunked = server.post("/v1/masks", data=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    problem(chunked, 413)


def test_an_rle_only_request_answers_the_mask_in_its_record_and_writes_no_png(server, worker, bucket):
    from pycocotools import mask as coco_mask

    # When an image is masked with outputs "rle" alone
    asked = server.post("/v1/masks?wait=60", json={"source": f"s3://{bucket}/in/photos/cat.jpg",
                                                   "dest": f"s3://{bucket}/out/rle/", "prompt": "a cat",
                                                   "outputs": ["rle"]})
    assert asked.status_code == 200, asked.text
    result = asked.json()
    # Then the result's record holds the mask as COCO RLE, at the image's size, and lists no PNG
    assert result["status"] == "succeeded" and set(result["outputs"]) == {"metadata"} and result["files"] == {}
    meta = result["metadata"]
    assert coco_mask.decode(meta["rle"]).shape == (meta["height"], meta["width"]) == (64, 96)
    assert keys_under(bucket, "out/rle/") == ["out/rle/cat.jpg.json"]
    assert "not asked for" in problem(server.get(f"/v1/masks/{result['id']}/mask.png"), 404)["detail"]


def test_outputs_other_than_mask_raw_and_rle_are_422_naming_the_item(server, bucket):
    dest = f"s3://{bucket}/out/"
    for path, source, outputs in (("/v1/masks", "in/photos/cat.jpg", ["rle", "foo"]), ("/v1/jobs", "in/", "rle,foo")):
        body = {"source": f"s3://{bucket}/{source}", "dest": dest, "prompt": "cat", "outputs": outputs}
        bad = problem(server.post(path, json=body), 422)
        assert [error["field"] for error in bad["errors"]] == ["outputs.1"], bad  # the field, and which item
        assert "'mask', 'raw' or 'rle'" in bad["errors"][0]["message"], bad
    form = problem(upload(server, CAT, dest=dest, prompt="cat", outputs="mask,foo"), 422)
    assert [error["field"] for error in form["errors"]] == ["outputs.1"], form


def test_what_is_not_an_image_or_too_large_or_badly_asked_is_422_before_anything_is_queued(server, bucket):
    before = keys_under(bucket, "uploads/")
    dest = f"s3://{bucket}/out/"
    text = problem(upload(server, b"just some notes", name="notes.jpg", dest=dest, prompt="cat"), 422)
    assert "not an image" in text["detail"] and text["errors"][0]["field"] == "file"
    bomb = problem(upload(server, bomb_png(), name="bomb.png", dest=dest, prompt="cat"), 422)
    assert "50000x50000" in bomb["detail"] and "CLIPMASK_MAX_PIXELS" in bomb["detail"]
    threshold = problem(upload(server, CAT, dest=dest, prompt="cat", threshold="1.5"), 422)
    assert [error["field"] for error in threshold["errors"]] == ["threshold"]
    no_prompt = problem(server.post("/v1/masks", json={"source": f"s3://{bucket}/in/photos/cat.jpg", "dest": dest,
                                                       "prompt": " | "}), 422)
    assert no_prompt["errors"][0]["field"] == "prompt"
    unknown = problem(server.post("/v1/masks", json={"source": f"s3://{bucket}/in/photos/cat.jpg", "dest": dest,
                                                     "prompt": "cat", "blur": 2}), 422)
    assert unknown["errors"][0]["field"] == "blur"
    assert problem(server.post("/v1/masks?wait=61", json={}), 422)["errors"][0]["field"] == "wait"
    assert problem(server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/", "dest": dest, "prompt": "cat",
                                                 "chunk_size": 0}), 422)["errors"][0]["field"] == "chunk_size"
    assert keys_under(bucket, "uploads/") == before


# --- jobs ----------------------------------------------------------------------


def test_a_job_is_submitted_followed_and_its_manifest_streamed(server, worker, bucket, env):
    # When a job is submitted over HTTP
    submitted = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/", "dest": f"s3://{bucket}/out/job/",
                                              "prompt": "a cat", "negative": "tree", "chunk_size": 2})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["state"] == "planning"
    job_id = submitted.json()["id"]
    # Then it runs to the end: every image has an outcome, the corrupt one failed
    status = wait_for_job(server, job_id)
    assert (status["state"], status["total"], status["succeeded"], status["failed"]) == ("finished", 5, 4, 1)
    # And its status is what clipmask status --json prints
    printed = json.loads(clipmask("status", job_id, "--json", env=env).stdout)
    assert {k: v for k, v in status.items() if k != "quiet_s"} == {k: v for k, v in printed.items() if k != "quiet_s"}
    # And its manifest streams as JSON lines, the rows of the manifest in storage
    streamed = server.get(f"/v1/jobs/{job_id}/manifest")
    assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/x-ndjson"
    assert streamed.content == read_object(bucket, f"out/job/_jobs/{job_id}/manifest.jsonl")
    assert len(streamed.text.splitlines()) == 5
    # And resuming a finished job does nothing
    resumed = server.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json() == {"job_id": job_id, "planned": 0, "requeued": 0}
    # And a job that is not there is a 404, a source without images a 422
    problem(server.get("/v1/jobs/nosuchjob"), 404)
    problem(server.post("/v1/jobs/nosuchjob/cancel"), 404)
    empty = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/nothing/", "dest": f"s3://{bucket}/out/",
                                          "prompt": "cat"})
    assert empty.status_code == 202  # named before listing: the listing finds nothing
    deadline = time.monotonic() + 30
    while (note := server.get(empty.headers["location"]).json())["state"] == "planning":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert note["state"] == "failed" and "no images under" in note["error"]


def test_a_job_over_a_brace_pattern_of_shards_masks_every_sample(server, worker, bucket):
    # Given two WebDataset shards under an allowed prefix
    s3 = boto3.client("s3")
    for shard in (0, 1):
        s3.put_object(Bucket=bucket, Key=f"in/shards/{shard:05d}.tar", Body=tar_bytes(samples(shard, 2)))
    # When a job names them by a brace pattern, as webdataset writes it
    submitted = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/shards/{{00000..00001}}.tar",
                                              "dest": f"s3://{bucket}/out/shards/", "prompt": "a cat"})
    assert submitted.status_code == 202, submitted.text
    # Then every sample of both shards is masked into an output shard of the same name
    status = wait_for_job(server, submitted.json()["id"])
    assert (status["state"], status["succeeded"], status["failed"]) == ("finished", 4, 0)
    assert keys_under(bucket, "out/shards/0") == ["out/shards/00000.tar", "out/shards/00001.tar"]
    # And a pattern outside the allowed prefixes, or one that names a parent folder, is refused
    outside = server.post("/v1/jobs", json={"source": f"s3://{bucket}/elsewhere/{{0..1}}.tar",
                                            "dest": f"s3://{bucket}/out/", "prompt": "cat"})
    assert "CLIPMASK_API_ALLOWED" in problem(outside, 403)["detail"]
    parent = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/{{..,x}}/a.tar",
                                           "dest": f"s3://{bucket}/out/", "prompt": "cat"})
    assert "'..'" in problem(parent, 422)["detail"]


# --- clients outside Python ----------------------------------------------------


def run_client(client: str, server: Server, token: str, *args: str) -> subprocess.CompletedProcess:
    """``clients/mask.sh`` (curl) or ``clients/mask.mjs`` (Node) with ``args``, as a user runs it."""
    command = ["bash", "clients/mask.sh"] if client == "curl" else ["node", "clients/mask.mjs"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": os.environ["PATH"], "CLIPMASK_URL": server.url, "CLIPMASK_TOKEN": token})


@pytest.mark.parametrize("client", ["curl", "node"])
def test_the_client_examples_upload_wait_and_download(server, worker, bucket, tmp_path, client):
    image = tmp_path / "cat.jpg"
    image.write_bytes(CAT)
    out = tmp_path / "mask.png"
    run = run_client(client, server, TOKEN, str(image), f"s3://{bucket}/out/{client}/", "a cat", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    mask_id, saved = run.stdout.split()
    assert saved == str(out)
    assert out.read_bytes() == read_object(bucket, f"out/{client}/{mask_id}/cat.jpg.mask.png")
    # A wrong token is said in the problem's words
    refused = run_client(client, server, "wrong", str(image), f"s3://{bucket}/out/", "cat")
    assert refused.returncode == 1 and "401" in refused.stderr and "CLIPMASK_API_TOKENS" in refused.stderr


# --- callbacks -----------------------------------------------------------------


def test_callbacks_are_signed_and_delivered_when_a_mask_or_a_job_ends(server, worker, bucket, receiver):
    from standardwebhooks import Webhook

    verify = Webhook(SECRET).verify
    # When an upload asks for a callback
    asked = upload(server, CAT, dest=f"s3://{bucket}/out/hooked/", prompt="a cat",
                   callback_url=receiver.url + "mask")
    assert asked.status_code == 202, asked.text
    mask_id = asked.json()["id"]
    # Then the result is POSTed there, signed as Standard Webhooks specifies: what GET answers
    (headers, body), = receiver.wait(f"mask_{mask_id}")
    message = verify(body, headers)
    assert message["type"] == "mask.finished"
    assert message["data"] == server.get(f"/v1/masks/{mask_id}").json()
    assert message["data"]["status"] == "succeeded"
    # And a tampered body does not verify
    with pytest.raises(Exception, match="signature"):
        verify(body.replace(b"succeeded", b"failed"), headers)

    # When a job asks for one, its summary is POSTed once it has finished
    job = server.post("/v1/jobs", json={"source": f"s3://{bucket}/in/photos/deep/", "dest": f"s3://{bucket}/out/hj/",
                                        "prompt": "a cat", "callback_url": receiver.url + "job"})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    (headers, body), = receiver.wait(f"job_{job_id}")
    summary = verify(body, headers)["data"]
    assert (summary["job_id"], summary["succeeded"], summary["failed"]) == (job_id, 1, 0)
    assert summary["manifest"] == wait_for_job(server, job_id)["manifest"]

    # When the receiver fails the first attempt, the same message comes again, signed anew
    flaky = server.post("/v1/masks", json={"source": f"s3://{bucket}/in/alpha.png", "prompt": "a cat",
                                           "dest": f"s3://{bucket}/out/hooked/",
                                           "callback_url": receiver.url + "flaky"})
    first, second = receiver.wait(f"mask_{flaky.json()['id']}", attempts=2)
    assert verify(second[1], second[0])["data"]["status"] == "succeeded"
    assert verify(first[1], first[0])["data"]["id"] == flaky.json()["id"]


def test_callbacks_outside_the_allowed_prefixes_are_refused(server, bucket, receiver):
    body = {"source": f"s3://{bucket}/in/alpha.png", "dest": f"s3://{bucket}/out/", "prompt": "cat"}
    for url in ("http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:6379/",
                receiver.url.replace("/hooks/", "/"), receiver.url.replace("127.0.0.1", "127.0.0.1.example.com")):
        refused = problem(server.post("/v1/masks", json={**body, "callback_url": url}), 403)
        assert refused["field"] == "callback_url" and "CLIPMASK_API_CALLBACKS" in refused["detail"]
    with_user = receiver.url.replace("http://", "http://admin@")
    assert problem(server.post("/v1/masks", json={**body, "callback_url": with_user}), 422)["errors"][0]["field"] == (
        "callback_url")
    job = {"source": f"s3://{bucket}/in/", "dest": f"s3://{bucket}/out/", "prompt": "cat", "callback_url": "http://x/"}
    assert problem(server.post("/v1/jobs", json=job), 403)["field"] == "callback_url"


def test_the_node_receiver_verifies_a_callback(server, worker, bucket, node_port):
    receiving = subprocess.Popen(["node", "clients/webhook.mjs", str(node_port), "1"], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={"PATH": os.environ["PATH"], "CLIPMASK_WEBHOOK_SECRET": SECRET})
    try:
        assert receiving.stdout.readline().startswith("listening"), receiving.stderr.read()
        asked = upload(server, CAT, dest=f"s3://{bucket}/out/node-hook/", prompt="a cat",
                       callback_url=f"http://127.0.0.1:{node_port}/clipmask")
        out, err = receiving.communicate(timeout=90)
    finally:
        receiving.kill()
    assert receiving.returncode == 0, err
    verified, data = out.splitlines()
    assert verified == f"verified mask.finished mask_{asked.json()['id']}"
    assert json.loads(data)["status"] == "succeeded"


# --- the schema, metrics, readiness ----------------------------------------------


def test_openapi_describes_every_route_with_examples(server):
    schema = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert set(schema["paths"]) == {
        "/v1/masks", "/v1/masks/{mask_id}", "/v1/masks/{mask_id}/{role}.png", "/v1/jobs", "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/resume", "/v1/jobs/{job_id}/manifest", "/healthz",
        "/readyz", "/metrics"}
    post = schema["paths"]["/v1/masks"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert post["requestBody"]["content"]["application/json"]["example"]["prompt"]
    assert "file" in post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"200", "202", "401", "403", "413", "422"} <= set(post["responses"])
    assert "application/problem+json" in post["responses"]["403"]["content"]
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200


def test_metrics_count_requests_by_route_and_status(server):
    server.get(f"/v1/masks/{uuid.uuid4().hex}")
    text = requests.get(server.url + "/metrics", timeout=10).text
    assert 'clipmask_api_requests_total{method="GET",route="/v1/masks/{mask_id}",status="404"}' in text
    assert 'clipmask_api_requests_total{method="POST",route="/v1/masks",status="202"}' in text
    assert 'clipmask_api_request_seconds_bucket{le="0.1",method="GET",route="/v1/masks/{mask_id}"}' in text
    assert "clipmask_api_requests_in_flight 1.0" in text  # this request


def test_the_server_holds_no_subscription_to_results(server, redis_url):
    """It reads states when asked: it never subscribes to a task's result, whose messages it would
    otherwise hold unread, growing, for as long as it runs."""
    import redis

    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/1")
    assert client.pubsub_channels("celery-task-meta-*") == []


def test_serve_refuses_to_start_without_a_token(env):
    no_token = clipmask("serve", env={**env, "CLIPMASK_API_TOKENS": ""}, timeout=60)
    assert no_token.returncode == 2 and "CLIPMASK_API_TOKENS" in no_token.stderr
    open_wide = clipmask("serve", "--no-auth", "--host", "0.0.0.0", env=env, timeout=60)
    assert open_wide.returncode == 2 and "--no-auth binds 127.0.0.1 only" in open_wide.stderr
    unsigned = clipmask("serve", env={**env, "CLIPMASK_WEBHOOK_SECRET": ""}, timeout=60)
    assert unsigned.returncode == 2 and "CLIPMASK_WEBHOOK_SECRET is not set" in unsigned.stderr


def test_readyz_fails_while_redis_is_stopped_and_recovers(server, redis_server):
    ready = requests.get(server.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"] == {"broker": "ok", "redis": "ok", "storage": "ok"}
    redis_server.stop()
    try:
        down = requests.get(server.url + "/readyz", timeout=30)
        body = problem(down, 503)
        assert body["checks"]["redis"] != "ok" and body["checks"]["storage"] == "ok"
        assert "redis" in body["detail"]
    finally:
        redis_server.start()
    deadline = time.monotonic() + 60
    while requests.get(server.url + "/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
