"""S3 is a network: a real round trip per request, and clipmask keeping many requests in flight.

A real ``clipmask run`` against moto's S3 server behind a proxy (``FaultyProxy``) that holds every
request a fifth of a second, as real S3 answers in tens to hundreds of milliseconds.
"""

from __future__ import annotations

import json

import boto3

from tests.images import png
from tests.processes import clipmask
from tests.services import FaultyProxy


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
