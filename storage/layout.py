"""Where clipmask's outputs live, relative to the output root (docs/design.md, "Outputs").

For an input at relative path ``R`` (original name kept): ``R.mask.png``, ``R.raw.png`` and
``R.json``; job records under ``_jobs/<job_id>/``. Pure string functions: deterministic keys are
what make a redelivered task overwrite its own outputs instead of adding new ones.
"""

from __future__ import annotations

MASK_SUFFIX = ".mask.png"
RAW_SUFFIX = ".raw.png"
METADATA_SUFFIX = ".json"
JOBS_PREFIX = "_jobs/"
#: The file extensions clipmask reads as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: Digits of a chunk number in plan and result file names: sorted names are chunk order.
CHUNK_DIGITS = 9


def is_image_key(key: str) -> bool:
    """True for the file extensions clipmask reads (case-insensitive)."""
    return key.lower().endswith(IMAGE_EXTENSIONS)


def output_keys(relative_key: str) -> dict[str, str]:
    """The three output keys of one input, by role: ``mask``, ``raw``, ``metadata``."""
    return {
        "mask": relative_key + MASK_SUFFIX,
        "raw": relative_key + RAW_SUFFIX,
        "metadata": relative_key + METADATA_SUFFIX,
    }


def is_output_key(key: str) -> bool:
    """True for keys clipmask itself writes, so that a job never masks its own masks."""
    return key.startswith(JOBS_PREFIX) or key.endswith((MASK_SUFFIX, RAW_SUFFIX))


def job_keys(job_id: str) -> dict[str, str]:
    """Keys of a job's records under ``_jobs/<job_id>/``.

    ``job`` (what was asked: source, dest, spec), ``planned`` (written when planning is over:
    chunk and key counts), ``cancelled`` (present once cancelled), ``manifest`` (JSON lines) and
    ``summary`` (JSON); ``plan`` and ``results`` are the folders of the per-chunk files.
    """
    base = f"{JOBS_PREFIX}{job_id}/"
    return {
        "job": base + "job.json",
        "planned": base + "planned.json",
        "cancelled": base + "cancelled.json",
        "manifest": base + "manifest.jsonl",
        "summary": base + "summary.json",
        "plan": base + "plan/",
        "results": base + "results/",
    }


def plan_key(job_id: str, chunk: int) -> str:
    """The plan file of ``chunk``: the input keys it masks (JSON)."""
    return f"{job_keys(job_id)['plan']}{chunk:0{CHUNK_DIGITS}d}.json"


def results_key(job_id: str, chunk: int) -> str:
    """The result file of ``chunk``: its manifest rows (JSON lines), in plan order."""
    return f"{job_keys(job_id)['results']}{chunk:0{CHUNK_DIGITS}d}.jsonl"


def chunk_of(key: str) -> int:
    """The chunk number in a plan or result file name (inverse of ``plan_key``)."""
    return int(key.rsplit("/", 1)[-1].split(".", 1)[0])
