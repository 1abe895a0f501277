"""Images per second per GPU: model only, model + postprocess, engine end to end, ``clipmask run``.

A random CLIPSeg with the shapes of ``CIDAS/clipseg-rd64-refined`` (ViT-B/16; random weights time
the same as the real ones), fp16 on CUDA, 3 prompts + 1 negative, 640x480 JPEGs (quality 90,
bench_host.py's deterministic photo stand-in; ``--distinct`` different images, cycled). Sections:

  a  model only: pixels already on the device, ``_forward`` + synchronize, per batch size
  b  model + postprocess: ``_predict_pixels`` on device pixels (masks back on the host)
  c  engine end to end from JPEG bytes in memory: ``load_input`` in a thread pool,
     ``predict_prepared`` per batch, PNGs encoded in the pool; device decode on and off
  f  what full-size device decoding changes against the host path (same engine, same
     precision): the 352x352 model input in grey levels and the masks, at --size and --diff-size
  d  ``clipmask run`` over a local folder, as a process: (N - n) / (t(N) - t(n)), so start-up and
     model load cancel out
  g  d with 2 and then 4 ``clipmask run`` processes side by side on the device, each over its
     share of the images: whether more processes per GPU (``--processes-per-device``) pay
  e  c and a again with ``CLIPMASK_COMPILE=1`` (``torch.compile`` of the backbone), in a child
     process bounded by what is left of ``--budget``

GPU utilisation (nvidia-smi every 200 ms) is sampled during c, d and g. Not a test; exit code 0.

  python bench/bench_gpu.py                                   # CUDA, about 4 minutes on an H100
  python bench/bench_gpu.py --device cpu --shape tiny --images 24 --batch-sizes 4 --seconds 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from bench_host import make_jpeg  # noqa: E402

from worker.engine import MaskEngine  # noqa: E402
from worker.outputs import encode_masks  # noqa: E402
from worker.random_model import build_random_clipseg  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

PROMPT, NEGATIVE = "a person|a dog|a car", "background"
SPEC = MaskSpec.from_text(PROMPT, NEGATIVE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a smoke run)")
    parser.add_argument("--shape", default="rd64", choices=("rd64", "tiny"), help="random model shape")
    parser.add_argument("--images", type=int, default=4096, help="images per end-to-end run (c, d, e)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct JPEGs, cycled to --images")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--diff-size", default="4032x3024", help="a large size for section f")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128], help="section a")
    parser.add_argument("--batch-size", type=int, help="b-e (default: the largest of --batch-sizes)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per figure in a and b")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 4, help="loader/encoder threads (c)")
    parser.add_argument("--sections", default="abcfdge", help="which sections, in this order")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--model-dir", type=Path, help="default bench/.cache/gpu-SHAPE (built once)")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or max(args.batch_sizes)
    args.width, args.height = map(int, args.size.split("x"))
    args.model_dir = args.model_dir or BENCH / ".cache" / f"gpu-{args.shape}"
    return args


def ensure_model(path: Path, shape: str) -> Path:
    if not (path / "config.json").exists():
        started = time.perf_counter()
        build_random_clipseg(path, shape=shape)
        print(f"built random {shape} CLIPSeg in {path} ({time.perf_counter() - started:.0f} s)", flush=True)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, images_per_step: int, seconds: float, device: torch.device) -> float:
    """Images per second of ``step`` repeated for about ``seconds``, after two warm-up steps."""
    step(), step()
    sync(device)
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or steps < 2:
        step()
        steps += 1
        sync(device)
    return steps * images_per_step / (time.perf_counter() - started)


class GpuSampler:
    """nvidia-smi utilisation and memory every 200 ms while in the ``with`` block."""

    def __init__(self, device: torch.device):
        self.device, self.process, self.summary = device, None, "gpu util: n/a"

    def __enter__(self):
        if self.device.type == "cuda" and shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.device.index or 0), "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        rows = [tuple(float(v) for v in line.split(",")) for line in out.splitlines() if line.count(",") == 1]
        if rows:
            util, memory = np.array(rows).T
            self.summary = (f"gpu util mean {util.mean():.0f}% max {util.max():.0f}% ({len(rows)} samples), "
                            f"memory max {memory.max():.0f} MiB")


def model_only(engine: MaskEngine, args) -> None:
    """a, b: device pixels in, no decode; b adds the postprocess at --size."""
    generator = torch.Generator(device=engine.device).manual_seed(0)
    for batch in args.batch_sizes if "a" in args.sections else []:
        pixels = torch.randn(batch, 3, 352, 352, device=engine.device, generator=generator)
        rate = timed_rate(lambda: engine._forward(pixels, SPEC), batch, args.seconds, engine.device)
        print(f"a  model only          batch {batch:4d}: {rate:8.0f} images/s", flush=True)
    if "b" in args.sections:
        pixels = list(torch.randn(args.batch_size, 3, 352, 352, device=engine.device, generator=generator))
        sizes = [(args.width, args.height)] * args.batch_size
        rate = timed_rate(lambda: engine._predict_pixels(pixels, sizes, SPEC), args.batch_size, args.seconds,
                          engine.device)
        print(f"b  model + postprocess batch {args.batch_size:4d}: {rate:8.0f} images/s ({args.size} masks)", flush=True)
        print("   " + postprocess_breakdown(engine, torch.stack(pixels), (args.height, args.width)), flush=True)


def postprocess_breakdown(engine: MaskEngine, pixels: torch.Tensor, size: tuple[int, int]) -> str:
    """ms per image of b's steps, each synchronized: forward, the masks on the device, the copy home."""
    from worker import postprocess_batch

    def synced(step):
        started = time.perf_counter()
        out = step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return out, (time.perf_counter() - started) * 1000.0 / len(pixels)

    with torch.inference_mode():
        logits, forward = synced(lambda: engine._forward(pixels, SPEC))
        (raw, binary), render = synced(lambda: postprocess_batch.render_block(logits, SPEC, size, True))
        _, pageable = synced(lambda: (raw.cpu(), binary.cpu()))
        _, pinned = synced(lambda: (postprocess_batch._to_host(raw), postprocess_batch._to_host(binary)))
        _, pinned_again = synced(lambda: (postprocess_batch._to_host(raw), postprocess_batch._to_host(binary)))
    return (f"ms/image: forward {forward:.3f}, masks on the device {render:.3f}, copy home pageable {pageable:.3f}, "
            f"pinned {pinned:.3f} (again {pinned_again:.3f})")


