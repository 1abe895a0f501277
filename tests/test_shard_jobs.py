"""Jobs over WebDataset shards: a shard is a chunk, masked by a real ``clipmask worker`` from moto
S3 into an output shard; the manifest has a row per sample.

Real parts only: the redis-server and the moto S3 server started by conftest, ``clipmask worker``
and ``clipmask submit`` / ``status`` as subprocesses, the tiny random CLIPSeg.
"""

from __future__ import annotations

import io
import json
import tarfile
import time

import boto3
import redis

from tests.processes import FAST_REDELIVERY, clipmask, job_status, kill_mid_task, wait_for
from tests.services import FaultyProxy
from tests.test_shards import OPTIONS, member_offset, read_shard, run_env, samples, tar_bytes  # noqa: F401


def put_shards(bucket: str, content: dict[int, dict], cut: dict[int, int] | None = None) -> None:
    s3 = boto3.client("s3")
    for shard, shard_samples in content.items():
        data = tar_bytes(shard_samples)
        s3.put_object(Bucket=bucket, Key=f"cc/{shard:05d}.tar", Body=data[:(cut or {}).get(shard, len(data))])


def submit(bucket: str, env: dict, *extra: str, shards: int = 3):
    return clipmask("submit", f"s3://{bucket}/cc/{{00000..{shards - 1:05d}}}.tar", "--out", f"s3://{bucket}/masks/",
                    "--prompt", "dog", *extra, env=env)


def job_of(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def output_shards(bucket: str, tmp_path) -> dict[str, dict]:
    """Every output shard visible under ``masks/``, read back with webdataset."""
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="masks/").get("Contents", [])
    shards = {}
    for key in (o["Key"] for o in listed if o["Key"].endswith(".tar")):
        local = tmp_path / key.replace("/", "_")
        local.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        shards[key] = read_shard(local)
    return shards


def manifest_rows(bucket: str, job_id: str) -> list[dict]:
    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"masks/_jobs/{job_id}/manifest.jsonl")["Body"]
    return [json.loads(line) for line in body.iter_lines()]


def output_members(bucket: str) -> dict[str, list[str]]:
    """The member names of every output shard under ``masks/``, read whole with tarfile (a shard
    cut short raises)."""
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="masks/").get("Contents", [])
    members = {}
    for key in (o["Key"] for o in listed if o["Key"].endswith(".tar")):
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members[key] = [member.name for member in tar if len(tar.extractfile(member).read()) == member.size]
    return members


def members_of(content: dict[str, dict]) -> list[str]:
    """The members an output shard of these samples has, all of them masked: mask, raw, record."""
    return [f"{key}.{suffix}" for key in content for suffix in ("mask.png", "raw.png", "json")]


