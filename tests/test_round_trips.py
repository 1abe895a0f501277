"""S3 is a network: a real round trip per request, and clipmask keeping many requests in flight.

A real ``clipmask run`` against moto's S3 server behind a proxy (``FaultyProxy``) that holds every
request a fifth of a second, as real S3 answers in tens to hundreds of milliseconds.
"""

from __future__ import annotations

import gc
import json
from collections import Counter

import boto3

from storage import open_store
from tasks.pipeline.stream import Pipeline
from tests.images import png
from tests.processes import clipmask
from tests.services import FaultyProxy
from worker.spec import MaskSpec


def test_run_keeps_many_requests_in_flight_and_writes_both_masks_at_once(s3_bucket, s3_env, moto_server,
                                                                          tiny_model):
    s3 = boto3.client("s3")
    keys = [f"in/set{i % 2}/img{i:02d}.png" for i in range(12)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=png(i))
    # Given S3 behind a proxy that holds every request 0.2 s
    with FaultyProxy(moto_server.endpoint, slowdown=0, drop=0, delay_s=0.2) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "CLIPMASK_MODEL": tiny_model, "HF_HUB_OFFLINE": "1"}
        # When a folder of images is masked there
        result = clipmask("run", f"s3://{s3_bucket}/in/", "--out", f"s3://{s3_bucket}/out/", "--prompt", "a cat",
                          "--device", "cpu", "--quiet", env=env)
    # Then every image is masked
    assert result.returncode == 0 and "12 succeeded, 0 failed" in result.stdout, result.stderr
    for key in keys:
        record = json.loads(s3.get_object(Bucket=s3_bucket, Key=key.replace("in/", "out/", 1) + ".json")["Body"].read())
        assert record["source"] == f"s3://{s3_bucket}/{key}"
    # And many requests waited on the network at once (the images read ahead, the masks written
    # behind), not one per core
    assert proxy.max_in_flight >= 8, proxy.max_in_flight
    # And an image's two masks were written at the same time, its record only after both
    assert proxy.overlaps(".mask.png", ".raw.png")
    assert not proxy.overlaps(".mask.png", ".json") and not proxy.overlaps(".raw.png", ".json")


def test_an_images_objects_are_freed_when_it_ends_not_left_to_the_garbage_collector(s3_bucket, engine):
    # Given images on S3, masked in this process with the garbage collector off (as a pipeline
    # process's rare collections leave it most of the time)
    s3 = boto3.client("s3")
    keys = [f"img{i:02d}.png" for i in range(8)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=png(i))
    pipeline = Pipeline(engine, open_store(f"s3://{s3_bucket}/in/"), open_store(f"s3://{s3_bucket}/out/"),
                        MaskSpec.from_text("a cat"))
    gc.collect()
    gc.disable()
    try:
        outcomes = [outcome.status for outcome in pipeline.run(keys)]
        # When what is no longer reachable is collected
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = Counter(type(thing).__name__ for thing in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # Then no image's data or futures were in a reference cycle: each was freed as soon as its
    # outcome came, not held (pixels included) until a full collection, memory growing meanwhile
    assert outcomes == ["succeeded"] * len(keys)
    held = {name: left[name] for name in ("Future", "_Loaded", "Prepared", "MaskResult", "Encoded", "Outcome")}
    assert not any(held.values()), held
