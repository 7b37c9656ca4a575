"""Saliency, measured on real photos: its cost against a prediction, and whether the map points at
what the model uses (a deletion check), each against its baseline in the same run.

* Cost: seconds per image of ``Explainer.saliency`` (SmoothGrad, ``SAMPLES`` noisy copies)
  against the SavedModel's prediction of the same images in one batch, and the process's peak
  memory before and after.
* Deletion: blur the 10% of the cells of a 14 x 14 grid that hold the most of the map, and as
  baselines 10% of the cells drawn at random (seed 0) and the 10% that hold the least; the drop
  in the guessed class's probability should be far larger for the map's cells than for random
  ones.

    python bench/saliency.py [--model BUNDLE] [--images 16]

Without ``--model`` it first trains a head-only MobileNetV2 bundle on hymenoptera's train split.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained bundle (default: train one on hymenoptera)")
    parser.add_argument("--images", type=int, default=16, help="validation photos to explain")
    args = parser.parse_args()
    require(HYMENOPTERA)
    import tlcli
    from tlcli.data import images
    from tlcli.deploy import saliency

    model = args.model
    if model is None:
        require(MOBILENET_V2)
        model = Path(tempfile.mkdtemp(prefix="bench-saliency-")) / "model"
        tlcli.train(HYMENOPTERA / "train", out=str(model), val_dir=str(HYMENOPTERA / "val"),
                    backbone=str(MOBILENET_V2), image_size=224, tensorboard=None)
    b = tlcli.load_bundle(model)
    paths = sorted(p for label in b.labels for p in (HYMENOPTERA / "val" / label).iterdir())
    paths = paths[::max(1, len(paths) // args.images)][:args.images]
    x = np.stack([images.load_for_model(p, b.image_size) for p in paths])
    explainer = saliency.Explainer(b)
    explainer.engine(x)
    start = time.perf_counter()
    probs = explainer.engine(x)
    predict_s = (time.perf_counter() - start) / len(x)
    before = _peak_mib()
    explainer.saliency(x[0])  # traces the gradient function once, outside the timing
    start = time.perf_counter()
    maps = [explainer.saliency(xi) for xi in x]
    explain_s = (time.perf_counter() - start) / len(x)
    print(f"{len(x)} photos, {b.image_size} px, {saliency.SAMPLES} samples, {saliency.SAMPLE_BATCH} a pass")
    print(f"predict {predict_s:.3f} s/image (one batch), saliency {explain_s:.3f} s/image: "
          f"{explain_s / predict_s:.1f}x")
    print(f"peak memory {before:.0f} MiB after predicting the batch, {_peak_mib():.0f} MiB after the maps")

    rng = np.random.default_rng(0)
    drops = {"map": [], "random": [], "map's lowest": []}
    for xi, (m, c), p in zip(x, maps, probs):
        cells = _cells(m, GRID)  # the map's mass per cell of a GRID x GRID grid
        k = round(0.1 * cells.size)
        order = np.argsort(-cells, axis=None)
        chosen = {"map": order[:k], "random": rng.choice(cells.size, k, replace=False), "map's lowest": order[-k:]}
        blurred = _blurred(xi)
        for name, flat in chosen.items():
            after = explainer.engine(_replaced(xi, blurred, flat, GRID)[None])[0, c]
            drops[name].append(float(p[c] - after))
    mean = {name: float(np.mean(d)) for name, d in drops.items()}
    print(f"blur 10% of a {GRID}x{GRID} grid's cells: p(guess) drops " +
          ", ".join(f"{v:.3f} ({name})" for name, v in mean.items()) +
          f"; map / random {mean['map'] / max(mean['random'], 1e-6):.1f}x")


GRID = 14  # cells of 16 x 16 pixels at 224


def _cells(m: np.ndarray, grid: int) -> np.ndarray:
    s = m.shape[0] // grid
    return m[:s * grid, :s * grid].reshape(grid, s, grid, s).sum(axis=(1, 3))


def _blurred(x: np.ndarray) -> np.ndarray:
    """The photo blurred (Gaussian, radius 1/14 of its side): cells replaced by it lose their
    detail without the grey squares that a network reacts to for their own sake."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(np.rint(x * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(x.shape[0] / 14))
    return np.asarray(img, np.float32) / 255


def _replaced(x: np.ndarray, blurred: np.ndarray, flat: np.ndarray, grid: int) -> np.ndarray:
    s = x.shape[0] // grid
    out = x.copy()
    for i, j in zip(*np.unravel_index(flat, (grid, grid))):
        out[i * s:(i + 1) * s, j * s:(j + 1) * s] = blurred[i * s:(i + 1) * s, j * s:(j + 1) * s]
    return out


if __name__ == "__main__":
    main()
