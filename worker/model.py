"""Loading CLIPSeg from a Hugging Face model id or a local directory.

``CLIPMASK_MODEL`` (or ``--model``) names it; the default is the refined rd64 checkpoint. Hugging
Face's own variables (``HF_HOME``, ``HF_HUB_OFFLINE``) govern the cache and network access.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
from transformers import utils as hf_utils

from worker.devices import precision_name
from worker.errors import ModelUnavailableError
from worker.model_source import DEFAULT_MODEL, locate, model_reference  # noqa: F401 - model_reference re-exported

log = logging.getLogger(__name__)

HOW_TO_GET_WEIGHTS = (
    "To provide the weights: on a machine with internet access run "
    "`hf download {default}` (or load it once with transformers), then copy the Hugging Face "
    "cache here and set HF_HOME to it with HF_HUB_OFFLINE=1; or save the model with "
    "save_pretrained() into a directory and point CLIPMASK_MODEL (or --model) at that directory."
)
#: Set in the config of the random models ``worker.random_model`` writes.
RANDOM_MARK = "clipmask_random_demo"
#: transformers' QuickGELUActivation: x * sigmoid(1.702 x).
QUICK_GELU_SCALE = 1.702


@dataclass
class LoadedModel:
    """A CLIPSeg model in eval mode on its device, with its processor and provenance."""

    model: CLIPSegForImageSegmentation
    processor: CLIPSegProcessor
    model_id: str
    revision: str
    #: ``fp32``, ``fp16``, ``bf16`` or ``int8`` (fp32 with the vision encoder's Linear layers quantised).
    precision: str = "fp32"
    #: Random weights written by ``worker.random_model`` (tests, demos): its masks are meaningless.
    random: bool = False


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
    trips or retries when offline); one that is not is downloaded. ``dtype`` is the weights' dtype;
    ``torch.qint8`` (CPU only) loads fp32 weights and quantises the vision encoder (see
    ``quantize_vision_encoder``); text encoder and decoder stay fp32."""
    quantize = dtype == torch.qint8
    if quantize:
        dtype = torch.float32
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
    if quantize:
        quantize_vision_encoder(model)
    precision = "int8" if quantize else precision_name(dtype)
    log.info("loaded model %s on %s (%s)", ref, device, precision)
    return LoadedModel(model, processor, ref, _revision(model, local), precision,
                       random=bool(getattr(model.config, RANDOM_MARK, False)))


def quantize_vision_encoder(model: CLIPSegForImageSegmentation) -> None:
    """Dynamic int8 quantisation, in place, of every ``nn.Linear`` in the CLIP vision encoder
    (``model.clip.vision_model.encoder``: attention projections and MLPs, about 90% of the
    backbone's arithmetic). Weights become qint8 with one scale per output channel; activations
    are quantised on the fly (one scale per tensor per call); outputs stay fp32. CPU only.

    First each MLP's ``quick_gelu`` is rewritten exactly as an in-place SiLU (see
    ``_quick_gelu_as_silu``): once the matmuls are int8, its three fp32 passes over the widest
    activation cost about 15% of the whole forward (rd64, 2 CPU cores; bench/bench_precision.py).

    ``torch.ao.quantization`` is deprecated in favour of torchao; its warnings are silenced here
    so that they do not reach every worker log.
    """
    encoder = model.clip.vision_model.encoder
    for layer in encoder.layers:
        _quick_gelu_as_silu(layer.mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(
            encoder, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)


def _quick_gelu_as_silu(mlp: torch.nn.Module) -> None:
    """``fc2(quick_gelu(fc1(x)))`` as ``fc2'(silu(fc1'(x)))``, the same function: quick_gelu(h) is
    h * sigmoid(1.702 h) = silu(1.702 h) / 1.702, so fc1's weight and bias take the factor 1.702
    and fc2's weight its inverse. SiLU is one fused pass and runs in place on fc1's fresh output.
    The int8 scales (per channel for weights, per tensor for activations) absorb the constant
    factors, so quantisation error is essentially unchanged."""
    if type(mlp.activation_fn).__name__ != "QuickGELUActivation":
        return
    with torch.no_grad():
        mlp.fc1.weight.mul_(QUICK_GELU_SCALE)
        mlp.fc1.bias.mul_(QUICK_GELU_SCALE)
        mlp.fc2.weight.div_(QUICK_GELU_SCALE)
    mlp.activation_fn = torch.nn.SiLU(inplace=True)


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