def end_to_end(engine: MaskEngine, files: list[bytes], args, label: str) -> None:
    """c: load_input in the pool (two batches ahead), predict_prepared, PNGs encoded in the pool."""
    batch, timings = args.batch_size, {}
    with ThreadPoolExecutor(args.threads) as pool:
        engine.predict_prepared([engine.load_input(data, SPEC) for data in files[:batch]], SPEC)  # warm-up
        sync(engine.device)
        def batches():  # as tasks/pipeline/stream.py reads ahead: two batches
            loads = deque()
            for data in files:
                loads.append(pool.submit(engine.load_input, data, SPEC))
                if len(loads) >= 2 * batch:
                    yield [loads.popleft().result() for _ in range(batch)]
            while loads:
                yield [loads.popleft().result() for _ in range(min(batch, len(loads)))]

        with GpuSampler(engine.device) as sampler:
            started = time.perf_counter()
            encodes, failed = deque(), 0
            for items in batches():
                for result in engine.predict_prepared(items, SPEC):
                    if isinstance(result, Exception):
                        failed += 1
                        continue
                    for key, value in result.timings_ms.items():
                        timings[key] = timings.get(key, 0.0) + value
                    encodes.append(pool.submit(encode_masks, result, SPEC))
                while len(encodes) > 4 * batch:
                    encodes.popleft().result()
            for future in encodes:
                future.result()
            elapsed = time.perf_counter() - started
    stages = ", ".join(f"{key} {value / len(files):.2f}" for key, value in sorted(timings.items()))
    print(f"c  end to end, {label:18s}: {len(files) / elapsed:8.0f} images/s  ({len(files)} images, "
          f"batch {batch}, {args.threads} threads, {failed} failed)\n     ms/image: {stages}\n     {sampler.summary}",
          flush=True)


def decode_difference(engine: MaskEngine, args) -> None:
    """f: device decode (full size) vs the host path (reduced DCT decode of large JPEGs)."""
    for size in dict.fromkeys((args.size, args.diff_size)):
        width, height = map(int, size.split("x"))
        files = [make_jpeg(width, height, index) for index in range(2)]
        saved = engine.device_decode
        try:
            engine.device_decode = False
            host = [engine.load_input(data, SPEC) for data in files]
            engine.device_decode = True
            device = [engine.load_input(data, SPEC) for data in files]
        finally:
            engine.device_decode = saved
        if any(item.encoded is None for item in device):
            print(f"f  {size}: not device-decodable here; skipped")
            continue
        from worker import gpu_decode, preprocess

        decoded = gpu_decode.decode_batch(device, engine.device)
        pixels = preprocess.tensor_pixel_values(decoded, engine.loaded.processor)
        std = torch.tensor(engine.loaded.processor.image_processor.image_std).view(3, 1, 1) * 255.0
        grey = torch.stack([(p.cpu() - h.pixels).abs() * std for p, h in zip(pixels, host)])
        masks = [engine.predict_prepared(items, SPEC) for items in (host, device)]
        raw = np.array([np.abs(a.raw_pixels().astype(int) - b.raw_pixels().astype(int)).mean()
                        for a, b in zip(*masks)])
        flipped = np.mean([np.mean(a.binary_pixels() != b.binary_pixels()) for a, b in zip(*masks)])
        print(f"f  {size}: device vs host 352x352 input: max {grey.max():.2f}, mean {grey.mean():.3f} grey levels; "
              f"raw mask mean {raw.mean():.3f} grey levels; thresholded pixels flipped {flipped:.4%}", flush=True)


