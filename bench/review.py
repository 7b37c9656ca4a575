"""The audit -> review -> ``--labels-override`` round trip on hymenoptera with 20 planted flips.

A copy of hymenoptera (DIR with train/ and val/, as split folders) in a temporary folder, never
../shared itself, with N training photos moved to the other class folder (flipped labels). Then,
with the real mobilenet_v2 (../shared/models' SavedModel, the default preset's network and weights:
../shared/tfhub_cache holds stand-in files naming that folder, which TF Hub does not follow):

1. ``train`` on the flipped data (extracts every feature; the run a user already has);
2. ``audit --report R`` (cached features) writes R/review.csv;
3. a reviewer who can tell ants from bees fills in the actions: ``relabel`` for each suggestion
   that names a planted photo's true class, ``keep`` for every other row (real photos of
   hymenoptera it doubts are left alone: the bench knows only the planted truth);
4. ``train --labels-override review.csv``: timed in-process (TensorFlow loaded, train's own
   clock, with its steps: the file check, the head's cross-validation and fit, the save) and as a
   fresh ``tlcli`` process (the TensorFlow import included; its CPU seconds too, which a busy
   machine does not inflate as it does the wall clock); baseline in the same run: the same
   ``train`` without the override on the same cached features.

Target: the accepted flips fixed in the refit bundle (its splits.json), a refit under 10 s on
cached features, and no file of the data changed (SHA-256 of every file before and after).

    nice -n 10 python -m bench.review [--n 20]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, REPO, require  # noqa: E402


def plant(root: Path, n: int, seed: int = 0) -> dict[str, str]:
    """Move ``n`` training photos (half of each class) to the other class folder; {new path: true class}."""
    rng = random.Random(seed)
    flips = {}
    for cls, other in (("ants", "bees"), ("bees", "ants")):
        photos = sorted((root / "train" / cls).iterdir())
        for src in rng.sample(photos, n // 2 if cls == "ants" else n - n // 2):
            dst = root / "train" / other / src.name
            assert not dst.exists(), dst
            shutil.move(src, dst)
            flips[str(dst)] = cls
    return flips


def digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def review(report: Path, flips: dict[str, str], out: Path) -> tuple[int, int, int]:
    """Fill in report/review.csv's actions as the reviewer would; (rows, suggestions, accepted)."""
    with open(report / "review.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    accepted = 0
    for r in rows:
        right = r["suggested_label"] and flips.get(r["path"]) == r["suggested_label"]
        r["action"] = "relabel" if right else "keep"
        accepted += bool(right)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    return len(rows), sum(bool(r["suggested_label"]) for r in rows), accepted


class Steps:
    """A progress callback that keeps when each task started and ended: {task: seconds}."""

    def __init__(self):
        self.started, self.seconds = {}, {}

    def __call__(self, event) -> None:
        if event.kind == "start":
            self.started[event.task] = time.perf_counter()
        elif event.kind == "end" and event.task in self.started:
            self.seconds[event.task] = time.perf_counter() - self.started[event.task]

    def shown(self) -> str:
        return ", ".join(f"{task} {s:.1f} s" for task, s in self.seconds.items())


def cli_train(root: Path, review_csv: Path, out: Path, cache: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, --json result) of ``tlcli train --labels-override`` as a new process."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tlcli.cli", "train", str(root), "--labels-override", str(review_csv),
                           "--out", str(out), "--backbone", str(MOBILENET_V2), "--image-size", "224",
                           "--cache-dir", str(cache), "--tensorboard", "none", "--json"],
                          capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"tlcli train failed: {done.stderr.strip()}")
    return seconds, used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    require(HYMENOPTERA, MOBILENET_V2)
    import tlcli
    from tlcli import bundle

    with tempfile.TemporaryDirectory(prefix="tlcli-bench-review-") as tmp:
        tmp = Path(tmp)
        root, cache, report = tmp / "photos", tmp / "cache", tmp / "report"
        shutil.copytree(HYMENOPTERA, root)
        flips = plant(root, args.n)
        before = digests(root)
        print(f"hymenoptera copy: {args.n} training photos moved to the other class folder (planted flips)")
        common = dict(backbone=str(MOBILENET_V2), image_size=224, cache_dir=str(cache), tensorboard=None)

        t = time.perf_counter()
        first = tlcli.train(root, out=str(tmp / "flipped"), **common)
        print(f"1. train on the flipped labels: {time.perf_counter() - t:.1f} s ({first.extracted} extracted); "
              f"val accuracy {first.val_accuracy:.4f}")
        t = time.perf_counter()
        audited = tlcli.audit(root, backbone=str(MOBILENET_V2), image_size=224, cache_dir=cache, report_dir=report)
        flagged = {m.path: m.suggested_label for m in audited.likely_mislabeled}
        right = sum(flagged.get(p) == true for p, true in flips.items())
        print(f"2. audit --report: {time.perf_counter() - t:.1f} s ({audited.extracted} extracted); "
              f"{len(flagged)} likely mislabels, {right} of the {args.n} flips among them with the true label")
        rows, suggested, accepted = review(report, flips, tmp / "review.csv")
        print(f"3. review.csv: {rows} rows, {suggested} suggestions; the reviewer relabels {accepted}, keeps the rest")

        baseline = tlcli.train(root, out=str(tmp / "baseline"), **common)
        steps = Steps()
        refit = tlcli.train(root, out=str(tmp / "fixed"), labels_override=str(tmp / "review.csv"), progress=steps,
                            **common)
        cli_seconds, cli_cpu, cli = cli_train(root, tmp / "review.csv", tmp / "fixed-cli", cache)
        b = bundle.load(tmp / "fixed")
        recorded = {p: b.labels[i] for p, i in b.splits()["train"]}
        fixed = sum(recorded.get(p) == true for p, true in flips.items())
        print(f"4. train --labels-override: {refit.seconds:.1f} s in-process ({refit.extracted} extracted; steps: "
              f"{steps.shown()}), {cli_seconds:.1f} s as a new tlcli process ({cli_cpu:.1f} CPU s; "
              f"{cli['extracted']} extracted, TensorFlow import included); baseline, the same train without the "
              f"override on the same cached features: {baseline.seconds:.1f} s in-process; ratio "
              f"{refit.seconds / baseline.seconds:.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              "CPUs")
        print(f"   labels_override recorded: {json.dumps(b.meta.labels_override)}")
        print(f"   flips fixed in the refit bundle: {fixed} of the {accepted} accepted ({fixed} of {args.n} planted); "
              f"val accuracy {first.val_accuracy:.4f} flipped -> {refit.val_accuracy:.4f} overridden")
        after = digests(root)
        changed = sum(before.get(p) != d for p, d in after.items()) + len(set(before) - set(after))
        print(f"   files of the data changed: {changed} of {len(before)} (SHA-256 before and after every step)")
        ok = fixed == accepted and changed == 0 and refit.seconds < 10 and refit.extracted == 0
        print(f"target (accepted flips fixed, refit < 10 s on cached features, no file changed): "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
