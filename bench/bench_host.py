"""Host work per image, old path vs new, one thread: decode + preprocess + postprocess + encode.

Everything a worker's CPU does for one image except the model forward, which is replaced by a
STAND-IN: deterministic logits at the model's logit resolution (352x352), 3 prompts + 1 negative,
computed once per image and shared by both paths. Two kinds:

- ``smooth``: a few Gaussian blobs per prompt over a sloping background, like real CLIPSeg logits,
  so the PNGs compress as real masks do;
- ``noise``: independent Gaussian logits at every logit pixel, the worst case for the
  postprocess's arithmetic and for PNG size.

``old`` is today's code path as of this script (kept here, so later library changes do not move
the baseline): full decode, ``ImageOps.exif_transpose`` (a copy), the CLIPSeg processor on the
full image, each prompt's logits upsampled to full size in float32 then sigmoid / max / min,
``np.rint`` to uint8, Pillow's PNG encoder at ``compress_level=1``. ``new`` is the library as it
is now, through the engine's own methods: ``MaskEngine.decode`` (a JPEG at a reduced DCT scale),
``prepare``, ``_postprocess`` (``postprocess.render``) and ``outputs.encode_masks``.

Images: JPEGs at quality 90, generated deterministically (the photo stand-in of bench_engine.py:
gradients, a blob, noise). Each figure is the best of ``--repeat`` runs per image (these machines
are shared and noisy), old and new interleaved. Printed: images per second per core, each stage in
ms, PNG sizes, and how far new is from old (raw mask in grey levels, thresholded mask, and the
model's 352x352 input in grey levels, which reduced decoding changes).

Then (unless ``--host-only``) the other speed targets, each from its own script with a real
(random-weight) model: ``bench_e2e.py`` (``clipmask run`` end to end against model-only) and
``bench_worker.py`` (a worker fed chunks of 8 against 256, and 32 concurrent offload requests
against one at a time).

Usage: .venv/bin/python bench/bench_host.py [--sizes 512x384 640x480 4032x3024] [--images 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_engine import photo  # noqa: E402

from worker.codecs import to_rgb  # noqa: E402
from worker.engine import MaskEngine  # noqa: E402
from worker.outputs import encode_masks  # noqa: E402
from worker.random_model import build_random_clipseg  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

PROMPT, NEGATIVE = "a person|a dog|a car", "background"
LOGIT_SIDE = 352
#: Informational: host images per second per core, smooth logits (clipmask's own target).
TARGETS = {(640, 480): 100.0, (4032, 3024): 6.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x384", "640x480", "4032x3024"])
    parser.add_argument("--images", type=int, default=2, help="distinct images per size")
    parser.add_argument("--repeat", type=int, default=5, help="runs per image and path; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per core)")
    parser.add_argument("--decode-margin", type=int, help="MaskEngine.decode_margin for the new path "
                        "(default: the library's, preprocess.DECODE_MARGIN; 0: full-size decode)")
    parser.add_argument("--host-only", action="store_true",
                        help="skip the end-to-end (bench_e2e.py) and worker (bench_worker.py) sections")
    return parser.parse_args()


# ---------------------------------------------------------------- inputs


def make_jpeg(width: int, height: int, index: int) -> bytes:
    """bench_engine.py's photo stand-in at any size, JPEG quality 90."""
    buffer = io.BytesIO()
    Image.fromarray(photo(width, height, 1000 + index), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def standin_logits(kind: str, index: int, prompts: int = 4) -> torch.Tensor:
    """STAND-IN for the model's output: (prompts, 352, 352) logits, no model involved."""
    generator = torch.Generator().manual_seed(index)
    if kind == "noise":
        return torch.randn(prompts, LOGIT_SIDE, LOGIT_SIDE, generator=generator) * 4
    grid = torch.linspace(0, 1, LOGIT_SIDE)
    y, x = grid[:, None], grid[None, :]
    planes = []
    for _ in range(prompts):
        a, b, c = (torch.rand(3, generator=generator) - 0.5).tolist()
        plane = -6.0 + 2 * a + 3 * b * x + 3 * c * y  # a sloping "no" background
        for _ in range(3):
            cx, cy = (torch.rand(2, generator=generator) * 0.8 + 0.1).tolist()
            radius = float(torch.rand(1, generator=generator)) * 0.15 + 0.04
            plane = plane + 11.0 * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
        planes.append(plane)
    return torch.stack(planes)


# ---------------------------------------------------------------- the old path (today's steps)


def old_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def old_postprocess(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int]):
    """Each prompt upsampled to full size, sigmoid, max, min; threshold; np.rint to uint8."""
    from torch.nn import functional as F

    def max_probability(part):
        result = None
        for prompt_logits in part.float():
            up = F.interpolate(prompt_logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            probability = torch.sigmoid(up)
            result = probability if result is None else torch.maximum(result, probability)
        return result

    mask = max_probability(logits[: len(spec.prompts)])
    if spec.negative_prompts:
        mask = torch.minimum(mask, 1.0 - max_probability(logits[len(spec.prompts):]))
    raw, binary = mask.numpy(), (mask >= spec.threshold).numpy()
    return np.rint(raw * 255).astype(np.uint8), binary.astype(np.uint8) * 255, raw


def old_encode(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def run_old(engine: MaskEngine, data: bytes, logits: torch.Tensor, spec: MaskSpec) -> dict:
    times, started = {}, time.perf_counter()
    image = old_decode(data)
    times["decode"] = _lap(started)
    started = time.perf_counter()
    pixels = engine.loaded.processor(images=[image], return_tensors="pt")["pixel_values"][0]
    times["preprocess"] = _lap(started)
    started = time.perf_counter()
    raw, binary, raw_float = old_postprocess(logits, spec, (image.height, image.width))
    times["postprocess"] = _lap(started)
    started = time.perf_counter()
    blobs = {"mask": old_encode(binary), "raw": old_encode(raw)}
    times["encode"] = _lap(started)
    return {"times": times, "raw": raw, "binary": binary, "raw_float": raw_float, "pixels": pixels,
            "blobs": blobs}


def run_new(engine: MaskEngine, data: bytes, logits: torch.Tensor, spec: MaskSpec) -> dict:
    times, started = {}, time.perf_counter()
    image, size = engine.decode(data, spec)
    times["decode"] = _lap(started)
    started = time.perf_counter()
    pixels = engine.prepare(image, spec)
    times["preprocess"] = _lap(started)
    started = time.perf_counter()
    result = engine._postprocess(size, logits, spec)
    times["postprocess"] = _lap(started)
    started = time.perf_counter()
    blobs = encode_masks(result, spec)
    times["encode"] = _lap(started)
    raw = result.raw_pixels(8) if "raw" in blobs else None
    return {"times": times, "raw": raw, "binary": result.binary_pixels(), "pixels": pixels, "blobs": blobs,
            "decoded": image.size}


def _lap(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


# ---------------------------------------------------------------- measuring


def best_times(runs: list[dict]) -> dict:
    """Per stage, the best over runs; ``total`` is the best whole run."""
    stages = {stage: min(run["times"][stage] for run in runs) for stage in runs[0]["times"]}
    stages["total"] = min(sum(run["times"].values()) for run in runs)
    return stages


def compare(old: dict, new: dict, spec: MaskSpec) -> dict:
    raw_diff = int(np.abs(old["raw"].astype(np.int16) - new["raw"].astype(np.int16)).max())
    differs = old["binary"] != new["binary"]
    near = np.abs(old["raw_float"] - spec.threshold) <= 1 / 255
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    input_grey = ((old["pixels"] - new["pixels"]).abs() * std * 255)
    return {"raw_max": raw_diff, "binary_differ": int(differs.sum()),
            "binary_differ_far": int((differs & ~near).sum()),
            "input_max": float(input_grey.max()), "input_mean": float(input_grey.mean())}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_clipseg(Path(tmp) / "tiny", shape="tiny")  # only its processor is used
        engine = MaskEngine.load(str(model), device="cpu")
    if args.decode_margin is not None:
        engine.decode_margin = args.decode_margin
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    mask_only = _mask_only(spec)
    sizes = [tuple(int(v) for v in text.lower().split("x")) for text in args.sizes]
    print(f"host work per image, {args.threads} thread(s), best of {args.repeat}; model forward replaced by "
          f"a STAND-IN (logits {LOGIT_SIDE}x{LOGIT_SIDE}, 3 prompts + 1 negative)")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"decode margin {engine.decode_margin}")
    print(f"command: {' '.join(sys.argv)}\n")
    header = (f"{'image':>10} {'logits':>6} {'path':>9} {'img/s':>7} {'total':>7} {'decode':>7} {'prep':>6} "
              f"{'post':>7} {'encode':>7} {'mask KiB':>8} {'raw KiB':>8}")
    print(header)
    print("-" * len(header))
    summary = []
    for width, height in sizes:
        jpegs = [make_jpeg(width, height, i) for i in range(args.images)]
        for kind in ("smooth", "noise"):
            runs = {"old": [], "new": [], "new mask": []}
            diffs = []
            for index, data in enumerate(jpegs):
                logits = standin_logits(kind, index)
                for _ in range(args.repeat):
                    runs["old"].append(run_old(engine, data, logits, spec))
                    runs["new"].append(run_new(engine, data, logits, spec))
                    if kind == "smooth":
                        runs["new mask"].append(run_new(engine, data, logits, mask_only))
                diffs.append(compare(runs["old"][-1], runs["new"][-1], spec))
            for path, path_runs in runs.items():
                if not path_runs:
                    continue
                per_image = [best_times(path_runs[i * args.repeat:(i + 1) * args.repeat])
                             for i in range(args.images)]
                stage = {name: float(np.mean([t[name] for t in per_image])) for name in per_image[0]}
                rate = 1000.0 / stage["total"]
                blobs = path_runs[-1]["blobs"]
                sizes_kib = [f"{len(blobs[role]) / 1024:.0f}" if role in blobs else "-" for role in ("mask", "raw")]
                print(f"{width}x{height:<5} {kind:>6} {path:>9} {rate:7.1f} {stage['total']:7.1f} "
                      f"{stage['decode']:7.1f} {stage['preprocess']:6.1f} {stage['postprocess']:7.1f} "
                      f"{stage['encode']:7.1f} {sizes_kib[0]:>8} {sizes_kib[1]:>8}")
                summary.append(((width, height), kind, path, rate))
            worst = {key: max(d[key] for d in diffs) for key in diffs[0]}
            decoded = runs["new"][-1]["decoded"]
            print(f"{'':>10} {'':>6} {'new-old':>9}  raw mask max {worst['raw_max']} grey level(s); thresholded "
                  f"masks differ at {worst['binary_differ']} px ({worst['binary_differ_far']} farther than one "
                  f"level from the threshold); decoded at {decoded[0]}x{decoded[1]}, model input max "
                  f"{worst['input_max']:.1f} / mean {worst['input_mean']:.2f} grey levels")
    print("\ntargets (smooth logits, host img/s per core; informational):")
    for (size, kind, path, rate) in summary:
        if kind == "smooth" and size in TARGETS and path in ("old", "new"):
            verdict = "PASS" if rate >= TARGETS[size] else "MISS"
            print(f"  {size[0]}x{size[1]} {path:>3}: {rate:6.1f} img/s (target >= {TARGETS[size]:g}) {verdict}")
    if not args.host_only:
        # The other speed targets, each in its own script (real model forward, real worker).
        for script in ("bench_e2e.py", "bench_worker.py"):
            print(f"\n--- bench/{script}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).with_name(script))], check=True)


def _mask_only(spec: MaskSpec) -> MaskSpec:
    """The spec with ``outputs=("mask",)``, if MaskSpec has that field yet; else a stand-in."""
    try:
        return MaskSpec.from_dict({**spec.to_dict(), "outputs": ["mask"]})
    except Exception:  # noqa: BLE001 - MaskSpec without an outputs field: duck-type one
        class MaskOnly:
            def __getattr__(self, name):
                return ("mask",) if name == "outputs" else getattr(spec, name)
        return MaskOnly()


if __name__ == "__main__":
    main()
