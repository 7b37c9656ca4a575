"""The likely-mislabel finder, measured: how many photos it flags on a clean set, and with 5% of
the labels flipped on purpose (several deterministic draws), its precision (the share of its
flags that are flips), its recall, and how many flips rank in its top results (the first as
many as there are flips), for three rules on the same out-of-fold probabilities in one run:

- old:      confident learning alone (prune by noise rate, the rule before issue #25; it flags
            exactly what cleanlab flags on the same probabilities);
- cleanlab: cleanlab.filter.find_label_issues (if installed);
- new:      tlcli's finder (tlcli/insight/label_noise.py): confident learning's candidates kept
            only where a fit of the labels makes them more likely wrong than right.

The photos are train/ and val/ of --data pooled, features of --backbone extracted once; each
rule sees the out-of-fold probabilities of findings.out_of_fold, as `tlcli audit` does. With
--audit, one end-to-end `tlcli audit` of the clean set and of the first flipped draw too
(photos linked, never copied or changed).

    python bench/mislabels.py [--data hymenoptera] [--flip 0.05] [--seeds 5] [--backbone PATH] [--audit]

Targets (issue #25): a clean set flags at most 2.5% of its photos; with 5% flipped, most flips
rank in the top results and at least half of what is flagged are flips.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402

SIZE = 224


def features(data: Path, backbone_path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    """(features [n, d], labels [n], class names, files) of data/{train,val}/<class>/*."""
    from tlcli.data import images
    from tlcli.model import backbone
    from tlcli.model import classifier as model

    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    files, y, arrays = [], [], []
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for f in sorted((data / split / name).iterdir()) if (data / split / name).is_dir() else []:
                try:
                    arrays.append(images.load_for_model(str(f), SIZE))
                except images.ImageError:
                    continue  # junk the scan skips too
                files.append(f)
                y.append(c)
    loaded = backbone.load(backbone.resolve_spec(str(backbone_path), SIZE))
    X = model.build_extractor(loaded.layer, SIZE).predict(np.stack(arrays), batch_size=32, verbose=0)
    return np.asarray(X, np.float64), np.array(y), classes, files


def flipped(y: np.ndarray, k: int, share: float, seed: int) -> tuple[np.ndarray, set[int]]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), round(share * len(y)), replace=False)
    out = y.copy()
    out[rows] = (y[rows] + rng.integers(1, k, len(rows))) % k
    return out, set(rows.tolist())


def rules(probs: np.ndarray, y: np.ndarray) -> dict[str, tuple[list[int], list[int]]]:
    """{rule: (flagged rows, ranked rows[, the LabelNoise])} for old, cleanlab (if installed), new."""
    from tlcli.insight import label_noise

    _, joint = label_noise.confident_joint(probs, y)
    own = probs[np.arange(len(y)), y]
    old = sorted(label_noise.prune_by_noise_rate(probs, y, joint), key=lambda r: (own[r], r))
    out = {"old": (old, old)}
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        pass
    else:
        ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence").tolist()
        out["cleanlab"] = (ranked, ranked)
    found = label_noise.find(probs, y)
    out["new"] = ([f[0] for f in found.flagged], found.candidates, found)
    return out


def measure(data: Path, backbone_path: Path, *, share: float = 0.05, seeds: int = 5) -> None:
    """Print the table of the module docstring."""
    from tlcli.insight import findings

    X, y, classes, _ = features(data, backbone_path)
    k, n = len(classes), len(y)
    print(f"{data.name} (train + val pooled): {n} photos, {k} classes; backbone {backbone_path.name}; "
          f"{share:.0%} flipped in each of {seeds} draws")
    totals: dict[str, list[int]] = {}
    for seed in [None, *range(seeds)]:
        labels, flips = (y, set()) if seed is None else flipped(y, k, share, seed)
        probs = findings.out_of_fold(X, labels, k, seed=0)
        accuracy = (probs.argmax(axis=1) == labels).mean()
        line = f"{'clean' if seed is None else f'draw {seed}':8s} oof acc {accuracy:.3f}"
        for name, (flagged, ranked, *found) in rules(probs, labels).items():
            hits = len(set(flagged) & flips)
            top = len(set(ranked[:len(flips)]) & flips)
            if seed is None:
                line += f" | {name} {len(flagged)} ({len(flagged) / n:.1%})"
            else:
                t = totals.setdefault(name, [0, 0, 0, 0])
                t[0], t[1], t[2], t[3] = t[0] + len(flagged), t[1] + hits, t[2] + len(flips), t[3] + top
                line += f" | {name} {hits}/{len(flagged)} top {top}/{len(flips)}"
            if found:
                line += f" (expect {found[0].expected_false_alarms:.1f} false, strong {found[0].strong})"
        print(line, flush=True)
    print("over the draws: precision = flips flagged / flagged, recall = flips flagged / flips, "
          "top = flips among the first len(flips) ranked")
    for name, (flagged, hits, flips, top) in totals.items():
        precision = hits / flagged if flagged else float("nan")
        print(f"  {name:9s} flagged {flagged:4d}  precision {precision:.2f}  recall {hits / flips:.2f}  "
              f"top {top / flips:.2f}")
    if "cleanlab" in totals and totals["cleanlab"][0] and totals["new"][0]:
        p_new = totals["new"][1] / totals["new"][0]
        p_cl = totals["cleanlab"][1] / totals["cleanlab"][0]
        print(f"  new / cleanlab: precision x{p_new / p_cl:.2f}, recall x"
              f"{totals['new'][1] / max(totals['cleanlab'][1], 1):.2f}")
    print("targets: clean <= 2.5% flagged; flipped: most flips in the top results, precision >= 0.5")


def _linked(src: Path, dst: Path, flip: float, seed: int = 0) -> set[str]:
    """``dst/<class>/`` holding symlinks to ``src``'s photos, a ``flip`` share of them under
    another class; the names (in ``dst``) of the flipped ones."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    photos = [(c, f) for c in classes for f in sorted((src / c).iterdir()) if f.is_file()]
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(photos)), round(flip * len(photos)))) if flip else set()
    names = set()
    for i, (c, f) in enumerate(photos):
        label = rng.choice([o for o in classes if o != c]) if i in chosen else c
        (dst / label).mkdir(parents=True, exist_ok=True)
        (dst / label / f.name).symlink_to(f)
        if i in chosen:
            names.add(str(dst / label / f.name))
    return names


def audit_end_to_end(data: Path, backbone_path: Path, share: float) -> None:
    """`tlcli audit` of data/train, clean and with ``share`` flipped: what a user would see."""
    import tlcli

    with tempfile.TemporaryDirectory(prefix="tlcli-bench-") as tmp:
        tmp = Path(tmp)
        options = dict(backbone=str(backbone_path), image_size=SIZE, cache_dir=tmp / "cache", val_split=0.0)
        for name, flip in (("clean", 0.0), (f"{share:.0%}-flipped", share)):
            flips = _linked(data / "train", tmp / name.replace("%", ""), flip)
            r = tlcli.audit(tmp / name.replace("%", ""), **options)
            n = sum(r.class_counts["train"].values())
            flagged = [m.path for m in r.likely_mislabeled]
            hits = sum(p in flips for p in flagged)
            line = (f"tlcli audit {name} train/: {n} photos, {len(flagged)} flagged ({len(flagged) / n:.1%}), "
                    f"expected false alarms {r.mislabel_estimate.get('expected_false_alarms')}")
            if flips:
                line += f"; {len(flips)} flips: {hits} flagged"
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HYMENOPTERA, help="a folder with train/ (and val/) class folders")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--backbone", type=Path, default=MOBILENET_V2)
    ap.add_argument("--audit", action="store_true", help="also run tlcli audit end to end")
    args = ap.parse_args()
    require(args.data / "train", args.backbone)
    measure(args.data, args.backbone, share=args.flip, seeds=args.seeds)
    if args.audit:
        audit_end_to_end(args.data, args.backbone, args.flip)


if __name__ == "__main__":
    main()
