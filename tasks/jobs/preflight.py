"""Checks before any image is computed: the source is there, the destination takes writes.

Each failure says what to fix, so that a wrong ``SRC`` or an unwritable ``--out`` is found in a
second, not after a whole job has been computed.
"""

from __future__ import annotations

import os
import uuid

from storage import LocalStore, ObjectStore
from storage.layout import JOBS_PREFIX


def check_source(source: ObjectStore) -> None:
    """A local SRC must be an existing folder (an S3 prefix is checked by listing it)."""
    if not isinstance(source, LocalStore):
        return
    if os.path.isfile(source.url):
        raise NotADirectoryError(f"SRC {source.url} is a file: pass the folder that holds the images")
    if not os.path.isdir(source.url):
        raise FileNotFoundError(f"SRC {source.url} does not exist: pass a folder of images or s3://bucket/prefix")


def check_writable(dest: ObjectStore) -> None:
    """Write and delete a probe under ``DST/_jobs/``; raises ``PermissionError`` saying what to fix."""
    probe = f"{JOBS_PREFIX}.probe-{uuid.uuid4().hex}"
    try:
        dest.write_bytes(probe, b"")
        dest.delete(probe)
    except (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        raise PermissionError(f"cannot write to --out {dest.url} ({err}): choose a writable folder or bucket, or "
                              "fix its permissions or credentials") from None
