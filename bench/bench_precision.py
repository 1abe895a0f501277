"""Seconds per image on CPU for ``--precision fp32``, ``bf16`` and ``int8``, side by side, and how
far the masks of bf16 and int8 are from fp32's.

- The engine itself, in this process (``MaskEngine.load(..., device="cpu", precision=P)``), one
  engine per precision, all loaded before timing; ``predict`` on batches of ``--batch-size`` images
  (preprocess, backbone, decoder, postprocess: what ``clipmask run`` does per image, no I/O).
- One warm-up batch per precision, then ``--repeat`` rounds; a round runs every precision over the
  same ``--batches`` batches, precisions interleaved so that noise from other processes hits all of
  them alike; the fastest round of each precision counts (seconds per image = round / images).
- Accuracy, on the same images (default profile, threshold 0.5, no normalize): the fraction of
  thresholded pixels that differ from fp32's, over all pixels and over the pixels whose fp32 raw
  mask is farther than ``--margin`` (0.05) from the threshold; the largest and mean difference of
  the 8-bit raw mask in grey levels.
- A reference row ``fp32+silu`` (not a ``--precision``): fp32 with the exact quick_gelu -> in-place
  SiLU rewrite that int8 applies before quantizing, so that the table shows how much of int8's
  gain is quantization and how much that rewrite (``--no-silu-reference`` leaves it out).

Conditions as bench_engine.py: a random CLIPSeg with the shapes of CIDAS/clipseg-rd64-refined
(ViT-B/16, reduce_dim 64), cached in bench/.cache/rd64; 512x384 generated images; prompt
"a person|a dog|a car", negative "background". Random weights give noise-like masks whose flips
need not resemble a real checkpoint's, hence the flip rate over pixels far from the threshold as
well; ``--model CIDAS/clipseg-rd64-refined`` (or a local directory) measures a real checkpoint.

Usage: .venv/bin/python bench/bench_precision.py [--threads 2] [--batch-size 4] [--batches 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from bench_engine import NEGATIVE, PROMPT, ensure_model, make_image  # noqa: E402

from worker.engine import MaskEngine  # noqa: E402
from worker.model import _quick_gelu_as_silu  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: clipmask's target, informational: at least this speed-up with at most this flip fraction.
TARGET_SPEEDUP, TARGET_FLIPS = 1.8, 0.005


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per predict call (default 4)")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per round (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the fastest counts (default 3)")
    parser.add_argument("--margin", type=float, default=0.05, help="'far from the threshold' margin")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / ".cache" / "rd64",
                        help="where the random rd64 model is built once and reused")
    parser.add_argument("--model", help="a real checkpoint (HF id or directory) instead of the random rd64")
    parser.add_argument("--no-silu-reference", dest="silu_reference", action="store_false",
                        help="leave out the fp32+silu row (fp32 with int8's exact quick_gelu -> SiLU rewrite)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if min(args.batch_size, args.batches, args.repeat) < 1:
        parser.error("--batch-size, --batches and --repeat must be at least 1")
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")
    return args


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()) if "flags" in text else set()
    return {"cpu": f"{names[0]} x{len(names)}" if names else "unknown",
            "flags": {flag: flag in flags for flag in CPU_FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engine": torch.backends.quantized.engine}


def time_rounds(engines: dict, batches: list, spec: MaskSpec, repeat: int) -> dict:
    """Fastest round per precision, in seconds per image, plus its mean inference share."""
    images = sum(len(batch) for batch in batches)
    best = {name: float("inf") for name in engines}
    inference = {name: float("inf") for name in engines}
    for name, engine in engines.items():  # warm-up: one batch each
        engine.predict(batches[0], spec)
    for round_ in range(repeat):
        for name, engine in engines.items():
            started = time.perf_counter()
            results = [r for batch in batches for r in engine.predict(batch, spec)]
            seconds = (time.perf_counter() - started) / images
            print(f"  round {round_ + 1} {name}: {seconds:.3f} s/image", flush=True)
            if seconds < best[name]:
                best[name] = seconds
                inference[name] = float(np.mean([r.timings_ms["inference"] for r in results])) / 1000.0
    return {name: {"s_per_image": best[name], "inference_s_per_image": inference[name]} for name in engines}


def accuracy(reference: list, results: list, threshold: float, margin: float) -> dict:
    flips = far_flips = pixels = far_pixels = 0
    max_levels, level_sum = 0, 0.0
    for ref, res in zip(reference, results, strict=True):
        flipped = ref.binary != res.binary
        far = np.abs(ref.raw - threshold) > margin
        flips += int(flipped.sum())
        far_flips += int(flipped[far].sum())
        pixels += flipped.size
        far_pixels += int(far.sum())
        levels = np.abs(ref.raw_pixels(8).astype(int) - res.raw_pixels(8).astype(int))
        max_levels = max(max_levels, int(levels.max()))
        level_sum += float(levels.sum())
    return {"flip_fraction": flips / pixels, "far_flip_fraction": far_flips / max(1, far_pixels),
            "far_pixel_fraction": far_pixels / pixels, "max_raw_diff_levels": max_levels,
            "mean_raw_diff_levels": level_sum / pixels}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = args.model or str(ensure_model(args.model_dir))
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)  # default profile, threshold 0.5
    images = [make_image(i) for i in range(args.batch_size * args.batches)]
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    engines = {}
    for name in args.precisions:
        started = time.perf_counter()
        engines[name] = MaskEngine.load(model_dir, device="cpu", precision=name, batch_size=args.batch_size)
        print(f"loaded {name} in {time.perf_counter() - started:.1f} s", flush=True)
    if args.silu_reference:  # how much of int8's gain is the activation rewrite alone
        engine = MaskEngine.load(model_dir, device="cpu", precision="fp32", batch_size=args.batch_size)
        for layer in engine.loaded.model.clip.vision_model.encoder.layers:
            _quick_gelu_as_silu(layer.mlp)
        engines["fp32+silu"] = engine

    print(f"timing: {len(images)} images of {images[0].width}x{images[0].height} in batches of "
          f"{args.batch_size}, {args.repeat} rounds after 1 warm-up batch, {args.threads} threads", flush=True)
    timings = time_rounds(engines, batches, spec, args.repeat)
    outputs = {name: engine.predict(images, spec) for name, engine in engines.items()}
    figures = {}
    for name in engines:
        speedup = timings["fp32"]["s_per_image"] / timings[name]["s_per_image"]
        figures[name] = {**timings[name], "speedup_vs_fp32": speedup,
                         **accuracy(outputs["fp32"], outputs[name], spec.threshold, args.margin)}

    env = {**cpu_info(), "model": model_dir, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "command": shlex.join([sys.executable, *sys.argv])}
    print()
    print(f"{'precision':<10} {'s/image':>8} {'(infer.)':>9} {'vs fp32':>8} {'flipped':>9} "
          f"{'flipped far':>12} {'max raw diff':>13} {'mean raw diff':>14}  target")
    for name, f in figures.items():
        target = ""
        if name in ("bf16", "int8"):
            met = f["speedup_vs_fp32"] >= TARGET_SPEEDUP and f["flip_fraction"] <= TARGET_FLIPS
            target = "PASS" if met else "MISS"
        print(f"{name:<10} {f['s_per_image']:>8.3f} {f['inference_s_per_image']:>9.3f} {f['speedup_vs_fp32']:>7.2f}x "
              f"{f['flip_fraction']:>9.4%} {f['far_flip_fraction']:>12.4%} {f['max_raw_diff_levels']:>9d}/255 "
              f"{f['mean_raw_diff_levels']:>10.3f}/255  {target}")
    if "fp32+silu" in figures:
        print("fp32+silu: not a --precision; fp32 with the exact quick_gelu -> in-place SiLU rewrite that int8 "
              "applies before quantizing, to show how much of int8's gain is that rewrite alone")
    far = figures["fp32"]["far_pixel_fraction"]
    print(f"\nflipped: thresholded (0.5) pixels that differ from fp32, all pixels; flipped far: only pixels "
          f"whose fp32 raw mask is > {args.margin} from 0.5 ({far:.1%} of the pixels here)")
    print(f"target (informational): >= {TARGET_SPEEDUP}x fp32 per image, <= {TARGET_FLIPS:.1%} pixels flipped")
    print(f"cpu: {env['cpu']}; capability {env['torch_cpu_capability']}; quantized engine {env['quantized_engine']}")
    print("flags: " + ", ".join(f"{flag} {'yes' if have else 'no'}" for flag, have in env["flags"].items()))
    print(f"torch {env['torch']}, {env['threads']} threads, python {env['python']}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"model: {env['model']}{'' if args.model else ' (random weights, rd64 shapes)'}")
    print(f"command: {env['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "environment": env}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
