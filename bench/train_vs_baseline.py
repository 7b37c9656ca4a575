"""tlcli's training recipe against a make_image_classifier-recipe baseline, on the same data.

    .venv/bin/python bench/train_vs_baseline.py [--train DIR] [--val DIR] [--backbone PATH]
    .venv/bin/python bench/train_vs_baseline.py --memory [--images 3000] [--memory-fine-tune-epochs N]

Default data: ../shared/data/hymenoptera_data (train -> val) with
../shared/models/mobilenet_v2_100_224_feature_vector. Every system runs as its own fresh Python
process, one after the other, so each wall time includes importing TensorFlow and loading the
backbone, as a user's run does (and none includes TensorFlow's interpreter teardown, which the
tlcli console script skips and the other two processes skip the same way):

* floor: import TF, load the backbone, one forward pass over every train + val image (same
  decoder and tf.data pipeline), nothing else. No system can do less.
* baseline: TF Hub make_image_classifier's recipe as it shipped, rewritten here: its own input
  pipeline (Keras' ImageDataGenerator(rescale=1/255).flow_from_directory, bilinear resize, no
  crop), frozen feature vector, Dropout 0.2, softmax head with L2 1e-4, SGD lr 0.005 momentum
  0.9, label smoothing 0.1, batch 32, 5 epochs of whole batches with validation after each (as
  make_image_classifier_lib.train_model), no augmentation, the backbone run on every image in
  every epoch, then a SavedModel. Its accuracy is then measured on every validation image; that
  scoring pass is left out of its time. The issue's targets are judged against this one.
* baseline rewrite: the same recipe fed by tlcli's faster tf.data decode pipeline instead. It is
  stricter than make_image_classifier ever was; its ratios are printed beside the others.
* tlcli head-only (cold feature cache), a re-run (warm cache), and --fine-tune (cold cache), each
  as `tlcli train DIR --val-dir VAL --force`; then two ablations that show where the accuracy
  comes from: --fine-tune --no-mirror, and head-only --mirror.

Prints one line per system (val accuracy, wall seconds, differences and ratios to both
baselines), the floor with its parts, each process's peak RSS, and each target as MET / NOT MET.

--memory trains tlcli (head-only, cold cache) on N images made by repeating the training images
under other names, and reports its peak RSS; then the same with --fine-tune, capped at
--memory-fine-tune-epochs epochs (default 1: every epoch has the same peak, and one over 3,000
images takes minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, REPO, require  # noqa: E402


def run_process(mode: str, target: str, *args: str) -> tuple[float, str, float]:
    """Run ``python -m target`` (mode "module") or ``python target`` in a fresh interpreter.
    Exits the benchmark if it fails. Returns (wall seconds, stdout, peak RSS in MB of that process)."""
    cmd = [sys.executable, "-m", target] if mode == "module" else [sys.executable, target]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([*cmd, *args], stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"FAILED: {target} {' '.join(args)}\n{stderr[-3000:]}")
    return wall, stdout, usage.ru_maxrss / 1024


# ---- the child processes -------------------------------------------------------------------

def child_floor(args):
    t0 = time.perf_counter()
    from tlcli._tf import hub, keras

    hub()
    t1 = time.perf_counter()
    from tlcli import data

    paths = [str(p) for d in (args.train, args.val) for p in sorted(Path(d).rglob("*")) if p.is_file()]
    layer = hub().KerasLayer(args.backbone, trainable=False)
    inp = keras().Input((args.size, args.size, 3))
    extractor = keras().Model(inp, layer(inp, training=False))
    t2 = time.perf_counter()
    n = len(extractor.predict(data.image_dataset(paths, args.size, batch_size=32), verbose=0))
    t3 = time.perf_counter()
    print(json.dumps({"images": n, "import": t1 - t0, "load": t2 - t1, "pass": t3 - t2}))


def _recipe_model(args, num_classes: int):
    """make_image_classifier's model, compiled as it did: frozen feature vector, Dropout 0.2,
    softmax Dense with L2 1e-4; SGD lr 0.005 momentum 0.9, label smoothing 0.1."""
    from tlcli._tf import hub, keras

    k = keras()
    model = k.Sequential([
        k.layers.InputLayer(input_shape=(args.size, args.size, 3)), hub().KerasLayer(args.backbone, trainable=False),
        k.layers.Dropout(0.2),
        k.layers.Dense(num_classes, activation="softmax", kernel_regularizer=k.regularizers.l2(1e-4))])
    model.compile(optimizer=k.optimizers.SGD(0.005, momentum=0.9),
                  loss=k.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    return model


def child_baseline(args):
    from tlcli import data
    from tlcli._tf import keras, tf

    k, t = keras(), tf()
    k.utils.set_random_seed(0)
    tr = data.scan(args.train, image_size=args.size)
    va = data.scan(args.val, image_size=args.size, labels=tr.labels)
    model = _recipe_model(args, len(tr.labels))
    onehot = lambda x, y: (x, t.one_hot(y, len(tr.labels)))  # noqa: E731
    train = data.image_dataset([s.path for s in tr.samples], args.size, labels=[s.label for s in tr.samples],
                               batch_size=32, shuffle_seed=0).map(onehot).repeat()
    val = data.image_dataset([s.path for s in va.samples], args.size, labels=[s.label for s in va.samples],
                             batch_size=32).map(onehot).repeat()
    # As make_image_classifier_lib.train_model: whole batches only, validation after every epoch.
    model.fit(train, epochs=5, steps_per_epoch=len(tr.samples) // 32, validation_data=val,
              validation_steps=len(va.samples) // 32, verbose=0)
    t.saved_model.save(model, args.out)
    # Accuracy on every validation image; timed separately and left out of the baseline's time.
    start = time.perf_counter()
    probs = model.predict(data.image_dataset([s.path for s in va.samples], args.size, batch_size=32), verbose=0)
    acc = float((probs.argmax(1) == [s.label for s in va.samples]).mean())
    print(json.dumps({"val_accuracy": acc, "scoring_seconds": time.perf_counter() - start}))


def child_baseline_keras(args):
    """The same recipe with make_image_classifier's own input pipeline, as it shipped
    (make_image_classifier_lib._get_data_with_keras): Keras' ImageDataGenerator(rescale=1/255)
    .flow_from_directory(target_size, batch_size=32, interpolation="bilinear"), no crop."""
    from tlcli._tf import keras, tf

    k, t = keras(), tf()
    k.utils.set_random_seed(0)
    gen = k.preprocessing.image.ImageDataGenerator(rescale=1.0 / 255)
    flow = dict(target_size=(args.size, args.size), batch_size=32, interpolation="bilinear")
    train = gen.flow_from_directory(args.train, shuffle=True, seed=0, **flow)
    val = gen.flow_from_directory(args.val, shuffle=False, **flow)
    model = _recipe_model(args, train.num_classes)
    model.fit(train, epochs=5, steps_per_epoch=train.samples // 32, validation_data=val,
              validation_steps=val.samples // 32, verbose=0)
    t.saved_model.save(model, args.out)
    start = time.perf_counter()
    val.reset()
    probs = model.predict(val, verbose=0)
    acc = float((probs.argmax(1) == val.classes).mean())
    print(json.dumps({"val_accuracy": acc, "scoring_seconds": time.perf_counter() - start}))


# ---- the parent ----------------------------------------------------------------------------

def tlcli_train(args, out: Path, cache: Path, *extra: str, data: Path | None = None) -> tuple[float, dict, float]:
    """`tlcli train` in a fresh process, on --train -> --val, or on ``data`` with tlcli's own split.
    Returns (wall seconds, its --json result, peak RSS in MB)."""
    where = [str(data)] if data else [args.train, "--val-dir", args.val]
    wall, stdout, peak = run_process(
        "module", "tlcli.cli", "train", *where, "--backbone", args.backbone, "--image-size", str(args.size),
        "--out", str(out), "--cache-dir", str(cache), "--force", "--json",
        *(["--extractor", args.extractor] if args.extractor else []), *extra)
    return wall, json.loads(stdout), peak


def report(rows, floor_s, head_s, head, finetune, shipped, rewrite):
    """The table, then each target of the issue against the reference baseline, make_image_classifier
    as shipped (its own ImageDataGenerator pipeline), with the ratio to the faster rewrite on
    tlcli's pipeline beside it. ``shipped`` and ``rewrite`` are (accuracy, seconds) or None."""
    ref = shipped or rewrite
    print()
    if ref:
        print("targets are judged against:", "make_image_classifier as shipped" if shipped else
              "the rewrite on tlcli's pipeline (the as-shipped baseline was skipped)")
    print(f"{'system':<62} {'val acc':>8} {'wall s':>7} {'acc - base':>10} {'/ shipped':>9} {'/ rewrite':>9} "
          f"{'peak RSS':>9}")
    ratio = lambda sec, base: f"{sec / base[1]:.2f}x" if base else "-"  # noqa: E731
    for name, acc, sec, rss in rows:
        d_acc = f"{100 * (acc - ref[0]):+.1f} pt" if ref else "-"
        print(f"{name:<62} {acc:8.4f} {sec:7.2f} {d_acc:>10} {ratio(sec, shipped):>9} {ratio(sec, rewrite):>9} "
              f"{rss:>6.0f} MB")
    print()
    verdict = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    print(f"floor / baseline: {ratio(floor_s, shipped)} as shipped, {ratio(floor_s, rewrite)} rewrite")
    print(f"target head-only wall <= 1.3 x floor: {head_s / floor_s:.2f}x: {verdict(head_s <= 1.3 * floor_s)}")
    if not ref:
        return
    print(f"target head-only wall <= 0.35 x baseline: {head_s / ref[1]:.2f}x (rewrite: {ratio(head_s, rewrite)}): "
          f"{verdict(head_s <= 0.35 * ref[1])}")
    print(f"target head-only accuracy >= baseline and >= 0.95: {head['val_accuracy']:.4f} vs {ref[0]:.4f}: "
          f"{verdict(head['val_accuracy'] >= max(ref[0], 0.95))}")
    if finetune is not None:
        acc, sec = finetune
        print(f"target --fine-tune accuracy >= baseline + 1 pt: {100 * (acc - ref[0]):+.1f} pt: "
              f"{verdict(acc >= ref[0] + 0.01 - 1e-9)}")
        print(f"target --fine-tune wall <= 3 x baseline: {sec / ref[1]:.2f}x: {verdict(sec <= 3 * ref[1])}")


