"""``clipmask run``: the whole job in this process, no broker, same outputs as a Celery job."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from tqdm import tqdm

from storage import open_store
from worker.engine import MaskEngine
from worker.spec import MaskSpec

from .jobs import STATUSES, new_job_id, now_iso
from .manifest import write_records
from .pipeline import Pipeline
from .planning import NoImagesError, image_keys


def run_local(source_url: str, dest_url: str, spec: MaskSpec, load_engine: Callable[[], MaskEngine], *,
              skip_existing: bool = False, progress: bool = True) -> dict:
    """Mask every image under ``source_url``; returns the summary also written to storage.

    ``load_engine`` is called once the source is known to hold images. Raises ``NoImagesError``
    when it holds none.
    """
    source, dest = open_store(source_url), open_store(dest_url)
    keys = list(image_keys(source))  # listed up front so that the progress bar has a total
    if not keys:
        raise NoImagesError(source)
    engine = load_engine()
    run_id, created_at = new_job_id(), now_iso()
    counts: Counter = Counter()
    rows = []
    bar = tqdm(total=len(keys), unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        for outcome in Pipeline(engine, source, dest, spec, skip_existing, f"run {run_id}").run(keys):
            rows.append(outcome.row())
            counts[outcome.status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update()
    status = {
        "job_id": run_id, "state": "finished", "total": len(keys),
        **{name: counts[name] for name in STATUSES},
        "source": source.url, "dest": dest.url, "spec": spec.to_dict(), "created_at": created_at,
        "finished_at": now_iso(),
    }
    return write_records(dest, run_id, rows, status)
