"""``clipmask run`` end to end against the model alone, at the same batch size, on the CPU.

The engine is loaded once (random CLIPSeg with rd64's shapes, bench_engine.py's), then, per image
size: model-only is the forward pass over already prepared pixels (``MaskEngine._forward``, the
batch size of ``run``); end to end is ``run_local``, the code of ``clipmask run``, over a local
folder of the same JPEGs (read, decode, preprocess, forward, postprocess, PNG encode, write,
manifest). The ratio says how much of the host work the pipeline hides behind the model (target
>= 0.85 at 12 MP). The two are measured in turn ``--repeat`` times and each keeps its best (these
machines are shared and noisy: the same forward pass varies by 15% from one minute to the next);
every measurement is printed. Called by bench_host.py; runs alone too.

Usage: .venv/bin/python bench/bench_e2e.py [--sizes 640x480 4032x3024] [--images 16] [--repeat 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_engine import ensure_model  # noqa: E402
from bench_host import NEGATIVE, PROMPT, make_jpeg  # noqa: E402

from tasks.jobs.preflight import check_run  # noqa: E402
from tasks.pipeline.local import run_local  # noqa: E402
from worker.engine import MaskEngine  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402

TARGET = 0.85


def forward_rate(engine: MaskEngine, pixels: list[torch.Tensor], spec: MaskSpec, batch: int, streams: int,
                 alone: bool) -> float:
    """Images/s of the bare forward pass over ``pixels`` in batches of ``batch``, ``streams`` passes
    at a time, each on the threads the device loop would give it (``MaskEngine.share_threads``
    with ``alone``)."""
    batches = [torch.stack(pixels[start:start + batch]) for start in range(0, len(pixels), batch)]

    def forward(images: torch.Tensor) -> None:
        engine.share_threads(alone)
        engine._forward(images, spec)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(forward, batches[:streams]))  # warm-up
        started = time.perf_counter()
        list(pool.map(forward, batches))
    seconds = time.perf_counter() - started
    engine.share_threads(False)  # threads started later get a stream's share again
    return len(pixels) / seconds


def model_only_rate(engine: MaskEngine, source: Path, spec: MaskSpec) -> dict[str, float]:
    """Images/s of the forward pass alone over already prepared pixels, in batches of the engine's
    batch size, two ways: as the device loop runs them (``engine.streams`` passes side by side,
    each on its share of the threads) and as one pass after another on all the threads. The
    better of the two is the baseline, so the pipeline's way of running the model cannot flatter it."""
    pixels = [engine.prepare(engine.decode(path.read_bytes(), spec).image, spec) for path in sorted(source.iterdir())]
    rates = {"streams": forward_rate(engine, pixels, spec, engine.batch_size, engine.streams, alone=False)}
    if engine.streams > 1:
        rates["one"] = forward_rate(engine, pixels, spec, engine.batch_size, 1, alone=True)
    return rates


def end_to_end_rate(engine: MaskEngine, source: Path, dest: Path, spec: MaskSpec) -> float:
    started = time.perf_counter()
    stores = check_run(str(source), str(dest))  # what `clipmask run` does before it loads the model
    summary = run_local(*stores[:2], spec, engine, total=stores[2], progress=False)
    assert summary["succeeded"] == sum(1 for _ in source.iterdir()), summary
    return summary["succeeded"] / (time.perf_counter() - started)


def bench(sizes: list[tuple[int, int]], images: int, precision: str, model_dir: Path, repeat: int) -> None:
    engine = MaskEngine.load(str(ensure_model(model_dir)), device="cpu", precision=precision)
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    print(f"clipmask run end to end vs model-only: random rd64-shaped CLIPSeg on cpu, {precision}, "
          f"batch {engine.batch_size}, {engine.streams} forward pass(es) side by side of "
          f"{torch.get_num_threads()} torch thread(s), {images} JPEGs per size, best of {repeat}")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for width, height in sizes:
            source = Path(tmp) / f"in-{width}x{height}"
            source.mkdir()
            for i in range(images):
                (source / f"img_{i:03d}.jpg").write_bytes(make_jpeg(width, height, i))
            end_to_end_rate(engine, source, Path(tmp) / "warm", spec)  # warm-up: threads, caches
            models, wholes = [], []
            for attempt in range(repeat):
                models.append(model_only_rate(engine, source, spec))
                wholes.append(end_to_end_rate(engine, source, Path(tmp) / f"out-{width}x{height}-{attempt}", spec))
            model, whole = max(max(rates.values()) for rates in models), max(wholes)
            verdict = f"(target >= {TARGET}) {'PASS' if whole / model >= TARGET else 'MISS'}" \
                if width * height >= 10_000_000 else ""
            print(f"  {width}x{height}: model-only {model:6.2f} img/s, end to end {whole:6.2f} img/s, "
                  f"ratio {whole / model:.2f} {verdict}", flush=True)
            for name in models[0]:
                label = f"{engine.streams} side by side" if name == "streams" else "one at a time, all threads"
                print(f"    model-only, {label}: {' '.join(f'{rates[name]:.2f}' for rates in models)} img/s", flush=True)
            print(f"    end to end: {' '.join(f'{v:.2f}' for v in wholes)} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "4032x3024"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each, the best counts (default 3)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / ".cache" / "rd64")
    args = parser.parse_args()
    bench([tuple(int(v) for v in s.lower().split("x")) for s in args.sizes], args.images, args.precision,
          args.model_dir, args.repeat)


if __name__ == "__main__":
    main()