def memory(args):
    src = Path(args.train)
    tmp = Path(tempfile.mkdtemp(prefix="tlcli-mem-"))
    try:
        files = {c.name: sorted(p for p in c.iterdir() if p.is_file()) for c in sorted(src.iterdir()) if c.is_dir()}
        per_class = args.images // len(files)
        for name, paths in files.items():
            (tmp / "data" / name).mkdir(parents=True)
            for i in range(per_class):
                p = paths[i % len(paths)]
                shutil.copyfile(p, tmp / "data" / name / f"{i:05d}_{p.name}")
        total = per_class * len(files)
        print(f"memory: {total} images ({per_class} per class) repeated from {src}")
        runs = [("head-only, cold cache", [])]
        if args.memory_fine_tune_epochs:
            runs.append((f"--fine-tune, {args.memory_fine_tune_epochs} epoch(s) at most",
                         ["--fine-tune", "--fine-tune-epochs", str(args.memory_fine_tune_epochs)]))
        for i, (what, extra) in enumerate(runs):
            wall, r, peak = tlcli_train(args, tmp / f"model{i}", tmp / f"cache{i}", *extra, data=tmp / "data")
            print(f"memory: tlcli train ({what}) on {total} images at {args.size}: peak RSS {peak:.0f} MB, "
                  f"wall {wall:.1f} s, {r['extracted']} backbone passes, val accuracy {r['val_accuracy']:.4f}; "
                  f"target <= 2500 MB: {'MET' if peak <= 2500 else 'NOT MET'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=str(HYMENOPTERA / "train"))
    ap.add_argument("--val", default=str(HYMENOPTERA / "val"))
    ap.add_argument("--backbone", default=str(MOBILENET_V2))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--memory", action="store_true", help="only the peak-RSS run on --images images")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--memory-fine-tune-epochs", type=int, default=1, help="0 skips the --fine-tune memory run")
    ap.add_argument("--skip", default="", help="comma list of: baseline, keras, finetune, ablation")
    ap.add_argument("--extractor", choices=["auto", "tf", "litert"],
                    help="tlcli's --extractor (default: tlcli's own; 'tf' compares with checkouts before it existed)")
    ap.add_argument("--child", choices=["floor", "baseline", "baseline-keras"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        # Like the tlcli console script, skip TensorFlow's slow interpreter teardown, so that no
        # system's time includes it.
        {"floor": child_floor, "baseline": child_baseline, "baseline-keras": child_baseline_keras}[args.child](args)
        sys.stdout.flush()
        os._exit(0)
    require(Path(args.train), Path(args.val), Path(args.backbone))
    if args.memory:
        return memory(args)
    skip = set(args.skip.split(","))
    me = str(Path(__file__).resolve())
    common = ["--train", args.train, "--val", args.val, "--backbone", args.backbone, "--size", str(args.size)]
    work = Path(tempfile.mkdtemp(prefix="tlcli-bench-"))
    rows = []
    try:
        floor_s, out, floor_rss = run_process("path", me, "--child", "floor", *common)
        parts = json.loads(out)
        print(f"floor: {floor_s:.2f} s for {parts['images']} images = TF import {parts['import']:.2f} + backbone "
              f"load {parts['load']:.2f} + one forward pass {parts['pass']:.2f} + interpreter start; "
              f"peak RSS {floor_rss:.0f} MB")
        rewrite = shipped = finetune = None
        if "baseline" not in skip:
            base_s, out, rss = run_process("path", me, "--child", "baseline", *common, "--out", str(work / "baseline"))
            base = json.loads(out)
            base_acc, base_s = base["val_accuracy"], base_s - base["scoring_seconds"]
            rewrite = (base_acc, base_s)
            rows.append(("baseline rewrite: the recipe on tlcli's faster pipeline", base_acc, base_s, rss))
        keras_s = None
        if "keras" not in skip:
            s, out, rss = run_process("path", me, "--child", "baseline-keras", *common, "--out", str(work / "bk"))
            bk = json.loads(out.strip().splitlines()[-1])  # flow_from_directory prints "Found ..." first
            keras_s = s - bk["scoring_seconds"]
            shipped = (bk["val_accuracy"], keras_s)
            rows.append(("baseline: make_image_classifier as shipped (ImageDataGenerator)", bk["val_accuracy"],
                         keras_s, rss))
        head_s, r, rss = tlcli_train(args, work / "head", work / "cache-head")
        rows.append((f"tlcli head-only, cold cache ({r['extracted']} extracted, {r['head_epochs']} epochs)",
                     r["val_accuracy"], head_s, rss))
        s, r2, rss = tlcli_train(args, work / "head2", work / "cache-head")
        rows.append((f"tlcli head-only re-run, warm cache ({r2['extracted']} extracted)", r2["val_accuracy"], s, rss))
        if "finetune" not in skip:
            s, r3, rss = tlcli_train(args, work / "ft", work / "cache-ft", "--fine-tune")
            rows.append((f"tlcli --fine-tune, cold cache ({r3['fine_tune_epochs']} epochs"
                         f"{', mirror' if r3['mirror'] else ''})",
                         r3["val_accuracy"], s, rss))
            finetune = (r3["val_accuracy"], s)
        if "ablation" not in skip:  # where the accuracy comes from: mirror averaging vs fine-tuning
            if "finetune" not in skip:
                s, r4, rss = tlcli_train(args, work / "ftnm", work / "cache-ftnm", "--fine-tune", "--no-mirror")
                rows.append((f"  ablation: --fine-tune --no-mirror ({r4['fine_tune_epochs']} epochs)",
                             r4["val_accuracy"], s, rss))
            s, r5, rss = tlcli_train(args, work / "hm", work / "cache-hm", "--mirror")
            rows.append(("  ablation: head-only --mirror, cold cache", r5["val_accuracy"], s, rss))
        report(rows, floor_s, head_s, r, finetune, shipped, rewrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
