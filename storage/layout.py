"""Where clipmask's outputs live, relative to the output root (DESIGN.md, "Outputs").

For an input at relative path ``R`` (original name kept): ``R.mask.png``, ``R.raw.png`` and
``R.json``; job records under ``_jobs/<job_id>/``. Pure string functions: deterministic keys are
what make a redelivered task overwrite its own outputs instead of adding new ones.
"""

from __future__ import annotations

MASK_SUFFIX = ".mask.png"
RAW_SUFFIX = ".raw.png"
METADATA_SUFFIX = ".json"
JOBS_PREFIX = "_jobs/"


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
    """Keys of a job's records: ``manifest`` (JSON lines) and ``summary`` (JSON)."""
    return {
        "manifest": f"{JOBS_PREFIX}{job_id}/manifest.jsonl",
        "summary": f"{JOBS_PREFIX}{job_id}/summary.json",
    }
