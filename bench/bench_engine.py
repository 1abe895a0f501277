"""Seconds per image: the seed "Mask By Text" node's algorithm vs ``clipmask run``, side by side.

- seed: the node's recipe re-implemented here on transformers' CLIPSeg with eager attention
  (timojl/clipseg computes attention with bmm + softmax): full-size square resize, one model
  call for the positives and one for the negatives, text re-encoded every call, nearest upsampling.
  Timed in-process, one image at a time, after one warm-up image; masks saved as PNGs.
- clipmask default / masquerade: the whole ``clipmask run`` process. Start-up and model load cancel
  out: (t(N2 images) - t(N1 images)) / (N2 - N1).
- prompt cost: clipmask default with 3 positives + 1 negative vs 1 positive, same method.

Usage: .venv/bin/python bench/bench_engine.py [--images K] [--seed-images N] [--threads T] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F
from torchvision import transforms

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLIPMASK = REPO / ".venv" / "bin" / "clipmask"
WIDTH, HEIGHT = 512, 384
PROMPT, NEGATIVE, ONE_PROMPT = "a person|a dog|a car", "background", "a person"
N1 = 2  # images in the short clipmask run; the long run has N1 + K
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: (figure, comparison, bound) for the PASS/MISS column; informational only.
TARGETS = {"speedup_default": (">=", 12.0), "speedup_masquerade": (">=", 4.0), "prompt_cost_ratio": ("<=", 1.25)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="extra images per measured clipmask run (K)")
    parser.add_argument("--seed-images", type=int, default=3, help="timed seed images after 1 warm-up")
    parser.add_argument("--repeat", type=int, default=2, help="clipmask runs per image count; the fastest counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=32, help="clipmask --batch-size on cuda")
    parser.add_argument("--seed-attention", choices=("eager", "sdpa"), default="eager",
                        help="attention of the seed baseline: eager is what the node's clipseg code does; "
                             "sdpa shows how much of the gap fused attention alone would close")
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / ".cache" / "rd64")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "latest.json")
    args = parser.parse_args()
    if min(args.images, args.seed_images, args.repeat) < 1:
        parser.error("--images, --seed-images and --repeat must be at least 1")
    return args


# ---------------------------------------------------------------- inputs


def ensure_model(path: Path) -> Path:
    """Build the random rd64-shaped (ViT-B/16) CLIPSeg once; later runs reuse it."""
    config = path / "config.json"
    if config.exists() and json.loads(config.read_text())["vision_config"].get("patch_size") == 16:
        return path
    from worker import random_model

    print(f"building random rd64 (ViT-B/16) CLIPSeg into {path} ...", flush=True)
    random_model.build_random_clipseg(path, shape="rd64")
    return path


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic (height, width, 3) uint8 photo stand-in: smooth waves, a blob per channel
    and sensor-like noise (JPEG quality 90 makes about 5 MB of it at 12 MP). bench_host.py and the
    scripts that import its ``make_jpeg`` use it at any size."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 4, 2).tolist() + [rng.uniform(0, 6.3)]
        wave = 0.5 + 0.25 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        blob = 0.4 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(wave + blob + rng.normal(0, 0.06, (height, width)).astype(np.float32))
    return np.clip(np.stack(channels, axis=-1) * 255, 0, 255).astype(np.uint8)


def make_image(index: int) -> Image.Image:
    """Photo stand-in ``index`` at 512x384."""
    return Image.fromarray(photo(WIDTH, HEIGHT, index), "RGB")


def write_images(root: Path, count: int) -> list[Path]:
    """``count`` JPEGs (quality 90) in nested folders; image i is the same in every folder."""
    paths = []
    for i in range(count):
        path = root / f"set{i % 2}" / f"part{i % 3}" / f"img_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(i).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- the seed node's algorithm


def load_seed_model(model_dir: Path, device: str, attention: str = "eager"):
    """The same weights; eager attention (explicit bmm + softmax) is what timojl/clipseg does."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = CLIPSegForImageSegmentation.from_pretrained(model_dir, attn_implementation=attention)
    tokenizer = CLIPSegProcessor.from_pretrained(model_dir).tokenizer
    return model.eval().to(device), tokenizer


def seed_pixels(path: Path) -> torch.Tensor:
    """The node's input: [1, H, W, 3] float in [0, 1], EXIF applied, RGB."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def seed_logits(model, tokenizer, img: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """One model call, the image repeated per prompt; text tokenized like clip.tokenize (77)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tokens = tokens.to(img.device)
    logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                   pixel_values=img.repeat(len(prompts), 1, 1, 1), interpolate_pos_encoding=True).logits
    return logits.reshape(len(prompts), 1, *logits.shape[-2:])