def clipmask_run(args, files: list[bytes], model_dir: Path, processes: int = 1) -> None:
    """d: the whole CLI process, twice (n and N images), so start-up cancels out. g: the same with
    ``processes`` of them side by side on the one device, each over its share of the images (as
    ``clipmask worker --processes-per-device`` would run them): does one process feed the GPU?"""
    section = "d" if processes == 1 else "g"
    small = max(args.batch_size * processes, len(files) // 8)
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        seconds = {}
        for count in (small, len(files)):
            commands = []
            for part in range(processes):
                src = root / f"src{count}-{part}"
                src.mkdir()
                for i in range(part, count, processes):
                    (src / f"img_{i:06d}.jpg").write_bytes(files[i])
                commands.append([sys.executable, "-m", "tasks.cli", "run", str(src), "--out",
                                 str(root / f"out{count}-{part}"), "--prompt", PROMPT, "--negative", NEGATIVE,
                                 "--model", str(model_dir), "--device", args.device, "--batch-size",
                                 str(args.batch_size), "--quiet"])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
            with GpuSampler(torch.device(args.device)) as sampler:
                started = time.perf_counter()
                running = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True) for command in commands]
                outcomes = [(process.wait(), process.stderr.read()) for process in running]
                seconds[count] = time.perf_counter() - started
            codes = [code for code, _ in outcomes]
            print(f"{section}  clipmask run x{processes} {count:6d} images: {seconds[count]:6.1f} s, exit {codes}; "
                  f"{sampler.summary}", flush=True)
            failed = [error for code, error in outcomes if code != 0]
            if failed:
                print("   " + failed[0][-2000:].replace("\n", "\n   "))
                return
        extra = seconds[len(files)] - seconds[small]
        marginal = (f"{(len(files) - small) / extra:8.0f} images/s" if extra > 0
                    else "not measurable (start-up varied more)")
        print(f"{section}  clipmask run x{processes}: {marginal} (marginal, {small} -> {len(files)} images); "
              f"{len(files) / seconds[len(files)]:.0f} images/s with start-up", flush=True)
        print(f"   command ({processes} at once, each over its share): {' '.join(commands[0])}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compiled(args, started: float) -> None:
    """e: a and c in a child with CLIPMASK_COMPILE=1, killed when the budget runs out."""
    left = args.budget - (time.perf_counter() - started)
    if args.device == "cpu" or left < 30:
        print(f"e  compile: skipped ({'cpu' if args.device == 'cpu' else f'{left:.0f} s of budget left'})")
        return
    command = [sys.executable, str(Path(__file__)), *sys.argv[1:], "--sections", "ac", "--batch-sizes",
               str(args.batch_size), "--budget", str(left)]
    print(f"e  with CLIPMASK_COMPILE=1 (up to {left:.0f} s):", flush=True)
    try:
        subprocess.run(command, env=dict(os.environ, CLIPMASK_COMPILE="1", BENCH_GPU_CHILD="1"), timeout=left)
    except subprocess.TimeoutExpired:
        print("e  compile: out of budget (compilation and the measures did not finish)")


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (use --device cpu for a smoke run)")
        return 0
    child = os.environ.get("BENCH_GPU_CHILD") == "1"
    engine = MaskEngine.load(str(ensure_model(args.model_dir, args.shape)), device=args.device,
                             batch_size=args.batch_size)
    if not child:
        print(f"torch {torch.__version__}, device {engine.device}"
              f"{' ' + torch.cuda.get_device_name(engine.device) if engine.device.type == 'cuda' else ''}, "
              f"precision {engine.model_info['precision']}, compiled {engine.compiled}, {args.shape} model, "
              f"{PROMPT!r} minus {NEGATIVE!r}, {args.size} JPEGs", flush=True)
    else:
        print(f"   compiled backbone: {engine.compiled}", flush=True)
    distinct = [make_jpeg(args.width, args.height, i) for i in range(min(args.distinct, args.images))]
    files = [distinct[i % len(distinct)] for i in range(args.images)]
    default_decode = engine.device_decode
    for section in args.sections:
        if time.perf_counter() - started > args.budget and section != "e":
            print(f"{section}  skipped: past --budget {args.budget:.0f} s")
        elif section in "ab":
            if section == next(s for s in args.sections if s in "ab"):  # model_only does both
                model_only(engine, args)
        elif section == "c":
            for decode in ((True, False) if not child else (True,)):
                engine.device_decode = decode
                end_to_end(engine, files, args, f"device decode {'on' if decode else 'off'}")
            engine.device_decode = default_decode
        elif section == "f":
            decode_difference(engine, args)
        elif section == "d":
            clipmask_run(args, files, args.model_dir)
        elif section == "g":
            for processes in (2, 4):
                clipmask_run(args, files, args.model_dir, processes)
        elif section == "e" and not child:
            compiled(args, started)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
