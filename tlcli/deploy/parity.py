"""The parity pass every export format goes through: the labelled images it is measured on, its
agreement with the SavedModel (top-1, both accuracies overall and per label, the largest
probability difference), its speed, and the gates that refuse a file before it is put in place."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import data
from tlcli.data import images
from tlcli.errors import TlcliError

# A float (unquantized) export must give the SavedModel's probabilities to within this: far above
# float32 round-off through a network (about 1e-6), far below any change of an answer.
FLOAT_TOLERANCE = 1e-4
TIMED_RUNS = 20  # batch-1 runs timed after two warm-up runs, for ms_per_image


class Labelled:
    """Labelled images for calibration and parity: the bundle's recorded splits, or the --data
    folder. With --data, a shared bundle's splits (``tlcli share``: paths relative to the image
    folder) are looked up under it, and the folder is scanned only when none is there; without
    it, the recorded absolute paths are used. Each source is read once, when first needed."""

    def __init__(self, b: bundles.Bundle, data_dir: str | None, max_pixels: int):
        self.b, self.data_dir, self.max_pixels = b, data_dir, max_pixels
        self._pools: dict[str, list[tuple[str, int]]] = {}
        self._splits: dict | None = None

    def _pool(self, key: str) -> list[tuple[str, int]]:
        if key not in self._pools:
            if key == "data":
                folder = data.scan(self.data_dir, image_size=self.b.image_size, labels=self.b.labels,
                                   max_pixels=self.max_pixels, option="--data")
                self._pools[key] = [(s.path, s.label) for s in folder.samples]
            else:
                if self._splits is None:
                    self._splits = self.b.splits()
                located = (self._located(p) for p, _ in self._splits.get(key) or [])
                # is_file: a FIFO or device named in a crafted splits.json is skipped, never opened
                self._pools[key] = [(p, y) for p, (_, y) in zip(located, self._splits.get(key) or [])
                                    if p is not None and Path(p).is_file()]
        return self._pools[key]

    def _located(self, path: str) -> str | None:
        """A recorded path to open: an absolute one without --data, a relative one (a shared
        bundle's) under --data DIR and inside it; else None."""
        if os.path.isabs(path):
            return None if self.data_dir else path
        if not self.data_dir or Path(path).is_absolute() or ".." in Path(path).parts:
            return None
        return str(Path(self.data_dir) / path)

    def sample(self, which: str, limit: int, seed: int) -> tuple[list[tuple[str, int]], str]:
        """Up to ``limit`` (path, label) pairs, sampled with ``seed``, and where they came from."""
        items, source = self._pool(which), ("validation" if which == "val" else "training") + " images"
        if not items and which != "train":
            items, source = self._pool("train"), "training images (the bundle has no validation images)"
        if self.data_dir:
            if items:
                source += f" recorded in {bundles.SPLITS_FILE}, found in {self.data_dir}"
            else:
                items, source = self._pool("data"), f"images in {self.data_dir}"
        if len(items) > limit:
            items = random.Random(seed).sample(items, limit)
        return items, source


def load_batch(items, size, max_pixels) -> tuple[np.ndarray, np.ndarray]:
    """The decodable images of (path, label) ``items`` as the model's input, and their labels."""
    x, errors = images.decode_batch(items, lambda item: images.load_for_model(item[0], size, max_pixels=max_pixels))
    if x is None:
        return np.zeros((0, size, size, 3), np.float32), np.zeros(0, np.int64)
    return x, np.asarray([y for (_, y), err in zip(items, errors) if err is None])


def run(engine, x: np.ndarray) -> np.ndarray:
    """``engine``'s probabilities for ``x``, 32 images at a time."""
    return np.concatenate([engine(x[i:i + 32]) for i in range(0, len(x), 32)])


def compare(p_ref: np.ndarray, p_out: np.ndarray, y: np.ndarray, b: bundles.Bundle) -> dict:
    """Top-1 agreement, both accuracies (overall and per label) and the largest probability
    difference of an export's probabilities ``p_out`` against the SavedModel's ``p_ref`` on
    images labelled ``y``; of a multi-label bundle, ``label_compare``."""
    if b.meta.multi_label:
        return label_compare(p_ref, p_out, b)
    right_ref, right_out = p_ref.argmax(1) == y, p_out.argmax(1) == y
    per_class = []
    for i, label in enumerate(b.labels):
        mine = y == i
        n = int(mine.sum())
        per_class.append({"label": label, "images": n,
                          "saved_model_accuracy": float(right_ref[mine].mean()) if n else None,
                          "export_accuracy": float(right_out[mine].mean()) if n else None})
    return {"agreement": float(np.mean(p_ref.argmax(1) == p_out.argmax(1))),
            "saved_model_accuracy": float(right_ref.mean()), "export_accuracy": float(right_out.mean()),
            "max_abs_diff": float(np.max(np.abs(p_ref - p_out))), "per_class": per_class}


def label_compare(p_ref: np.ndarray, p_out: np.ndarray, b: bundles.Bundle) -> dict:
    """``compare`` of a multi-label bundle, whose rows need not sum to 1 and whose splits.json
    records one label a photo: each label is decided at its threshold, and the SavedModel's
    decisions are the reference. ``agreement``: the share of images given the same label set;
    the accuracies: the share of (image, label) decisions equal to the SavedModel's (its own:
    1), overall and per label, so the accuracy gate bounds the decisions the export changes."""
    cuts = np.asarray(b.meta.thresholds, np.float32)[None, :]
    same = (p_ref >= cuts) == (p_out >= cuts)
    per_class = [{"label": label, "images": len(same), "saved_model_accuracy": 1.0,
                  "export_accuracy": float(same[:, j].mean())} for j, label in enumerate(b.labels)]
    return {"agreement": float(same.all(axis=1).mean()), "saved_model_accuracy": 1.0,
            "export_accuracy": float(same.mean()), "max_abs_diff": float(np.max(np.abs(p_ref - p_out))),
            "per_class": per_class}


def ms_per_image(engine, image: np.ndarray) -> float:
    """The median wall time of one batch-1 call of ``engine`` on ``image`` [1, S, S, 3], in ms,
    after two warm-up calls."""
    for _ in range(2):
        engine(image)
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        engine(image)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def check_float(result, out: Path) -> None:
    """Refuse (``TlcliError``) an unquantized export whose probabilities differ from the
    SavedModel's by more than ``FLOAT_TOLERANCE``; ``out`` has not been written then."""
    if result.quantize == "none" and result.max_abs_diff is not None and result.max_abs_diff > FLOAT_TOLERANCE:
        raise TlcliError(f"--format {result.format}: the float model's probabilities differ from the SavedModel's "
                         f"by up to {result.max_abs_diff:.2g} on {result.parity_images} {result.parity_data} (more "
                         f"than {FLOAT_TOLERANCE:g}); {out} was not written (any previous one is kept); use "
                         "another --format, and report this with the versions of tlcli and the converter")


def check_drop(result, out: Path) -> None:
    """Refuse (``TlcliError``, exit 1) a model whose accuracy is more than ``max_accuracy_drop``
    points below the SavedModel's; ``out`` has not been written then."""
    drop = 100 * (result.saved_model_accuracy - result.export_accuracy)
    result.accuracy_drop = drop
    if drop > result.max_accuracy_drop + 1e-9:
        raise TlcliError(f"--max-accuracy-drop {result.max_accuracy_drop:g}: the {result.quantize} {result.format} "
                         f"model scores {100 * result.export_accuracy:.1f}% on {result.parity_images} "
                         f"{result.parity_data}, {drop:.1f} points below the SavedModel's "
                         f"{100 * result.saved_model_accuracy:.1f}%; {out} was not written (any previous one is "
                         "kept); allow a larger drop or choose another --quantize")
