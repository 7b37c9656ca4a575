"""Generate sample_data/images: 3 classes x 20 images of 128x128 JPEGs, deterministically.

    python sample_data/generate.py [OUT_DIR]

Classes differ in shape, texture and colour at once (red discs, green stripes, blue checks on
varied backgrounds) so that any pretrained backbone separates them almost perfectly in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
PER_CLASS = 20


def _background(rng) -> Image.Image:
    base = rng.integers(150, 240, 3)
    noise = rng.normal(0, 10, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def discs(rng) -> Image.Image:
    img = _background(rng)
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):
        r = int(rng.integers(15, 35))
        x, y = (int(v) for v in rng.integers(r, SIZE - r, 2))
        colour = (int(rng.integers(180, 255)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return img


def stripes(rng) -> Image.Image:
    img = _background(rng)
    d = ImageDraw.Draw(img)
    width = int(rng.integers(6, 14))
    offset = int(rng.integers(0, width))
    colour = (int(rng.integers(0, 60)), int(rng.integers(140, 220)), int(rng.integers(0, 80)))
    for x in range(-SIZE + offset, 2 * SIZE, 2 * width):
        d.polygon([(x, 0), (x + width, 0), (x + width + SIZE // 2, SIZE), (x + SIZE // 2, SIZE)], fill=colour)
    return img


def checks(rng) -> Image.Image:
    cell = int(rng.integers(10, 24))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    mask = ((yy // cell + xx // cell) % 2).astype(bool)
    a = np.array([rng.integers(0, 60), rng.integers(40, 110), rng.integers(170, 255)])
    b = rng.integers(200, 256, 3)
    arr = np.where(mask[..., None], a, b) + rng.normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


CLASSES = {"blue_checks": checks, "green_stripes": stripes, "red_discs": discs}


def generate(out: Path) -> Path:
    for index, (name, draw) in enumerate(sorted(CLASSES.items())):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            rng = np.random.default_rng([index, i])
            draw(rng).save(folder / f"{name}_{i:02d}.jpg", quality=90)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images"
    print(generate(target))
