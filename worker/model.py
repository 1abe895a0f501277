"""Loading CLIPSeg from a Hugging Face model id or a local directory.

``CLIPMASK_MODEL`` (or ``--model``) names it; the default is the refined rd64 checkpoint. Hugging
Face's own variables (``HF_HOME``, ``HF_HUB_OFFLINE``) govern the cache and network access.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import utils as hf_utils
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor

from .errors import ModelUnavailableError
from .model_source import DEFAULT_MODEL, locate, model_reference  # noqa: F401 - model_reference re-exported

log = logging.getLogger(__name__)

HOW_TO_GET_WEIGHTS = (
    "To provide the weights: on a machine with internet access run "
    "`hf download {default}` (or load it once with transformers), then copy the Hugging Face "
    "cache here and set HF_HOME to it with HF_HUB_OFFLINE=1; or save the model with "
    "save_pretrained() into a directory and point CLIPMASK_MODEL (or --model) at that directory."
)


@dataclass
class LoadedModel:
    """A CLIPSeg model in eval mode on its device, with its processor and provenance."""

    model: CLIPSegForImageSegmentation
    processor: CLIPSegProcessor
    model_id: str
    revision: str


def check_model_available(ref: str) -> tuple[str, bool]:
    """Cheaply check (one small file, no weights) that ``ref`` can be had; returns where to load
    it from and whether it is all local. Raises ``ModelUnavailableError`` saying how to provide it."""
    try:
        source, local = locate(ref)
        CLIPSegConfig.from_pretrained(source, local_files_only=local)
    except (LookupError, OSError, ValueError) as err:
        raise _unavailable("find", ref, err) from err
    return source, local


def load_model(ref: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load model and processor; raises ``ModelUnavailableError`` saying how to get the weights.

    A model already in the Hugging Face cache loads without asking the Hub (no network round
    trips or retries when offline); one that is not is downloaded."""
    local = Path(ref).expanduser()
    source, offline = check_model_available(ref)  # one small file first: fail in seconds, not after retries
    hf_utils.logging.disable_progress_bar()  # one line per weight file is noise in worker logs
    try:
        processor = CLIPSegProcessor.from_pretrained(source, local_files_only=offline)
        model = CLIPSegForImageSegmentation.from_pretrained(source, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise _unavailable("load", ref, err) from err
    model = model.to(device).eval()
    model.requires_grad_(False)
    log.info("loaded model %s on %s (%s)", ref, device, dtype)
    return LoadedModel(model, processor, ref, _revision(model, local))


def _unavailable(verb: str, ref: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(f"cannot {verb} CLIPSeg model {ref!r}: {str(err).rstrip('.')}. " + _how_to())


def _how_to() -> str:
    return HOW_TO_GET_WEIGHTS.format(default=DEFAULT_MODEL)


def _revision(model: CLIPSegForImageSegmentation, local: Path) -> str:
    """The hub commit hash, or for a local directory a sha256 of its weight files."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    if not local.is_dir():
        return "unknown"
    digest = hashlib.sha256()
    for weights in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
        with open(weights, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]
