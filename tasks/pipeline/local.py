"""``clipmask run``: the whole job in this process, no broker, same outputs as a Celery job."""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from storage import open_store
from worker.engine import MaskEngine
from worker.spec import MaskSpec

from .jobfiles import JobFiles
from .jobs import new_job_id, now_iso
from .manifest import CountingLines, write_summary
from .pipeline import Pipeline
from .planning import NoImagesError, image_keys
from .preflight import check_source, check_writable


def run_local(source_url: str, dest_url: str, spec: MaskSpec, load_engine: Callable[[], MaskEngine], *,
              skip_existing: bool = False, progress: bool = True) -> dict:
    """Mask every image under ``source_url``; returns the summary also written to storage.

    The source is listed twice, once to count (for the progress bar) and once to mask, so that
    no list of keys or rows is held. ``load_engine`` is called once the source is known to hold
    images. Raises ``NoImagesError`` when it holds none.
    """
    source, dest = open_store(source_url), open_store(dest_url)
    check_source(source)
    total = sum(1 for _ in image_keys(source))
    if not total:
        raise NoImagesError(source)
    engine = load_engine()
    check_writable(dest)  # after the model, whose errors leave nothing behind; before any image
    run_id = new_job_id()
    record = {"source": source.url, "dest": dest.url, "spec": spec.to_dict(), "created_at": now_iso()}
    files, counter = JobFiles(dest, run_id), CountingLines()
    pipeline = Pipeline(engine, source, dest, spec, skip_existing, f"run {run_id}")
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        def rows():
            for outcome in pipeline.run(image_keys(source)):
                yield outcome.row()
                bar.update()
                bar.set_postfix(counter.counts, refresh=False)

        dest.write_stream(files.keys["manifest"], counter.rows(rows()), "application/x-ndjson")
    return write_summary(files, record, counter.counts, "finished")
