"""``render`` at 12 MP with the combined-map shortcut (``worker/dominant.py``) against prompt by
prompt, as the share of crossing cells grows: where ``MAX_CROSSING`` should sit.

Logits are bench_host.py's smooth STAND-IN (no model) plus growing per-logit noise, 3 prompts + 1
negative, one thread. Both ways run in turn on each image, several times; the medians count.

Usage: .venv/bin/python bench/bench_dominant.py [--size 4032x3024] [--images 4] [--repeat 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

from bench_host import LOGIT_SIDE, NEGATIVE, PROMPT, standin_logits  # noqa: E402

from worker import dominant, postprocess  # noqa: E402
from worker.spec import MaskSpec  # noqa: E402


def crossing_share(logits: torch.Tensor, spec: MaskSpec, size: tuple[int, int], raw: bool) -> float:
    positives = len(spec.prompts)
    saved, dominant.MAX_CROSSING = dominant.MAX_CROSSING, -1.0  # the share only, no fix-ups
    try:
        signed = postprocess.signed_logits(logits, positives)
        return postprocess.shortcut(signed, positives, spec, size, raw).share
    finally:
        dominant.MAX_CROSSING = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4032x3024")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    spec = MaskSpec.from_text(PROMPT, NEGATIVE)
    noise = torch.randn(4, LOGIT_SIDE, LOGIT_SIDE, generator=torch.Generator().manual_seed(1))
    limit = dominant.MAX_CROSSING
    print(f"render at {width}x{height}, 3 prompts + 1 negative, one thread, median of "
          f"{args.images} images x {args.repeat}; MAX_CROSSING is {dominant.MAX_CROSSING:.0%}")
    print(f"{'noise':>6} {'outputs':>8} {'crossing':>9} {'prompt by prompt':>17} {'combined map':>13}")
    for amplitude in (0.0, 0.05, 0.1, 0.15, 0.3):
        for raw in (True, False):
            times: dict[str, list[float]] = {"each": [], "combined": []}
            shares = []
            for index in range(args.images):
                logits = standin_logits("smooth", index) + amplitude * noise
                shares.append(crossing_share(logits, spec, (height, width), raw))
                for attempt in range(args.repeat):
                    order = (("each", -1.0), ("combined", 1.0))
                    for way, forced in order if attempt % 2 else order[::-1]:
                        dominant.MAX_CROSSING = forced  # -1: never the shortcut; 1: always
                        started = time.perf_counter()
                        postprocess.render(logits, spec, (height, width), raw=raw)
                        times[way].append((time.perf_counter() - started) * 1e3)
                    dominant.MAX_CROSSING = limit
            print(f"{amplitude:6.2f} {'both' if raw else 'mask':>8} {statistics.mean(shares):9.1%} "
                  f"{statistics.median(times['each']):14.1f} ms {statistics.median(times['combined']):10.1f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
