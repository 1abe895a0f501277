"""``clipmask run``: the whole job in this process, no broker, same outputs as a Celery job."""

from __future__ import annotations

from tqdm import tqdm

from storage import ObjectStore
from tasks.jobs.files import JobFiles
from tasks.jobs.incremental import Scan, ShardScan
from tasks.jobs.index import new_job_id, now_iso
from tasks.jobs.listing import image_keys
from tasks.jobs.manifest import CountingLines, write_summary
from tasks.jobs.preflight import ImageCount
from tasks.jobs.readahead import ordered_map
from tasks.pipeline.shards import ShardResult, mask_shard
from tasks.pipeline.stream import Pipeline
from tasks.shards.formats import output_key
from tasks.shards.names import ShardSet
from worker.engine import MaskEngine
from worker.spec import MaskSpec


def run_local(source: ObjectStore, dest: ObjectStore, spec: MaskSpec, engine: MaskEngine, *,
              total: ImageCount | int | None = None, skip_existing: bool = False, progress: bool = True) -> dict:
    """Mask every image under ``source`` into ``dest``; returns the summary also written there.

    Check both first, before loading the engine (``tasks.jobs.preflight.check_run``, which also
    starts counting the images: ``total``, the progress bar's, once known). The source is listed
    again to mask it, so that no list of keys or rows is held.
    """
    run_id = new_job_id()
    record = {"source": source.url, "dest": dest.url, "spec": spec.to_dict(), "created_at": now_iso()}
    files, counter = JobFiles(dest, run_id), CountingLines()
    scan = Scan(source, dest) if skip_existing else None  # what is new or changed, from the two listings
    pipeline = Pipeline(engine, source, dest, spec, False, f"run {run_id}")
    count = total if isinstance(total, ImageCount) else None
    with tqdm(total=None if count else total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        passed = 0  # images found up to date that the bar counted

        def count_up_to_date() -> None:
            nonlocal passed
            if scan and scan.up_to_date > passed:
                bar.update(scan.up_to_date - passed)
                passed = scan.up_to_date

        def rows():
            for outcome in pipeline.run(scan.keys() if scan else image_keys(source)):
                yield outcome.row()
                if count is not None and bar.total is None and count.value is not None:
                    bar.total = count.value
                bar.update()
                count_up_to_date()
                bar.set_postfix({**counter.counts, **({"up_to_date": passed} if scan else {})}, refresh=False)

        dest.write_stream(files.keys["manifest"], counter.rows(rows()), "application/x-ndjson")
        count_up_to_date()
    return write_summary(files, record, counter.counts, "finished", up_to_date=scan.up_to_date if scan else 0)


#: Shards ``clipmask run`` masks at once, their images batched together on the device: while one
#: waits on storage (its first bytes, its output's parts), the others keep the device busy. One
#: at a time kept 0.48 of its 0 ms rate at a 100 ms round trip (``bench/bench_shards.py``).
SHARDS_IN_FLIGHT = 4


def run_local_shards(shards: ShardSet, dest: ObjectStore, spec: MaskSpec, engine: MaskEngine, *,
                     skip_existing: bool = False, output_format: str | None = None,
                     image_column: str | None = None, progress: bool = True) -> dict:
    """Mask every shard ``shards`` names into an output shard of the same name under ``dest``
    (its extension ``output_format``'s: ``webdataset`` or ``parquet``; None keeps the input's),
    ``SHARDS_IN_FLIGHT`` at a time (``mask_shard``); returns the summary also written there. The
    manifest has a row per sample (``shard``, ``key``), shard after shard in the order SRC names
    them; a shard that fails does not stop the run. ``skip_existing``: only the shards without
    an output shard newer than them (the summary's ``up_to_date`` counts the others, shards)."""
    run_id = new_job_id()
    record = {"source": shards.store.url, "dest": dest.url, "spec": spec.to_dict(), "created_at": now_iso(),
              "shards": {"pattern": shards.pattern, "suffix": shards.suffix, "image_column": image_column}}
    files, counter = JobFiles(dest, run_id), CountingLines()
    scan = ShardScan(shards, dest, output_key=lambda key: output_key(key, output_format)) if skip_existing else None
    with tqdm(unit="img", disable=not progress, dynamic_ncols=True) as bar:
        def mask(key: str) -> ShardResult:
            result = mask_shard(engine, spec, shards.store, key, dest, output_key(key, output_format),
                                f"run {run_id} {key}", image_column=image_column)
            bar.update(len(result.outcomes))
            return result

        def rows():
            for result in ordered_map(mask, scan.keys() if scan else shards.keys(), SHARDS_IN_FLIGHT):
                yield from result.rows()
                bar.set_postfix(counter.counts, refresh=False)

        dest.write_stream(files.keys["manifest"], counter.rows(rows()), "application/x-ndjson")
    return write_summary(files, record, counter.counts, "finished", up_to_date=scan.up_to_date if scan else 0)
