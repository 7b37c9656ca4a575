"""The likely-mislabel finder of `tlcli audit`, measured: how many photos it flags on a clean
training set, and with a share of the labels flipped on purpose (a deterministic draw), how many
flips it flags (recall), how many of its flags are flips (precision) and how many flips rank in
its top results. The photos are linked, never copied or changed; the feature cache is shared,
so only the first audit extracts.

    python bench/mislabels.py [--data hymenoptera] [--flip 0.05] [--backbone PATH]

Targets (issue #25): a clean set flags at most 2.5% of its photos; with 5% flipped, most flips
rank in the top results and at least half of what is flagged are flips.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402


def _linked(src: Path, dst: Path, flip: float, seed: int = 0) -> set[str]:
    """``dst/<class>/`` holding symlinks to ``src``'s photos, a ``flip`` share of them under
    another class; the names (in ``dst``) of the flipped ones."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    photos = [(c, f) for c in classes for f in sorted((src / c).iterdir()) if f.is_file()]
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(photos)), round(flip * len(photos)))) if flip else set()
    names = set()
    for i, (c, f) in enumerate(photos):
        label = rng.choice([o for o in classes if o != c]) if i in flipped else c
        (dst / label).mkdir(parents=True, exist_ok=True)
        (dst / label / f.name).symlink_to(f)
        if i in flipped:
            names.add(str(dst / label / f.name))
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HYMENOPTERA, help="a folder with train/ class folders")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--backbone", type=Path, default=MOBILENET_V2)
    args = ap.parse_args()
    require(args.data / "train", args.backbone)
    import tlcli

    with tempfile.TemporaryDirectory(prefix="tlcli-bench-") as tmp:
        tmp = Path(tmp)
        options = dict(backbone=str(args.backbone), image_size=224, cache_dir=tmp / "cache", val_split=0.0)
        for name, flip in (("clean", 0.0), (f"{args.flip:.0%} flipped", args.flip)):
            flips = _linked(args.data / "train", tmp / name.replace(" ", "-").replace("%", ""), flip)
            r = tlcli.audit(tmp / name.replace(" ", "-").replace("%", ""), **options)
            n = sum(r.class_counts["train"].values())
            flagged = [m.path for m in r.likely_mislabeled]  # ranked by evidence, strongest first
            hits = sum(p in flips for p in flagged)
            line = f"{name}: {n} photos, {len(flagged)} flagged ({len(flagged) / n:.1%} of them)"
            if flips:
                top = sum(p in flips for p in flagged[:len(flips)])
                line += (f"; {len(flips)} flips: recall {hits / len(flips):.2f}, precision "
                         f"{hits / len(flagged) if flagged else float('nan'):.2f}, {top} in the top {len(flips)}")
            print(line)
    print("targets: clean <= 2.5% flagged; flipped: most flips in the top results, precision >= 0.5")


if __name__ == "__main__":
    main()
