"""``clipmask run`` end to end against the model alone, at the same batch size, on the CPU.

The engine is loaded once (random CLIPSeg with rd64's shapes, bench_engine.py's), then, per image
size: model-only is the forward pass over already prepared pixels (``MaskEngine._forward``, the
batch size of ``run``); end to end is ``run_local``, the code of ``clipmask run``, over a local
folder of the same JPEGs (read, decode, preprocess, forward, postprocess, PNG encode, write,
manifest). The ratio says how much of the host work the pipeline hides behind the model (target
>= 0.85 at 12 MP). Called by bench_host.py; runs alone too.

Usage: .venv/bin/python bench/bench_e2e.py [--sizes 640x480 4032x3024] [--images 8] [--precision fp32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_engine import ensure_model  # noqa: E402
from bench_host import NEGATIVE, PROMPT, make_jpeg  # noqa: E402
from tasks.local import run_local  # noqa: E402
from worker.engine import MaskEngine  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

TARGET = 0.85


def model_only_rate(engine: MaskEngine, source: Path, spec: MaskSpec) -> float:
    """Images/s of the forward pass alone, in batches of the engine's batch size."""
    pixels = [engine.prepare(engine.decode(path.read_bytes(), spec).image, spec) for path in sorted(source.iterdir())]
    engine._forward(torch.stack(pixels[:engine.batch_size]), spec)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(pixels), engine.batch_size):
        engine._forward(torch.stack(pixels[start:start + engine.batch_size]), spec)
    return len(pixels) / (time.perf_counter() - started)


def end_to_end_rate(engine: MaskEngine, source: Path, dest: Path, spec: MaskSpec) -> float:
    started = time.perf_counter()
    summary = run_local(str(source), str(dest), spec, lambda: engine, progress=False)
    assert summary["succeeded"] == sum(1 for _ in source.iterdir()), summary
    return summary["succeeded"] / (time.perf_counter() - started)


def bench(sizes: list[tuple[int, int]], images: int, precision: str, model_dir: Path) -> None:
    engine = MaskEngine.load(str(ensure_model(model_dir)), device="cpu", precision=precision)
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    print(f"clipmask run end to end vs model-only: random rd64-shaped CLIPSeg on cpu, {precision}, "
          f"batch {engine.batch_size}, {torch.get_num_threads()} torch threads, {images} JPEGs per size")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for width, height in sizes:
            source = Path(tmp) / f"in-{width}x{height}"
            source.mkdir()
            for i in range(images):
                (source / f"img_{i:03d}.jpg").write_bytes(make_jpeg(width, height, i))
            end_to_end_rate(engine, source, Path(tmp) / "warm", spec)  # warm-up: threads, caches
            model = model_only_rate(engine, source, spec)
            whole = end_to_end_rate(engine, source, Path(tmp) / f"out-{width}x{height}", spec)
            verdict = f"(target >= {TARGET}) {'PASS' if whole / model >= TARGET else 'MISS'}" \
                if width * height >= 10_000_000 else ""
            print(f"  {width}x{height}: model-only {model:6.2f} img/s, end to end {whole:6.2f} img/s, "
                  f"ratio {whole / model:.2f} {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "4032x3024"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / ".cache" / "rd64")
    args = parser.parse_args()
    bench([tuple(int(v) for v in s.lower().split("x")) for s in args.sizes], args.images, args.precision,
          args.model_dir)


if __name__ == "__main__":
    main()
