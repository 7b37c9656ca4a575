"""Confidence you can trust, measured: the expected calibration error (ECE, 10 bins), Brier score
and negative log-likelihood of a head-only model on its validation images, before and after the
temperature that training folds into the head (model.calibration), in one run; then the
likely-mislabel finder on a clean set and with 5% of the labels flipped, old rule, new rule and
cleanlab on the same out-of-fold probabilities (bench/mislabels.py, whose docstring says how).

The temperature is chosen from the training images alone (the head's out-of-fold predictions);
the validation images only measure it. "Before" is computed exactly from the same bundle: its
probabilities are softmax(z / T), so softmax(log p * T) gives the head's own, uncalibrated ones.

    python bench/confidence.py [--data hymenoptera] [--backbone PATH] [--mislabel-seeds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import mislabels  # noqa: E402
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402


def _scores(probs: np.ndarray, y: np.ndarray) -> dict:
    from tlcli import metrics

    rows = np.arange(len(y))
    return {"ece": metrics.expected_calibration_error(probs, y),
            "brier": float(((probs - np.eye(probs.shape[1])[y]) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(np.clip(probs[rows, y], 1e-12, 1.0)).mean()),
            "mean top probability": float(probs.max(axis=1).mean()),
            "accuracy": float((probs.argmax(axis=1) == y).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HYMENOPTERA, help="a folder with train/ and val/ class folders")
    ap.add_argument("--backbone", type=Path, default=MOBILENET_V2)
    ap.add_argument("--mislabel-seeds", type=int, default=5, help="flipped draws for the mislabel finder (0: none)")
    args = ap.parse_args()
    require(args.data / "train", args.data / "val", args.backbone)
    import tlcli
    from tlcli import bundle
    from tlcli.model import calibration

    with tempfile.TemporaryDirectory(prefix="tlcli-bench-") as tmp:
        start = time.perf_counter()
        r = tlcli.train(args.data / "train", val_dir=str(args.data / "val"), out=f"{tmp}/model",
                        backbone=str(args.backbone), image_size=224, cache_dir=f"{tmp}/cache", tensorboard=None)
        seconds = time.perf_counter() - start
        b = bundle.load(f"{tmp}/model")
        preds = tlcli.predict([args.data / "val"], model_dir=f"{tmp}/model", engine="tf", top_k=len(b.labels))
        index = {label: i for i, label in enumerate(b.labels)}
        after = np.array([[dict((q["label"], q["probability"]) for q in p.predictions)[label] for label in b.labels]
                          for p in preds])
        y = np.array([index[Path(p.path).parent.name] for p in preds])
    t = r.calibration["temperature"]
    before = calibration.scaled(after, 1.0 / t)
    print(f"{args.data.name}: {len(y)} validation images, head-only training {seconds:.1f} s; temperature {t:.3f} "
          f"from {r.calibration['images']} out-of-fold training images "
          f"(their ECE {r.calibration['oof_ece_before']:.4f} -> {r.calibration['oof_ece_after']:.4f})")
    b_scores, a_scores = _scores(before, y), _scores(after, y)
    print(f"{'validation':24s} {'before':>9s} {'after':>9s} {'after/before':>13s}")
    for name in b_scores:
        ratio = a_scores[name] / b_scores[name] if b_scores[name] else float("nan")
        print(f"{name:24s} {b_scores[name]:9.4f} {a_scores[name]:9.4f} {ratio:13.2f}")
    print("physical limit: ECE 0 (a perfectly calibrated model); accuracy is unchanged by construction")
    if args.mislabel_seeds:
        print()
        mislabels.measure(args.data, args.backbone, seeds=args.mislabel_seeds)


if __name__ == "__main__":
    main()
