"""Where the CLIPSeg weights would come from, decided in a second without loading anything.

Used before the model is loaded (``model.py``), and by ``scripts/run-local.sh`` to say at once,
on one line, when it falls back to a random demo model. Imports huggingface_hub only (no torch,
no transformers).

Usage: ``python -m worker.model_source [MODEL]``: prints where the model is, or why it cannot be
had, and exits 0 or 1.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from worker import settings

DEFAULT_MODEL = settings.MODEL.default
#: Seconds to wait for the Hugging Face Hub before saying it is out of reach.
HUB_TIMEOUT_S = 3.0


def model_reference(explicit: str | None = None) -> str:
    """``--model`` if given, else ``$CLIPMASK_MODEL``, else the default checkpoint."""
    return explicit or settings.MODEL.get()


def describe_model(info: dict) -> str:
    """A model record (``MaskEngine.model_info``, a metadata record's ``model``) in one line for
    logs and pages: id, revision, precision, and a warning for random weights."""
    warning = " - RANDOM demo weights: masks are meaningless" if info.get("random") else ""
    return f"{info.get('id', '?')} (revision {info.get('revision', '?')}, {info.get('precision', '?')}){warning}"


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1


def locate(ref: str) -> tuple[str, bool]:
    """``(where, local)`` for a model that can be had: a local directory or a cached hub model
    (``local`` True: load it with ``local_files_only``), or a hub id the Hub answers for (False).

    Raises ``LookupError`` saying why it cannot be had: no such directory, or not cached while
    offline (``HF_HUB_OFFLINE``) or with the Hub out of reach."""
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise LookupError(f"model directory {ref!r} has no config.json (save_pretrained() writes one)")
        return str(local), True
    if looks_like_path(ref):
        raise LookupError(f"model directory {ref!r} does not exist")
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return ref, True
    if constants.HF_HUB_OFFLINE:
        raise LookupError(f"{ref!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          "HF_HUB_OFFLINE is set")
    if not _reachable(constants.ENDPOINT):  # huggingface_hub itself retries for ~20 s
        raise LookupError(f"{ref!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          f"{constants.ENDPOINT} cannot be reached")
    try:
        hf_hub_download(ref, "config.json", etag_timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - any failure means: not to be had from here
        raise LookupError(f"{ref!r} is not in the Hugging Face cache and the Hub did not give it "
                          f"({type(err).__name__})") from None
    return ref, False


def _reachable(url: str) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``HUB_TIMEOUT_S``."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                      timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    ref = model_reference(argv[0] if argv else None)
    try:
        where, _ = locate(ref)
    except LookupError as err:
        print(f"no CLIPSeg model: {err}", file=sys.stderr)
        return 1
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
