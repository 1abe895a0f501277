"""Build a randomly initialised CLIPSeg model directory, offline.

Model weights cannot be downloaded on every machine (CI, air-gapped clusters), yet tests and
benchmarks need the real CLIPSeg code. This writes a directory that ``from_pretrained`` loads
exactly like ``CIDAS/clipseg-rd64-refined``: config, safetensors weights, a CLIP tokenizer with a
byte-level vocabulary and the CLIPSeg image processor (352x352, ImageNet mean/std).

Shapes:
- ``tiny``: a few thousand parameters, for tests (seconds on a laptop CPU).
- ``tiny32``: as small, with another layout (32-pixel patches, layers out of order), for tests.
- ``rd64``: the shapes of ``CIDAS/clipseg-rd64-refined`` (ViT-B/16, reduce_dim 64), for timing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessor,
)

from worker.model import RANDOM_MARK

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: The resolution CLIPSeg was trained at; the model's own processor resizes to it.
PROCESSOR_SIZE = 352
LOGIT_SCALE = 0.03
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

SHAPES = {
    "tiny": dict(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                           num_attention_heads=4, image_size=224, patch_size=16),
        projection_dim=16, reduce_dim=16, extract_layers=[1, 2, 3],
        decoder_num_attention_heads=2, decoder_intermediate_size=24,
        use_complex_transposed_convolution=True,
    ),
    # Another layout the engine must honour: 32-pixel patches, the plain transposed convolution,
    # extract_layers out of order and FiLM after the first decoder layer.
    "tiny32": dict(
        text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=24, intermediate_size=30, num_hidden_layers=4,
                           num_attention_heads=2, image_size=224, patch_size=32),
        projection_dim=12, reduce_dim=8, extract_layers=[2, 0], conditional_layer=1,
        decoder_num_attention_heads=1, decoder_intermediate_size=10,
        use_complex_transposed_convolution=False,
    ),
    # CLIPSegConfig's defaults are CLIP ViT-B with rd64, but with 32-pixel patches; the
    # checkpoint uses 16-pixel patches (ViT-B/16) and the complex transposed convolution.
    "rd64": dict(vision_config=dict(patch_size=16), use_complex_transposed_convolution=True),
}


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte, alone and word-final (no merges)."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_config(shape: str, tokenizer: CLIPTokenizer) -> CLIPSegConfig:
    """Raises KeyError naming the known shapes for an unknown ``shape``."""
    if shape not in SHAPES:
        raise KeyError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SHAPES[shape].items()}
    text = kwargs.setdefault("text_config", {})
    text.update(
        vocab_size=max(len(tokenizer), text.get("vocab_size", 0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPSegConfig(**kwargs)


def build_random_clipseg(path: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random CLIPSeg of ``shape`` with its processor to ``path``; returns the path."""
    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(build_config(shape, tokenizer)).eval()
    with torch.no_grad():
        # Random init gives logits in the tens, so every sigmoid saturates to 0 or 1; scaled
        # down, masks spread over [0, 1] and thresholds mean something in tests.
        last = model.decoder.transposed_convolution
        last = last[-1] if isinstance(last, torch.nn.Sequential) else last
        last.weight.mul_(LOGIT_SCALE)
    image_processor = ViTImageProcessor(
        size={"height": PROCESSOR_SIZE, "width": PROCESSOR_SIZE},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    setattr(model.config, RANDOM_MARK, True)  # said in logs, records and previews
    model.save_pretrained(path)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


if __name__ == "__main__":  # pragma: no cover - a convenience for people trying the CLI offline
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the model into")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_random_clipseg(args.path, args.shape, args.seed))