def until(condition, what: str, timeout: float = 120) -> None:
    """Wait (polling) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


def test_a_shard_job_survives_a_killed_worker_and_masks_only_what_is_new(
        s3_bucket, job_env, start_worker, tmp_path):
    bucket, env = s3_bucket, {**job_env, **FAST_REDELIVERY}
    # Given three shards on S3: the second with a corrupt image, the third cut off in its second sample
    content = {shard: samples(shard, count=4) for shard in range(3)}
    content[1]["000010001"]["png"] = b"\x89PNG not really"
    cut_at = member_offset(tar_bytes(content[2]), "000020001.png")
    put_shards(bucket, content, cut={2: cut_at + 700})
    # When a job over them is submitted and its worker is killed in the middle of a shard
    doomed = start_worker("doomed", **FAST_REDELIVERY)
    job_id = job_of(submit(bucket, env))
    lost = kill_mid_task(doomed)
    assert job_status(job_id, env)["state"] != "finished", doomed.log()
    # Then no output shard is visible half-written: each one there reads whole
    for key, written in output_shards(bucket, tmp_path).items():
        shard = int(key.removeprefix("masks/").removesuffix(".tar"))
        assert list(written) == [k for k in content[shard] if k != "000010001"], key
    # And another worker is handed the shard again and finishes the job
    rescuer = start_worker("rescuer", **FAST_REDELIVERY)
    status = wait_for(job_id, env, worker=rescuer)
    assert lost <= rescuer.tasks("received")
    assert status["state"] == "finished" and status["shards"] is True
    assert (status["chunks"], status["chunks_done"]) == (3, 3)
    assert (status["total"], status["succeeded"], status["failed"], status["skipped"]) == (9, 7, 2, 0)
    said = clipmask("status", job_id, env=env).stdout
    assert "3/3 shards done, 9 samples (7 succeeded, 2 failed, 0 skipped)" in said, said
    # And the whole shards have output shards keyed as their inputs, the corrupt image left out
    written = output_shards(bucket, tmp_path)
    assert set(written) == {"masks/00000.tar", "masks/00001.tar"}
    assert list(written["masks/00000.tar"]) == list(content[0])
    assert list(written["masks/00001.tar"]) == [k for k in content[1] if k != "000010001"]
    assert all({"mask.png", "raw.png", "json"} <= set(sample) for sample in written["masks/00000.tar"].values())
    # And the manifest has one row per sample read; the cut shard's says where it was cut
    rows = manifest_rows(bucket, job_id)
    by_sample = {(row["shard"], row["key"]): row for row in rows}
    assert len(by_sample) == len(rows) == 9
    shard_url = f"s3://{bucket}/cc/{{:05d}}.tar".format
    assert [key for shard, key in by_sample if shard == shard_url(2)] == ["000020000"]
    assert {key: row["status"] for (shard, key), row in by_sample.items() if shard != shard_url(2)} == {
        **{key: "succeeded" for key in content[0]}, **{key: "succeeded" for key in content[1]},
        "000010001": "failed"}
    assert "ImageDecodeError" in by_sample[(shard_url(1), "000010001")]["error"]
    truncated = by_sample[(shard_url(2), "000020000")]
    assert truncated["status"] == "failed" and truncated["error"].startswith("shard not written: ")
    assert f"member 000020001.png (header at byte {cut_at}," in truncated["error"], truncated["error"]
    summary = json.loads(boto3.client("s3").get_object(
        Bucket=bucket, Key=f"masks/_jobs/{job_id}/summary.json")["Body"].read())
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (9, 7, 2)

    # Given the cut shard replaced by a whole one, a second later (S3's time resolution)
    time.sleep(1.1)
    put_shards(bucket, {2: content[2]})
    # When submitted with --skip-existing, Then only that shard is planned and masked
    again = wait_for(job_of(submit(bucket, env, "--skip-existing")), env, worker=rescuer)
    assert (again["chunks"], again["up_to_date"], again["succeeded"], again["failed"]) == (1, 2, 4, 0)
    assert list(output_shards(bucket, tmp_path)["masks/00002.tar"]) == list(content[2])
    # And a third submit finds nothing new: no job, exit 0
    nothing = submit(bucket, env, "--skip-existing")
    assert nothing.returncode == 0 and "nothing new" in nothing.stderr and "3 shards" in nothing.stderr, \
        nothing.stderr
    assert rescuer.terminate() == 0, rescuer.log()


def test_run_skip_existing_masks_only_new_or_changed_shards(tmp_path, run_env):  # noqa: F811
    # Given a folder of two shards masked once
    src, out = tmp_path / "shards", tmp_path / "out"
    src.mkdir()
    content = {shard: samples(shard, count=2) for shard in range(2)}
    for shard, shard_samples in content.items():
        (src / f"{shard:05d}.tar").write_bytes(tar_bytes(shard_samples))
    assert clipmask("run", str(src), "--out", str(out), *OPTIONS, env=run_env).returncode == 0
    # When the second is replaced and both are masked again with --skip-existing
    time.sleep(0.05)
    (src / "00001.tar").write_bytes(tar_bytes(samples(1, count=3)))
    result = clipmask("run", str(src), "--out", str(out), *OPTIONS, "--skip-existing", env=run_env)
    # Then only the replaced one is masked, the other counted up to date
    assert result.returncode == 0, result.stderr
    assert "3 succeeded, 0 failed, 0 skipped, 1 up to date" in result.stdout, result.stdout
    assert list(read_shard(out / "00001.tar")) == list(samples(1, count=3))


def test_a_shard_that_storage_cut_off_runs_again_instead_of_failing(
        s3_bucket, moto_server, job_env, start_worker, tmp_path):
    # Given a shard on S3 and a worker that reaches S3 through a proxy that cuts every connection
    content = {0: samples(0, count=2)}
    put_shards(s3_bucket, content)
    out = tmp_path / "out"
    env = {**job_env, "CLIPMASK_RETRY_MAX_DELAY_S": "2"}
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        proxy.set_outage("cut")
        worker = start_worker(AWS_ENDPOINT_URL_S3=proxy.endpoint, CLIPMASK_RETRY_MAX_DELAY_S="2")
        # When a job over it is submitted and the shard's GET fails
        result = clipmask("submit", f"s3://{s3_bucket}/cc/{{00000..00000}}.tar", "--out", str(out),
                          "--prompt", "dog", env=env)
        job_id = job_of(result)
        deadline = time.monotonic() + 120
        while "chunk runs again in" not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        # and S3 answers again
        proxy.set_outage(None)
        status = wait_for(job_id, env, worker=worker)
    # Then the shard ran again, not recorded failed, and its output shard is whole
    log = worker.log()
    assert "chunk runs again in" in log and f"shard s3://{s3_bucket}/cc/00000.tar not done" in log, log
    assert (status["state"], status["succeeded"], status["failed"]) == ("finished", 2, 0), log
    assert list(read_shard(out / "00000.tar")) == list(content[0])


def test_a_job_over_parquet_shards_reads_the_image_column_it_was_given(s3_bucket, job_env, start_worker):
    import io

    import pyarrow.parquet as pq

    from tests.test_parquet import images, keyed_table, parquet_bytes

    # Given two Parquet shards on S3 whose images are in a column named "photo"
    s3, keys = boto3.client("s3"), {0: ["a0", "a1"], 1: ["b0", "b1", "b2"]}
    for shard, names in keys.items():
        table = keyed_table(images(len(names), seed=shard), names, column="photo")
        s3.put_object(Bucket=s3_bucket, Key=f"pq/{shard:05d}.parquet", Body=parquet_bytes(table))
    source = f"s3://{s3_bucket}/pq/{{00000..00001}}.parquet"
    # When a job names that column, a worker masks it
    worker = start_worker("parquet")
    submitted = clipmask("submit", source, "--out", f"s3://{s3_bucket}/pq-masks/", "--prompt", "dog",
                         "--image-column", "photo", env=job_env)
    status = wait_for(job_of(submitted), job_env, timeout=120, worker=worker)
    # Then every row is masked into an output Parquet of the same name, under the same keys
    assert (status["succeeded"], status["failed"]) == (5, 0), status
    for shard, names in keys.items():
        body = s3.get_object(Bucket=s3_bucket, Key=f"pq-masks/{shard:05d}.parquet")["Body"].read()
        assert pq.read_table(io.BytesIO(body)).column("key").to_pylist() == names
    # And a column named for shards that are not Parquet is refused before anything is queued
    s3.put_object(Bucket=s3_bucket, Key="tars/00000.tar", Body=tar_bytes(samples(0, count=1)))
    refused = clipmask("submit", f"s3://{s3_bucket}/tars/{{00000..00000}}.tar", "--out",
                       f"s3://{s3_bucket}/x/", "--prompt", "dog", "--image-column", "photo", env=job_env)
    assert refused.returncode == 2 and "--image-column is for Parquet shards" in refused.stderr, refused.stderr


def test_a_cancelled_shard_job_skips_each_unread_shard_with_one_row(
        s3_bucket, moto_server, job_env, start_worker):
    bucket, s3 = s3_bucket, boto3.client("s3")
    content = {shard: samples(shard, count=2) for shard in range(6)}
    put_shards(bucket, content)
    env = {**job_env, "CLIPMASK_JOB_WINDOW": "3"}
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        # Given a worker of one task slot whose storage holds every request for now
        proxy.set_outage("hang")
        worker = start_worker(AWS_ENDPOINT_URL_S3=proxy.endpoint, CLIPMASK_WORKER_TASKS="1")
        # and a job over six shards, three of them queued (the job's window)
        job_id = job_of(submit(bucket, env, shards=6))
        # When the user cancels the job while the worker is in the middle of the first shard
        until(lambda: proxy.held, "request from the worker")
        cancelled = clipmask("cancel", job_id, env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        proxy.set_outage(None)
        status = wait_for(job_id, env, worker=worker)
    # Then the shard it was masking is finished, and the job ends cancelled
    assert status["state"] == "cancelled", worker.log()
    assert (status["total"], status["succeeded"], status["failed"], status["skipped"]) == (7, 2, 0, 5)
    # And the manifest has that shard's samples, then one skipped row without a key per unread shard
    shard_url = f"s3://{bucket}/cc/{{:05d}}.tar".format
    rows = manifest_rows(bucket, job_id)
    assert [(row["shard"], row["key"], row["status"]) for row in rows[:2]] == [
        (shard_url(0), key, "succeeded") for key in content[0]]
    assert rows[2:] == [{"source": shard_url(shard), "status": "skipped", "error": "job cancelled",
                         "shard": shard_url(shard), "key": None} for shard in range(1, 6)]
    # And only that shard has an output shard, whole, with every sample's masks and record
    assert output_members(bucket) == {"masks/00000.tar": members_of(content[0])}
    # And status says what the manifest says, as does the summary
    said = clipmask("status", job_id, env=env).stdout
    assert f"job {job_id}: cancelled, 6/6 shards done, 7 samples (2 succeeded, 0 failed, 5 skipped)" in said, said
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"masks/_jobs/{job_id}/summary.json")["Body"].read())
    assert (summary["state"], summary["total"], summary["succeeded"], summary["skipped"]) == ("cancelled", 7, 2, 5)


def test_a_shard_job_whose_redis_was_lost_midway_finishes_after_resume(
        s3_bucket, moto_server, job_env, start_worker):
    bucket = s3_bucket
    content = {shard: samples(shard, count=2) for shard in range(6)}
    put_shards(bucket, content)
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0) as proxy:
        # Given a worker of one task slot that has masked two shards of a job over six
        worker = start_worker(AWS_ENDPOINT_URL_S3=proxy.endpoint, CLIPMASK_WORKER_TASKS="1")
        job_id = job_of(submit(bucket, job_env, shards=6))
        results = f"/{bucket}/masks/_jobs/{job_id}/results/"

        def results_written() -> int:
            return len({path.split("?")[0] for method, path in list(proxy.seen) if method == "PUT" and results in path})

        until(lambda: results_written() >= 2, "results of two shards")
        # and is held by its storage in the middle of the next
        proxy.set_outage("hang")
        until(lambda: proxy.held, "request from the worker")
        # When Redis loses everything (a restart without persistence): records, queue, counters
        for db in (0, 1):
            redis.Redis.from_url(job_env["CELERY_BROKER_URL"].rsplit("/", 1)[0] + f"/{db}").flushdb()
        assert clipmask("status", job_id, env=job_env).returncode == 1
        # and the worker finishes the shard it had, which its log says Redis does not know
        proxy.set_outage(None)
        until(lambda: f"clipmask resume {job_id} --out s3://{bucket}/masks/" in worker.log(), "hint to resume")
        # Then `clipmask resume JOB --out DST` rebuilds the job from its files, and it finishes
        resumed = clipmask("resume", job_id, "--out", f"s3://{bucket}/masks/", env=job_env)
        assert resumed.returncode == 0, resumed.stderr
        status = wait_for(job_id, job_env, worker=worker)
    assert status["state"] == "finished", worker.log()
    assert (status["chunks"], status["chunks_done"]) == (6, 6)
    assert (status["total"], status["succeeded"], status["failed"], status["skipped"]) == (12, 12, 0, 0)
    # And every sample has exactly one row
    rows = manifest_rows(bucket, job_id)
    shard_url = f"s3://{bucket}/cc/{{:05d}}.tar".format
    assert [(row["shard"], row["key"]) for row in rows] == [(shard_url(shard), key) for shard in content
                                                            for key in content[shard]]
    assert {row["status"] for row in rows} == {"succeeded"}
    # And every output shard is there and whole, with every sample's masks and record
    assert output_members(bucket) == {f"masks/{shard:05d}.tar": members_of(content[shard]) for shard in content}
    said = clipmask("status", job_id, env=job_env).stdout
    assert f"job {job_id}: finished, 6/6 shards done, 12 samples (12 succeeded, 0 failed, 0 skipped)" in said, said
