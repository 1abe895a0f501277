"""One pass over a manifest for ``clipmask preview``: a uniform sample of succeeded rows, the
first failures and the counts, in memory that does not grow with the manifest."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Iterable

DEFAULT_LIMIT = 200


@dataclass
class ManifestSample:
    """What one pass over a manifest keeps: a sample of succeeded rows and the first failures."""

    succeeded: list[dict] = field(default_factory=list)  # in manifest order
    failed: list[dict] = field(default_factory=list)     # the first ``limit`` failures
    counts: dict[str, int] = field(default_factory=lambda: {"succeeded": 0, "failed": 0, "skipped": 0})
    bad_lines: int = 0  # lines that are not a JSON row with a known status


#: A row's status as json.dumps writes it (with or without a space). Inside a JSON string a
#: quote is escaped, so this can only match the row's own "status" member.
_STATUS = re.compile(rb'"status": ?"(succeeded|failed|skipped)"')


def _quick_status(line: bytes) -> str | None:
    """The row's status read without parsing it, or None when that is not certain."""
    found = _STATUS.findall(line)
    return found[0].decode() if len(found) == 1 else None


def sample_manifest(lines: Iterable[bytes], limit: int = DEFAULT_LIMIT, seed: int = 0) -> ManifestSample:
    """Stream manifest ``lines``: a uniform sample (reservoir, ``random.Random(seed)``) of at most
    ``limit`` succeeded rows, and the first ``limit`` failed rows. Memory is O(limit).

    Only the rows kept are parsed (about ``limit * ln(rows / limit)``), so a million-row manifest
    takes a second or two; a line whose status is not plain to see is parsed to find it.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rng = random.Random(seed)
    sample = ManifestSample()
    reservoir: list[tuple[int, dict]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        row = None
        status = _quick_status(line)
        if status is None:
            try:
                row = json.loads(line)
                status = row["status"]
                if status not in sample.counts:
                    raise ValueError(status)
            except (ValueError, TypeError, KeyError):
                sample.bad_lines += 1
                continue
        sample.counts[status] += 1
        if status == "failed" and len(sample.failed) < limit:
            sample.failed.append(row or json.loads(line))
        elif status == "succeeded":
            seen = sample.counts["succeeded"]  # this row included
            slot = len(reservoir) if len(reservoir) < limit else rng.randrange(seen)
            if slot < limit:
                if slot == len(reservoir):
                    reservoir.append((index, row or json.loads(line)))
                else:
                    reservoir[slot] = (index, row or json.loads(line))
    sample.succeeded = [row for _, row in sorted(reservoir, key=lambda item: item[0])]
    return sample