def seed_probability(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """nearest upsampling to (H, W), sigmoid, max over prompts (B = 1)."""
    preds = torch.sigmoid(F.interpolate(logits, size=size, mode="nearest"))
    return torch.max(preds.reshape(logits.shape[0], 1, *size), dim=0).values


def seed_mask(model, tokenizer, path: Path, device: str, threshold: float = 0.5):
    """The node's get_mask for one image: (thresholded, mask), each [1, H, W] on the CPU."""
    image = seed_pixels(path).to(device)
    _, height, width, _ = image.shape
    side = max(width, height)
    transform = transforms.Compose([transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                                    transforms.Resize((side, side), antialias=True)])
    img = transform(image.permute(0, 3, 1, 2))
    with torch.no_grad():
        positive = seed_logits(model, tokenizer, img, PROMPT.split("|"))
        negative = seed_logits(model, tokenizer, img, NEGATIVE.split("|"))
    mask = seed_probability(positive, (height, width))
    mask = torch.min(mask, 1.0 - seed_probability(negative, (height, width)))
    thresholded = torch.where(mask >= threshold, 1.0, 0.0)
    return thresholded.cpu(), mask.cpu()


def save_png(values: np.ndarray, path: Path) -> None:
    """8-bit greyscale PNG by Pillow at compress level 1 (the baseline as first measured; clipmask
    itself now deflates with ISA-L, worker/codecs.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values, "L").save(path, format="PNG", compress_level=1)


def seed_one(model, tokenizer, path: Path, src: Path, out: Path, device: str) -> None:
    thresholded, mask = seed_mask(model, tokenizer, path, device)
    relative = path.relative_to(src)
    save_png((thresholded[0].numpy() * 255).astype(np.uint8), out / f"{relative}.mask.png")
    save_png(np.rint(mask[0].numpy() * 255).astype(np.uint8), out / f"{relative}.raw.png")


def time_seed(args, paths: list[Path], src: Path, out: Path) -> float:
    """Seconds per image over ``paths[1:]``, ``paths[0]`` being the warm-up."""
    model, tokenizer = load_seed_model(args.model_dir, args.device, args.seed_attention)
    seed_one(model, tokenizer, paths[0], src, out, args.device)
    started = time.perf_counter()
    for path in paths[1:]:
        seed_one(model, tokenizer, path, src, out, args.device)
    return (time.perf_counter() - started) / (len(paths) - 1)


# ---------------------------------------------------------------- clipmask run, as a process


class CliFailed(RuntimeError):
    """``clipmask run`` exited non-zero or failed some images; the message holds its stderr."""


def clipmask_command(args, src: Path, out: Path, profile: str, prompt: str, negative: str) -> list[str]:
    command = [str(CLIPMASK), "run", str(src), "--out", str(out), "--prompt", prompt, "--negative", negative,
               "--model", str(args.model_dir), "--device", args.device, "--profile", profile, "--quiet"]
    if args.device.startswith("cuda"):
        command += ["--precision", "fp16", "--batch-size", str(args.batch_size)]
    return command


def run_clipmask(args, src: Path, out: Path, profile: str, prompt: str, negative: str) -> float:
    """Wall-clock seconds of one whole ``clipmask run``; raises ``CliFailed``."""
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = clipmask_command(args, src, out, profile, prompt, negative)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    failed = re.search(r"(\d+) failed", done.stdout)
    if done.returncode != 0 or not failed or failed.group(1) != "0":
        raise CliFailed(f"{shlex.join(command)} -> exit {done.returncode}\n"
                        f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}")
    return elapsed


def fastest_run(args, src: Path, out: Path, *run: str) -> float:
    """The minimum over ``--repeat`` runs: start-up noise on a busy machine only ever adds time."""
    return min(run_clipmask(args, src, out, *run) for _ in range(args.repeat))


def clipmask_per_image(args, work: Path, name: str, profile: str, prompt: str, negative: str) -> float:
    """(t(N1 + K) - t(N1)) / K seconds per image, outputs under ``work/name``."""
    run = (profile, prompt, negative)
    small = fastest_run(args, work / "src_small", work / f"{name}_small", *run)
    large = fastest_run(args, work / "src_large", work / f"{name}_large", *run)
    print(f"  {name}: {N1} images {small:.2f}s, {N1 + args.images} images {large:.2f}s", flush=True)
    return (large - small) / args.images


# ---------------------------------------------------------------- figures


def agreement(seed_out: Path, cli_out: Path) -> dict | None:
    """How far clipmask masquerade's raw masks are from the seed's, on the images both made."""
    diffs, flips = [], []
    for seed_raw in sorted(seed_out.rglob("*.raw.png")):
        other = cli_out / seed_raw.relative_to(seed_out)
        if not other.exists():
            continue
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (seed_raw, other))
        diffs.append(int(np.abs(a - b).max()))
        flips.append(float(((a >= 128) != (b >= 128)).mean()))
    if not diffs:
        return None
    return {"images": len(diffs), "max_raw_diff_levels": max(diffs), "threshold_flip_fraction": max(flips)}


def environment(args) -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "python": platform.python_version(), "device": args.device, "seed_attention": args.seed_attention,
            "command": shlex.join([sys.executable, *sys.argv])}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def verdict(name: str, value: float | None) -> str:
    if name not in TARGETS:
        return ""
    op, bound = TARGETS[name]
    if value is None:
        return f"{op} {bound:g}  ERROR"
    ok = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound:g}  {'PASS' if ok else 'MISS'}"


def derived(figures: dict) -> dict:
    """Speed-ups and the prompt-cost ratio from the per-image seconds (None where missing)."""
    def ratio(a, b):
        return figures.get(a) / figures.get(b) if figures.get(a) and figures.get(b) else None

    return {"speedup_default": ratio("seed_s_per_image", "default_s_per_image"),
            "speedup_masquerade": ratio("seed_s_per_image", "masquerade_s_per_image"),
            "prompt_cost_ratio": ratio("default_s_per_image", "default_1prompt_s_per_image")}


def print_table(figures: dict, env: dict, cuda: bool) -> None:
    print(f"\n{'figure':34} {'value':>12}  target")
    for name, value in figures.items():
        text = "ERROR" if value is None else f"{value:.3f}"
        print(f"{name:34} {text:>12}  {verdict(name, value)}")
        if cuda and name.endswith("_s_per_image") and value:
            print(f"{name.replace('_s_per_image', '_images_per_s'):34} {1 / value:12.2f}")
    for key, value in env.items():
        print(f"{key}: {value}")


# ---------------------------------------------------------------- main


def measure(args, work: Path, errors: dict) -> dict:
    """Every per-image figure; a failed clipmask run is recorded in ``errors`` and gives None."""
    # Image i is the same file in every set, so the seed's outputs can be compared with masquerade's.
    write_images(work / "src_large", N1 + args.images)
    write_images(work / "src_small", N1)
    seed_paths = write_images(work / "src_seed", args.seed_images + 1)
    print("seed (in-process) ...", flush=True)
    figures = {"seed_s_per_image": time_seed(args, seed_paths, work / "src_seed", work / "seed_out")}
    runs = {"default": ("default", PROMPT, NEGATIVE), "masquerade": ("masquerade", PROMPT, NEGATIVE),
            "default_1prompt": ("default", ONE_PROMPT, "")}
    for name, (profile, prompt, negative) in runs.items():
        print(f"clipmask {name} ...", flush=True)
        try:
            figures[f"{name}_s_per_image"] = clipmask_per_image(args, work, name, profile, prompt, negative)
        except CliFailed as err:
            print(f"clipmask {name} FAILED:\n{err}", file=sys.stderr, flush=True)
            figures[f"{name}_s_per_image"], errors[name] = None, str(err)
    return figures


def write_results(args, figures: dict, agree: dict | None, env: dict, errors: dict) -> None:
    conditions = {"image_size": [WIDTH, HEIGHT], "jpeg_quality": 90, "prompt": PROMPT, "negative": NEGATIVE,
                  "one_prompt": ONE_PROMPT, "n1": N1, "n2": N1 + args.images, "repeat": args.repeat,
                  "seed_images": args.seed_images}
    result = {"figures": figures, "targets": {k: " ".join(map(str, v)) for k, v in TARGETS.items()},
              "verdicts": {k: verdict(k, figures.get(k)) for k in TARGETS}, "seed_vs_masquerade": agree,
              "conditions": conditions, "environment": env, "errors": errors}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_model(args.model_dir)
    errors: dict = {}
    with tempfile.TemporaryDirectory(prefix="clipmask-bench-") as tmp:
        work = Path(tmp)
        figures = measure(args, work, errors)
        figures.update(derived(figures))
        agree = agreement(work / "seed_out", work / "masquerade_large")
    env = environment(args)
    print_table(figures, env, args.device.startswith("cuda"))
    print(f"seed vs masquerade masks: {agree}")
    write_results(args, figures, agree, env, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
