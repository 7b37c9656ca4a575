"""Multi-label: tlcli's sigmoid head with cross-validated thresholds against one scikit-learn
logistic regression per label on the same features, in the same run.

    nice -n 10 .venv/bin/python bench/multilabel.py [--digits 4] [--layout side|grid]

The set is built from two public single-label sets found offline: the hymenoptera photos
(ants, bees: ../shared/data/hymenoptera_data) and scikit-learn's bundled handwritten digits
(UCI's optical digits, 8x8 grey, scaled up). Each image tiles a hymenoptera photo and a digit
(labels: both), in a random order: side by side (--layout side) or in two random cells of a 2 x 2
grid (--layout grid); one tile in five has no digit (one label). Training tiles use the
hymenoptera train/ photos and the first half of the digits, held-out tiles the val/ photos and
the other half: no photo is in both. With --digits 0 the second part is another hymenoptera
photo of the same split (labels: ants, bees or both): photos only.

tlcli: `tlcli train train.csv` (path,labels: multi-label) with mobilenet_v2
(../shared/models/mobilenet_v2_100_224_feature_vector, the TF Hub model) and --val-split 0,
then `tlcli evaluate test.csv` at the bundle's thresholds. Baseline: the same frozen
mobilenet_v2 features (TensorFlow, the same decoder), ``LogisticRegression()`` per label
(scikit-learn's defaults: C=1, L2), predicting a label at probability >= 0.5. Both are scored by
``tlcli.multilabel_metrics`` (micro-F1 and mean average precision) on the held-out tiles.
Prints both, the ratios, and the issue's targets as MET / NOT MET.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402

SIZE = 224  # the model input's side


def _square(image, side: int):
    from PIL import Image

    return image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)


def _digit(pixels: np.ndarray, side: int):
    from PIL import Image

    grey = (255 - pixels / 16.0 * 255).astype(np.uint8)  # dark strokes on white, as ink on paper
    return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB").resize((side, side), Image.Resampling.BICUBIC)


def build(folder: Path, photos: list[tuple[Path, str]], digits, rng, name: str, layout: str) -> Path:
    """Write the tiles of ``photos`` (path, label) and ``digits`` (images, labels) under
    ``folder`` and their labels CSV (path,labels); returns the CSV. ``layout``: "side" (two
    224-pixel halves side by side, which the model's resize squeezes to half their width) or
    "grid" (a 224-pixel tile whose 2 x 2 cells of 112 pixels hold the two, in random cells,
    undistorted)."""
    from PIL import Image

    images, targets = digits or (None, None)
    side = SIZE if layout == "side" else SIZE // 2
    rows = ["path,labels"]
    for i, (path, label) in enumerate(photos):
        with Image.open(path) as photo:
            parts = [_square(photo, side)]
        labels = [label]
        if images is None and rng.random() < 0.8:  # --digits 0: another hymenoptera photo
            other, kind = photos[rng.integers(len(photos))]
            with Image.open(other) as photo:
                parts.append(_square(photo, side))
            labels = sorted({label, kind})
        elif images is not None and rng.random() < 0.8:
            j = rng.integers(len(images))
            parts.append(_digit(images[j], side))
            labels.append(f"digit_{targets[j]}")
        if layout == "side":
            parts += [Image.new("RGB", (side, side), (128, 128, 128))] * (2 - len(parts))
            cells = [(0, 0), (side, 0)] if rng.random() < 0.5 else [(side, 0), (0, 0)]
            tile = Image.new("RGB", (2 * side, side))
        else:
            cells = [((c % 2) * side, (c // 2) * side) for c in rng.permutation(4)]
            tile = Image.new("RGB", (2 * side, 2 * side), (128, 128, 128))
        for part, at in zip(parts, cells):
            tile.paste(part, at)
        file = f"{name}_{i:04d}.jpg"
        tile.save(folder / file, quality=92)
        rows.append(f"{file},{';'.join(labels)}")
    csv = folder / f"{name}.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def features(paths: list[str], size: int) -> np.ndarray:
    """The frozen mobilenet_v2 features of ``paths`` through TensorFlow, as tlcli extracts them."""
    from tlcli import data
    from tlcli.model import backbone, classifier

    spec = backbone.resolve_spec(str(MOBILENET_V2), size)
    loaded = backbone.load(spec, trainable=False, path=backbone.fetch(spec))
    extractor = classifier.build_extractor(loaded.layer, size)
    return extractor.predict(data.image_dataset(paths, size, batch_size=32), verbose=0)


def baseline(train_csv: Path, test_csv: Path, labels: list[str], size: int):
    """The ``multilabel_metrics`` report of one LogisticRegression per label on the frozen features."""
    from sklearn.linear_model import LogisticRegression

    from tlcli import multilabel_metrics as mm

    def read(csv):
        rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
        return ([str(csv.parent / r[0]) for r in rows],
                mm.multi_hot([[labels.index(n) for n in r[1].split(";")] for r in rows], len(labels)))

    (train_paths, y_train), (test_paths, y_test) = read(train_csv), read(test_csv)
    x_train, x_test = features(train_paths, size), features(test_paths, size)
    probs = np.stack([LogisticRegression(max_iter=5000).fit(x_train, y_train[:, j]).predict_proba(x_test)[:, 1]
                      for j in range(len(labels))], axis=1)
    return mm.compute(y_test, probs, labels, [0.5] * len(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=int, default=4, help="digit classes used (0 .. N-1); 0: tile two "
                                                               "hymenoptera photos instead (labels ants, bees)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("side", "grid"), default="side", help="how the two are tiled")
    args = parser.parse_args()
    require(HYMENOPTERA, MOBILENET_V2)
    from sklearn.datasets import load_digits

    import tlcli

    rng = np.random.default_rng(args.seed)
    train_digits = test_digits = None
    if args.digits:
        digits = load_digits(n_class=args.digits)
        half = len(digits.images) // 2
        order = rng.permutation(len(digits.images))
        train_digits = (digits.images[order[:half]], digits.target[order[:half]])
        test_digits = (digits.images[order[half:]], digits.target[order[half:]])

    def photos(split):
        return [(p, p.parent.name) for p in sorted((HYMENOPTERA / split).glob("*/*")) if p.is_file()]

    with tempfile.TemporaryDirectory(prefix="tlcli-multilabel-") as tmp:
        tmp = Path(tmp)
        train_csv = build(tmp, photos("train"), train_digits, rng, "train", args.layout)
        test_csv = build(tmp, photos("val"), test_digits, rng, "test", args.layout)
        print(f"{args.layout} tiles: {len(train_csv.read_text().splitlines()) - 1} train, "
              f"{len(test_csv.read_text().splitlines()) - 1} held out")
        start = time.perf_counter()
        result = tlcli.train(train_csv, out=str(tmp / "model"), backbone=str(MOBILENET_V2), image_size=SIZE,
                             val_split=0.0, extractor="tf", tensorboard=None, cache_dir=str(tmp / "cache"))
        seconds = time.perf_counter() - start
        report = tlcli.evaluate(test_csv, model_dir=tmp / "model", engine="tf").report
        meta = tlcli.load_bundle(tmp / "model").meta
        print(f"tlcli: trained in {seconds:.1f} s; thresholds "
              + ", ".join(f"{label} {t:.2f}" for label, t in zip(meta.labels, meta.thresholds)))
        base = baseline(train_csv, test_csv, result.labels, meta.image_size)
        base_f1, base_map = base.micro_f1, base.mean_average_precision
    print(f"{'':24}{'micro-F1':>10}{'mAP':>10}")
    print(f"{'tlcli (CV thresholds)':24}{report.micro_f1:10.4f}{report.mean_average_precision:10.4f}")
    print(f"{'LogisticRegression/label':24}{base_f1:10.4f}{base_map:10.4f}")
    ratios = report.micro_f1 / base_f1, report.mean_average_precision / base_map
    print(f"{'ratio tlcli / baseline':24}{ratios[0]:10.4f}{ratios[1]:10.4f}")
    print(f"subset accuracy {report.accuracy:.4f} (baseline {base.accuracy:.4f}), macro-F1 {report.macro_f1:.4f} "
          f"(baseline {base.macro_f1:.4f})")
    pairs = zip(report.per_label, base.per_label)
    print("average precision per label, tlcli / baseline: "
          + ", ".join(f"{m.label} {m.average_precision:.3f}/{b.average_precision:.3f}" for m, b in pairs))
    met = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    print(f"target micro-F1 >= baseline's: {met(report.micro_f1 >= base_f1)}")
    print(f"target mAP >= 0.93: {met(report.mean_average_precision >= 0.93)}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
