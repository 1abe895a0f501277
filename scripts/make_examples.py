"""Write a few example images (nested folders, several formats) for trying ``clipmask run``."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(root: Path) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:384, 0:512] / 512.0
    for i, (name, fmt) in enumerate([("street.jpg", "JPEG"), ("pets/dog.png", "PNG"), ("pets/cat.webp", "WEBP")]):
        pixels = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), np.sin(3 * (x + y))], -1) * 100 + 128
        pixels += rng.normal(0, 10, pixels.shape)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format=fmt)
    print(f"wrote example images to {root}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples"))
