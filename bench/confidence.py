"""Confidence you can trust, measured: the expected calibration error (ECE, 10 bins), Brier score
and negative log-likelihood of a head-only model on its validation images, before and after the
temperature that training folds into the head (model.calibration), in one run; the share of
photos its unknown detector (features.unknown) calls unknown, on its validation images and on photos
of nothing it knows; then the likely-mislabel finder on a clean set and with 5% of the labels
flipped, old rule, new rule and cleanlab on the same out-of-fold probabilities (bench/mislabels.py,
whose docstring says how).

The temperature is chosen from the training images alone (the head's out-of-fold predictions);
the validation images only measure it. "Before" is computed exactly from the same bundle: its
probabilities are softmax(z / T), so softmax(log p * T) gives the head's own, uncalibrated ones.

The unknown threshold is chosen from the training images alone too. The out-of-distribution sets,
chosen before any measurement for being on disk and far from ants and bees: the project's own
synthetic shapes (sample_data/images: checks, stripes, discs) and real photos that ship with pip
packages (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg and
Minduka_Present_Blue_Pack.png), each photo whole and as the nine tiles of a 3 x 3 grid. The
baseline, run on the same predictions: calling a photo unknown when its top probability is below
the cut that calls the same share of the validation images unknown as the detector does (that
cut is tuned on the validation images, in the baseline's favour), and the fixed cut 0.9.

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


def _real_photos(folder: Path) -> Path:
    """The real photos of the module docstring, whole and in 3 x 3 tiles, written into ``folder``."""
    import matplotlib
    import sklearn.datasets
    from PIL import Image

    sources = [Path(sklearn.datasets.__file__).parent / "images" / name for name in ("china.jpg", "flower.jpg")]
    sources += [Path(matplotlib.get_data_path()) / "sample_data" / name
                for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")]
    folder.mkdir(parents=True)
    for src in sources:
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            im.save(folder / f"{src.stem}.png")
            for i in range(3):
                for j in range(3):
                    im.crop((j * w // 3, i * h // 3, (j + 1) * w // 3, (i + 1) * h // 3)).save(
                        folder / f"{src.stem}_{i}{j}.png")
    return folder


def _unknown_section(model: str, r, val: Path, tmp: str) -> None:
    """Print the unknown rates of the bundle ``model`` (trained as ``r``) on ``val`` and the
    out-of-distribution sets, with the max-probability baseline."""
    import tlcli
    from bench._common import REPO

    if r.unknown is None:
        print("unknown: the bundle has no detector")
        return
    u = r.unknown
    sets = [("validation (in-distribution)", val), ("sample_data shapes (synthetic)", REPO / "sample_data" / "images"),
            ("photos from pip packages", _real_photos(Path(tmp) / "photos"))]
    found = {}
    for name, folder in sets:
        preds = [p for p in tlcli.predict([folder], model_dir=model, engine="tf", top_k=1) if p.error is None]
        found[name] = (np.array([p.unknown for p in preds]), np.array([p.predictions[0]["probability"] for p in preds]))
    flagged, top = found[sets[0][0]]
    cut = np.quantile(top, flagged.mean()) if flagged.any() else top.min()  # same share of val below it
    print(f"\nunknown: threshold {u['threshold']:.3f} from {u['images']} out-of-fold training images "
          f"(target {100 * u['target_rate']:.1f}%, out-of-fold {100 * u['oof_rate']:.1f}%); baseline cut "
          f"p < {cut:.3f}")
    print(f"{'photos called unknown':32s} {'n':>4s} {'detector':>9s} {'p<cut':>7s} {'p<0.9':>7s} {'det/cut':>8s}")
    for name, (flags, top) in found.items():
        base = float((top < cut).mean())
        ratio = f"{flags.mean() / base:8.2f}" if base else f"{'inf' if flags.any() else '-':>8s}"
        print(f"{name:32s} {len(flags):4d} {100 * flags.mean():8.1f}% {100 * base:6.1f}% "
              f"{100 * (top < 0.9).mean():6.1f}% {ratio}")
    print("targets: <= 5% of the validation photos, >= 80% of photos of an unrelated domain")


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
        _unknown_section(f"{tmp}/model", r, args.data / "val", tmp)
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
