"""The device loop (worker/batcher.py): images of concurrent callers share batches, and each
result goes back to its own caller; a batch that fails is split so a bad image fails alone.

The loop is generic over its batch function; these tests give it the real engine (tiny random
CLIPSeg) through ``Pipeline`` over local folders, and, for failure isolation, a batch function
that refuses one marked item.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from storage import open_store
from tasks.pipeline import Pipeline
from worker.batcher import DeviceLoop, device_loop
from worker.engine import MaskEngine
from worker.spec import MaskSpec


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def photos(tmp_path):
    """24 JPEGs of distinct sizes, so that a mask handed to the wrong caller would show."""
    source = tmp_path / "in"
    source.mkdir()
    for i in range(24):
        (source / f"p{i:02d}.jpg").write_bytes(_jpeg(40 + 3 * i, 30 + 2 * i, i))
    return source


def test_concurrent_one_image_requests_share_batches_and_get_their_own_masks(tiny_model, photos, tmp_path):
    engine = MaskEngine.load(tiny_model, device="cpu", batch_size=8)
    spec = MaskSpec.from_text("a cat|dog", "tree")
    source, dest = open_store(str(photos)), open_store(str(tmp_path / "out"))
    keys = sorted(p.name for p in photos.iterdir())
    start = threading.Barrier(len(keys))

    def offload(key: str):
        start.wait()  # as 24 web requests arriving together
        return next(iter(Pipeline(engine, source, dest, spec).run([key])))

    with ThreadPoolExecutor(len(keys)) as pool:
        outcomes = list(pool.map(offload, keys))
    records = [json.loads((tmp_path / "out" / f"{key}.json").read_text()) for key in keys]
    # Every request succeeded with the masks of its own image...
    assert [o.status for o in outcomes] == ["succeeded"] * len(keys)
    for key, record in zip(keys, records):
        width, height = Image.open(photos / key).size
        assert (record["width"], record["height"]) == (width, height)
        assert Image.open(tmp_path / "out" / f"{key}.mask.png").size == (width, height)
    # ...and the device ran them in shared batches, as their records say.
    batches = [record["worker"]["batch_images"] for record in records]
    assert max(batches) > 1 and len(device_loop(engine).batch_sizes) < len(keys), batches
    # The masks equal those of each image masked alone (batching changes no pixel's side).
    alone = MaskEngine.load(tiny_model, device="cpu", batch_size=1)
    for key in keys[:6]:
        decoded = alone.decode((photos / key).read_bytes(), spec)
        expected = alone.predict([decoded.image], spec, sizes=[decoded.size])[0]
        written = np.asarray(Image.open(tmp_path / "out" / f"{key}.raw.png"), dtype=np.int16)
        assert np.abs(written - expected.raw_pixels(8).astype(np.int16)).max() <= 1, key


def test_a_lone_request_runs_after_the_short_wait_without_company(tiny_model, photos, tmp_path):
    engine = MaskEngine.load(tiny_model, device="cpu", batch_size=8)
    spec = MaskSpec.from_text("a cat")
    outcome = next(iter(Pipeline(engine, open_store(str(photos)), open_store(str(tmp_path / "o")), spec).run(["p00.jpg"])))
    assert outcome.status == "succeeded" and outcome.metadata["worker"]["batch_images"] == 1


def test_specs_never_share_a_batch():
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def run_batch(key, items):
        gate.wait(5)
        seen.append((key, list(items)))
        return [f"{key}:{item}" for item in items]

    loop = DeviceLoop(run_batch, batch_size=8, max_wait_s=0.05)
    futures = loop.submit("a", [1, 2]) + loop.submit("b", [3]) + loop.submit("a", [4])
    gate.set()
    assert [f.result(5) for f in futures] == ["a:1", "a:2", "b:3", "a:4"]
    assert all(len({key}) == 1 for key, _ in seen) and sorted(k for k, _ in seen) == ["a", "b"]


def test_a_failing_batch_is_split_so_only_the_bad_item_fails():
    def run_batch(_key, items):
        if "bad" in items:
            raise ValueError("cannot mask 'bad'")
        return [item.upper() for item in items]

    loop = DeviceLoop(run_batch, batch_size=4, max_wait_s=0.05)
    futures = loop.submit("k", ["a", "bad", "c"])
    assert futures[0].result(5) == "A" and futures[2].result(5) == "C"
    with pytest.raises(ValueError, match="cannot mask 'bad'"):
        futures[1].result(5)
    # and the loop carries on serving
    assert loop.submit("k", ["d"])[0].result(5) == "D"


def test_two_streams_run_two_batches_at_once_and_each_item_gets_its_own_result():
    both_running = threading.Barrier(2, timeout=5)  # broken unless two batches run together

    def run_batch(_key, items):
        both_running.wait()
        return [item * 10 for item in items]

    loop = DeviceLoop(run_batch, batch_size=2, max_wait_s=0.01, streams=2)
    futures = loop.submit("k", [1, 2, 3, 4])
    assert [f.result(10) for f in futures] == [10, 20, 30, 40]
    assert sorted(loop.batch_sizes) == [2, 2]


def test_a_lone_image_waits_for_images_still_loading_and_no_longer():
    loop = DeviceLoop(lambda _key, items: items, batch_size=4, max_wait_s=0.001, loading_wait_s=30, streams=2)
    # Given an image submitted while another is still being loaded (its download ends 0.2 s later,
    # 200 times the usual wait for company)
    with loop.loading():
        first = loop.submit("k", ["a"])
        time.sleep(0.2)
        second = loop.submit("k", ["b"])
    # Then both run in one batch
    assert first[0].result(5) == "a" and second[0].result(5) == "b"
    assert list(loop.batch_sizes) == [2]
    # And with nothing loading, a lone image does not wait for the loading limit (30 s)
    assert loop.submit("k", ["c"])[0].result(5) == "c"
    assert list(loop.batch_sizes) == [2, 1]


def test_only_a_lone_partial_batch_is_told_it_runs_alone():
    told: list[tuple[int, bool]] = []
    loop = DeviceLoop(lambda _key, items: items, batch_size=4, max_wait_s=0.01, streams=2)
    loop.before_batch.append(lambda alone: told.append(alone))
    assert loop.submit("k", [1])[0].result(5) == 1  # a one-image request: all threads
    assert [f.result(5) for f in loop.submit("k", list(range(8)))] == list(range(8))  # full batches: shares
    assert told == [True, False, False]


def test_cpu_streams_setting_names_the_variable_when_wrong(tiny_model, monkeypatch):
    for value, message in (("0", "CLIPMASK_CPU_STREAMS must be at least 1"),
                           ("two", "CLIPMASK_CPU_STREAMS must be a whole number")):
        monkeypatch.setenv("CLIPMASK_CPU_STREAMS", value)
        with pytest.raises(ValueError, match=message):
            MaskEngine.load(tiny_model, device="cpu")


def test_a_pipeline_past_its_deadline_fails_what_the_device_did_not_mask_like_the_soft_time_limit(
        tiny_model, photos, tmp_path, caplog):
    from tasks.pipeline.stream import TIME_LIMIT_ERROR

    engine = MaskEngine.load(tiny_model, device="cpu", batch_size=2)
    keys = sorted(p.name for p in photos.iterdir())
    pipeline = Pipeline(engine, open_store(str(photos)), open_store(str(tmp_path / "o")), MaskSpec.from_text("a cat"),
                        context="job j chunk 0", deadline=time.monotonic() - 1)
    # When a pipeline runs past its deadline, with storage (a local folder) answering at once
    outcomes = list(pipeline.run(keys))
    # Then every image still has one outcome, in order, and those not masked by then failed for
    # good, naming the time limit: the device held them up, not storage
    assert [outcome.key for outcome in outcomes] == keys
    late = [outcome for outcome in outcomes if outcome.status != "succeeded"]
    assert late and all(outcome.error == TIME_LIMIT_ERROR and not outcome.transient for outcome in late)
    assert "[job j chunk 0] time limit reached with" in caplog.text and "waiting on the device" in caplog.text


def test_each_gpu_gets_a_worker_of_its_own_with_the_device_in_its_name():
    import argparse

    from worker.supervise import child_command

    args = argparse.Namespace(tasks=8, precision="auto", loglevel="INFO")
    line = child_command("cuda:1", args, ["-n", "w@box", "--without-gossip"])
    assert line[1:] == ["-m", "tasks.cli", "worker", "--device", "cuda:1", "--tasks", "8", "--precision", "auto",
                        "--loglevel", "INFO", "-n", "w-cuda1@box", "--without-gossip"]
    assert child_command("cuda:0", args, [])[-2:] == ["-n", "clipmask-cuda0@%h"]
    assert child_command("cpu", args, ["-n", "w@box"], tag=None)[-2:] == ["-n", "w@box"]  # one device


def test_processes_sharing_a_device_get_names_of_their_own_and_share_the_cores(monkeypatch):
    from worker.supervise import child_env, child_tags

    # Two processes per GPU on two GPUs: every node name differs (Celery merges equal names)
    assert child_tags(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]) == ["cuda0-0", "cuda0-1", "cuda1-0", "cuda1-1"]
    assert child_tags(["cuda:0", "cuda:1"]) == ["cuda0", "cuda1"]
    assert child_tags(["cpu"]) == [None]
    # Several processes each take their share of the machine's cores as torch threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert child_env(["cpu"] * 4) == {"OMP_NUM_THREADS": "2"}
    assert child_env(["cuda:0", "cuda:0", "cuda:1", "cuda:1"]) == {"OMP_NUM_THREADS": "2"}
    assert child_env(["cpu"]) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert child_env(["cpu"] * 4) == {}
