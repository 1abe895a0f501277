"""Masking what is new or changed: the source's and the destination's listings walked together.

Folders on disk as the stores; what ``clipmask submit`` and ``run`` do with it is tested with
them (tests/test_jobs_e2e.py, tests/test_cli_run.py).
"""

from __future__ import annotations

import os
import time

from storage import open_store
from tasks.jobs.incremental import Scan, record_order
from tests.images import write_tree

#: Keys where a key's record sorts before the record of a key that the key itself sorts before.
TRICKY = ["a.jpg", "a.jpg-1.png", "a.jpg.png", "a.jpg0.png", "a.jpgx.png", "a.png", "a0.jpg", "b/c.jpg",
          "b/c.jpg!.jpg", "b/c.jpg.d/e.jpg", "b/c.jpgz.jpg", "b0.jpg"]


def test_keys_come_in_the_order_of_their_records():
    assert list(record_order(sorted(TRICKY))) == sorted(TRICKY, key=lambda key: key + ".json")


def test_a_scan_finds_new_and_changed_images_and_leaves_the_rest(tmp_path):
    # Given images, and records for some of them written after them
    src, out = tmp_path / "src", tmp_path / "out"
    write_tree(src, TRICKY)
    old = time.time() - 100
    for key in TRICKY:
        os.utime(src / key, (old, old))
    recorded = TRICKY[::2]
    write_tree(out, [key + ".json" for key in recorded] + [key + ".mask.png" for key in recorded] + ["zz.json"])
    # and one of them modified after its record
    os.utime(src / "a.jpg.png", (time.time() + 5, time.time() + 5))
    # When scanned
    scan = Scan(open_store(src), open_store(out))
    found = list(scan.keys())
    # Then new and changed images come, in record order, counted
    expected = sorted(set(TRICKY) - set(recorded) | {"a.jpg.png"}, key=lambda key: key + ".json")
    assert found == expected
    assert (scan.new, scan.changed, scan.up_to_date) == (len(TRICKY) - len(recorded), 1, len(recorded) - 1)


def test_a_scan_resumed_after_any_key_finds_exactly_the_rest(tmp_path):
    # Given images of which none has a record
    src, out = tmp_path / "src", tmp_path / "out"
    write_tree(src, TRICKY)
    out.mkdir()
    everything = list(Scan(open_store(src), open_store(out)).keys())
    # When a plan is interrupted after any key and resumed from it
    for cut in range(1, len(everything)):
        rest = list(Scan(open_store(src), open_store(out), after=everything[cut - 1]).keys())
        # Then the rest comes, each key once
        assert rest == everything[cut:], everything[cut - 1]
