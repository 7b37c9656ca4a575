"""`tlcli audit` on hymenoptera with injected defects: recall, precision and time per kind.

A copy of hymenoptera (train -> DIR, val -> --val-dir) in a temporary folder, never ../shared
itself. The clean copy is audited first (its suspects are listed, to be looked at); then N
training images get a copy in val, resized and/or recompressed (other settings than the audit's
own calibration copies), N other training images move to the other class folder (a flipped
label), and five junk files (placeholders, noise) join the training classes. Targets: at least
90% of the injected copies found in a group of kind train_val_leak, at least 80% of the flips
among the top 2N likely mislabels. Baselines of the same run: content digests (the check train
had before) for the copies, a random ranking for the flips (2N / train images expected).

Then the near-duplicate search alone on 100,000 synthetic 1,280-d vectors (with planted
near-copies), against the physical limit of the same run: the bare blocked matrix products.

    python -m bench.audit [--n 20] [--vectors 100000] [--skip-real]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402

# Copies as they reach a dataset twice: (name, scale, JPEG quality or None for PNG).
COPIES = [("resized 60%, JPEG 80", 0.6, 80), ("resized 125%, JPEG 90", 1.25, 90),
          ("re-encoded JPEG 60", 1.0, 60), ("resized 80%, PNG", 0.8, None)]


def junk(path: Path, i: int) -> Path:
    """Five kinds of file that are no photo of the class: placeholders, noise, a test pattern."""
    if i % 5 == 0:
        img = Image.new("RGB", (300, 300), (235, 235, 235))
        ImageDraw.Draw(img).text((70, 140), "image not available", fill=(90, 90, 90))
    elif i % 5 == 1:
        img = Image.new("RGB", (320, 240), (255, 255, 255))
    elif i % 5 == 2:
        img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    elif i % 5 == 3:
        a = ((np.indices((240, 320)).sum(0) // 20) % 2 * 255).astype(np.uint8)
        img = Image.fromarray(np.stack([a] * 3, -1))
    else:
        img = Image.new("RGB", (320, 240), (0, 0, 0))
    img.save(path)
    return path


def inject(root: Path, n: int, seed: int = 0) -> dict:
    """Defects in ``root/train`` and ``root/val``; returns what they are."""
    rng = random.Random(seed)
    train = sorted((root / "train").glob("*/*"))
    picked = rng.sample(train, 2 * n)
    copies = []
    for k, src in enumerate(picked[:n]):
        _, scale, quality = COPIES[k % len(COPIES)]
        img = Image.open(src).convert("RGB")
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
        dst = root / "val" / src.parent.name / f"copy{k:02d}_{src.stem}{'.jpg' if quality else '.png'}"
        img.save(dst, **({"quality": quality} if quality else {}))
        copies.append((str(src), str(dst)))
    flips = []
    for src in picked[n:]:
        other = "bees" if src.parent.name == "ants" else "ants"
        dst = root / "train" / other / src.name
        shutil.move(src, dst)
        flips.append(str(dst))
    junk_files = [str(junk(root / "train" / ("ants", "bees")[i % 2] / f"junk{i}.png", i)) for i in range(5)]
    return {"copies": copies, "flips": flips, "junk": junk_files}


def run_audit(root: Path, cache: Path):
    from tlcli.insight.audit import audit

    start = time.perf_counter()
    r = audit(root / "train", val_dir=root / "val", backbone=str(MOBILENET_V2), image_size=224, cache_dir=cache)
    return r, time.perf_counter() - start


def time_kinds(root: Path, cache: Path) -> dict:
    """Seconds of each kind's step on cached features (the scan and backbone load excluded)."""
    from tlcli.config import TrainConfig
    from tlcli.insight import audit
    from tlcli.insight import findings as A
    from tlcli.model.backbone import resolve_spec

    cfg = TrainConfig(data_dir=str(root / "train"), val_dir=str(root / "val"), backbone=str(MOBILENET_V2),
                      image_size=224, cache_dir=str(cache))
    spec = resolve_spec(cfg.backbone, 224)
    views, splits, extractor, size, _ = audit.dataset_features(cfg, spec, spec.handle)
    X, n = views.plain, len(splits.train)
    y = np.array([s.label for s in splits.train + splits.val])
    centre = X[:n].mean(axis=0)
    out = {}
    t = time.perf_counter()
    copies = A.copy_similarities(splits.train, X[:n], extractor=extractor, image_size=size, centre=centre,
                                 max_pixels=cfg.max_pixels, cache=None)
    thr = A.duplicate_threshold(X[:n] - centre, [s.digest for s in splits.train], copies)
    out["calibration (uncached copies)"] = time.perf_counter() - t
    t = time.perf_counter()
    A.find_duplicates(splits.train + splits.val, ["train"] * n + ["val"] * len(splits.val), X - centre,
                      splits.labels, thr["near_duplicate"])
    out["near-duplicate search"] = time.perf_counter() - t
    t = time.perf_counter()
    A.confident_learning(A.out_of_fold(X[:n], y[:n], len(splits.labels)), y[:n])
    out["likely mislabels (out-of-fold fits)"] = time.perf_counter() - t
    t = time.perf_counter()
    A.centre_similarity(X, y, np.arange(len(y)) < n, len(splits.labels))
    out["outliers"] = time.perf_counter() - t
    return out


def show_suspects(r, root: Path) -> None:
    def rel(p):
        return str(Path(p).relative_to(root))

    print(f"  near-duplicate groups: {len(r.near_duplicates)}")
    for g in r.near_duplicates:
        print(f"    {g.kind} {g.similarity:.3f}: " + ", ".join(rel(p) for p in g.paths))
    print(f"  likely mislabels: {len(r.likely_mislabeled)}")
    for m in r.likely_mislabeled:
        print(f"    {rel(m.path)} ({m.label} -> {m.suggested_label}, score {m.score:.3f})")
    print(f"  outliers: {len(r.outliers)}")
    for o in r.outliers:
        print(f"    {rel(o.path)} ({o.label}, score {o.score:.3f})")


def real(n: int) -> None:
    require(HYMENOPTERA, MOBILENET_V2)
    with tempfile.TemporaryDirectory(prefix="tlcli-bench-audit-") as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        shutil.copytree(HYMENOPTERA, root)
        clean, seconds = run_audit(root, cache)
        print(f"clean hymenoptera ({sum(clean.class_counts['train'].values())} train, "
              f"{sum(clean.class_counts['val'].values())} val), cold cache: {seconds:.1f} s; suspects:")
        show_suspects(clean, root)
        print(f"  thresholds: { {k: round(v, 4) for k, v in clean.thresholds.items() if isinstance(v, float)} }")
        truth = inject(root, n)
        r, seconds = run_audit(root, cache)
        print(f"\ninjected: {n} copies across the split ({', '.join(c[0] for c in COPIES)}), {n} flipped labels, "
              f"5 junk files; audit {seconds:.1f} s ({r.extracted} extracted, {r.cached} cached)")
        leaks = [set(g.paths) for g in r.near_duplicates if g.kind == "train_val_leak"]
        found = sum(any({a, b} <= g for g in leaks) for a, b in truth["copies"])
        true_groups = sum(any({a, b} <= g for a, b in truth["copies"]) for g in leaks)
        digests = sum(Path(a).read_bytes() == Path(b).read_bytes() for a, b in truth["copies"])
        print(f"  near-duplicates: recall {found}/{n} = {found / n:.0%} as train_val_leak (target >= 90%), "
              f"precision {true_groups}/{len(leaks)} leak groups; baseline, same content digest: {digests}/{n}")
        ranked = [m.path for m in r.likely_mislabeled]
        top = sum(p in ranked[:2 * n] for p in truth["flips"])
        flagged = sum(p in ranked for p in truth["flips"])
        n_train = sum(r.class_counts["train"].values())
        print(f"  flipped labels: {top}/{n} = {top / n:.0%} in the top {2 * n} (target >= 80%); flagged "
              f"{flagged}/{n}, precision {flagged}/{len(ranked)}; baseline, a random ranking: "
              f"{2 * n / n_train:.0%} expected")
        out = [o.path for o in r.outliers]
        hit = sum(p in out for p in truth["junk"])
        print(f"  junk files: {hit}/5 flagged as outliers, precision {hit}/{len(out)}")
        for kind, s in time_kinds(root, cache).items():
            print(f"  time, {kind}: {s:.2f} s")


def synthetic(n: int, d: int = 1280) -> None:
    from tlcli.insight import neighbours

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(n, d))).astype(np.float32)  # non-negative, like pooled ReLU features
    planted = rng.choice(n, 200, replace=False)
    X[planted[100:]] = X[planted[:100]] + rng.normal(0, 0.05, (100, d)).astype(np.float32)
    X -= X.mean(axis=0)
    start = time.perf_counter()
    groups = neighbours.groups(n, neighbours.pairs_above(X, 0.9))
    search = time.perf_counter() - start
    U = neighbours.normalise(X)
    b = neighbours.BLOCK_ROWS
    starts = range(0, n, b)[::max(1, len(range(0, n, b)) // 8)]  # the limit from about 8 blocks, scaled up
    start = time.perf_counter()
    for i in starts:
        U[i:i + b] @ U[i:].T
    floor = (time.perf_counter() - start) * len(range(0, n, b)) / len(starts)
    pairs = {tuple(sorted(g)) for g in groups}
    hit = sum(tuple(sorted((int(a), int(b)))) in pairs for a, b in zip(planted[:100], planted[100:]))
    print(f"\nnear-duplicate search, {n:,} x {d} float32: {search:.1f} s ({search / 60:.2f} min), "
          f"{hit}/100 planted pairs grouped, {len(groups)} groups; limit, the bare block products: {floor:.1f} s "
          f"({n * n * d / floor / 1e9:.0f} GFLOP/s on the upper triangle); ratio {search / floor:.2f}; "
          f"memory one block {neighbours.BLOCK_ROWS * n * 4 / 1e9:.1f} GB "
          f"(a full n x n matrix: {n * n * 4 / 1e9:.0f} GB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    if not args.skip_real:
        real(args.n)
    synthetic(args.vectors)


if __name__ == "__main__":
    main()
