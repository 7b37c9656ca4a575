"""Frozen-backbone features on the CPU: TensorFlow against LiteRT (XNNPACK), and what it does to
a cold `tlcli train`.

    .venv/bin/python bench/extract.py [--images 3000] [--throughput-images 256] [--skip train,accuracy]

Needs ../shared (MobileNetV2 1.0 at 224 and hymenoptera); prints SKIP without it. In one run:

1. throughput: images/s of TensorFlow (Keras predict, batch 32) and of LiteRT (the cached
   conversion, one thread per core, batch 32) on the same preprocessed images in one process,
   their largest feature difference, and the fp32 roofline ratio: FLOPs per image x images/s /
   peak, the peak computed from cores x clock x FLOP per cycle (printed).
2. train: in fresh processes, on a set of --images images made of hymenoptera's train and val
   images repeated under other names, each copy's bytes made distinct (``build_set``): the
   TensorFlow floor (TF import, backbone load, one TF forward pass over every
   image, as bench/train_vs_baseline.py's floor), then head-only `tlcli train` with a cold
   feature cache: first with no converted backbone (conversion included), then with it cached,
   then with --extractor tf. Each against the floor of the same run.
3. accuracy: head-only and --mirror val accuracy on hymenoptera train -> val, both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402
from bench.train_vs_baseline import run_process  # noqa: E402

SIZE = 224
BATCH = 32
# MobileNetV2 1.0 at 224x224: 300 M multiply-adds per image (Sandler et al. 2018, table 6),
# 2 FLOP each.
MOBILENET_V2_FLOPS = 2 * 300e6


def peak_flops(clock_ghz: float | None) -> tuple[float, str]:
    """(fp32 FLOP/s of the cores this process may use, how it was computed). FLOP per cycle per
    core: 2 FMA units x lanes x 2 (a fused multiply-add is two FLOP): 16 lanes with AVX-512, 8
    with AVX2 + FMA; 8 without FMA (SSE: 4 lanes, one add and one multiply port)."""
    cores = len(os.sched_getaffinity(0))
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    if clock_ghz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
        clock_ghz = float(mhz.group(1)) / 1000 if mhz else 2.0
    per_cycle, isa = (64, "AVX-512 FMA: 2 units x 16 lanes x 2") if "avx512f" in flags else \
        (32, "AVX2 FMA: 2 units x 8 lanes x 2") if {"avx2", "fma"} <= flags else (8, "SSE: 4 lanes x (add + mul)")
    peak = cores * clock_ghz * 1e9 * per_cycle
    return peak, f"{cores} cores x {clock_ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa}) = {peak / 1e9:.0f} GFLOP/s"


def throughput(args) -> None:
    """Section 1, in this process."""
    import numpy as np

    from tlcli.data import images
    from tlcli.model import backbone
    from tlcli.model import classifier as model
    from tlcli.model import litert as litert_backbone

    paths = sorted(str(p) for d in ("train", "val") for p in (HYMENOPTERA / d).rglob("*") if p.is_file())
    paths = (paths * (args.throughput_images // len(paths) + 1))[:args.throughput_images]
    x = np.stack([images.load_for_model(p, SIZE) for p in paths])
    spec = backbone.resolve_spec(str(MOBILENET_V2), SIZE)
    loaded = backbone.load(spec)
    extractor = model.build_extractor(loaded.layer, SIZE)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        runner = litert_backbone.prepare(loaded, spec, cache_dir=cache)
        convert_s = time.perf_counter() - start
    extractor.predict(x[:BATCH], batch_size=BATCH, verbose=0)  # warm up both: tracing, allocation
    runner(x[:BATCH])
    rates = {}
    for name, run in (("tf", lambda: extractor.predict(x, batch_size=BATCH, verbose=0)),
                      ("litert", lambda: np.concatenate([runner(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]))):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = run()
            best = min(best, time.perf_counter() - start)
        rates[name] = (len(x) / best, out)
    peak, how = peak_flops(args.clock_ghz)
    diff = litert_backbone.parity_error(rates["tf"][1], rates["litert"][1])
    print(f"throughput on {len(x)} preprocessed images ({SIZE}x{SIZE}), batch {BATCH}, best of {args.repeats}; "
          f"conversion {convert_s:.1f} s")
    print(f"peak fp32: {how}; MobileNetV2 1.0 at 224: {MOBILENET_V2_FLOPS / 1e6:.0f} MFLOP per image "
          f"(300 M multiply-adds)")
    for name in ("tf", "litert"):
        rate = rates[name][0]
        print(f"  {name:<7} {rate:7.1f} images/s  roofline {MOBILENET_V2_FLOPS * rate / peak:6.1%}")
    ratio = rates["litert"][0] / rates["tf"][0]
    roof = MOBILENET_V2_FLOPS * rates["litert"][0] / peak
    print(f"  features differ by {diff:.1e} of their scale (tolerance {litert_backbone.PARITY_TOLERANCE:g})")
    print(f"target LiteRT >= 2.5x TF images/s: {ratio:.2f}x: {verdict(ratio >= 2.5)}")
    print(f"target LiteRT >= 50% of the fp32 roofline: {roof:.1%}: {verdict(roof >= 0.5)}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def build_set(root: Path, n: int) -> int:
    """``n`` images (rounded down to whole classes) named ``<i>_<name>`` in ``root/<class>/``:
    hymenoptera's train and val images repeated, each copy made distinct by a trailer after the
    JPEG's end marker (decoders stop at the marker, so the pixels are the original's). Distinct
    bytes mean distinct content digests, so no copy's features are shared with another's: a run
    extracts every one of the ``n`` images, as it would on as many different photos."""
    classes = sorted(c.name for c in (HYMENOPTERA / "train").iterdir() if c.is_dir())
    per_class = n // len(classes)
    for name in classes:
        sources = sorted(p for d in ("train", "val") for p in (HYMENOPTERA / d / name).iterdir() if p.is_file())
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            src = sources[i % len(sources)]
            (root / name / f"{i:05d}_{src.name}").write_bytes(src.read_bytes() + f"tlcli-bench copy {i}".encode())
    return per_class * len(classes)


def child_floor(args) -> None:
    """The TensorFlow floor over every image under --data (see module docstring)."""
    t0 = time.perf_counter()
    from tlcli._tf import hub, keras

    hub()
    t1 = time.perf_counter()
    from tlcli import data

    paths = sorted(str(p) for p in Path(args.data).rglob("*") if p.is_file())
    layer = hub().KerasLayer(str(MOBILENET_V2), trainable=False)
    inp = keras().Input((SIZE, SIZE, 3))
    extractor = keras().Model(inp, layer(inp, training=False))
    t2 = time.perf_counter()
    n = len(extractor.predict(data.image_dataset(paths, SIZE, batch_size=BATCH), verbose=0))
    print(json.dumps({"images": n, "import": t1 - t0, "load": t2 - t1, "pass": time.perf_counter() - t2}))


def child_phases(args) -> None:
    """Head-only ``tlcli.train`` on --data into --out with --cache, timing each task from the
    process start (``Start`` to ``End`` events), as JSON: {task: [start s, end s]}."""
    t0 = time.perf_counter()
    import tlcli
    from tlcli.progress import End, Start

    spans: dict[str, list] = {"import tlcli": [0.0, time.perf_counter() - t0]}

    def progress(e):
        if isinstance(e, (Start, End)):
            spans.setdefault(e.task, [None, None])[isinstance(e, End)] = time.perf_counter() - t0

    tlcli.train(args.data, out=args.out, cache_dir=args.cache, backbone=str(MOBILENET_V2), image_size=SIZE,
                tensorboard=None, force=True, extractor="litert", progress=progress)
    spans["total"] = [0.0, time.perf_counter() - t0]
    print(json.dumps(spans))


def phases(work: Path, me: str) -> None:
    """Where a cold run's time goes (converted backbone cached, cold feature cache)."""
    (work / "cache4").mkdir()
    shutil.copytree(work / "cache1" / "backbones", work / "cache4" / "backbones")
    _, out, _ = run_process("path", me, "--child", "phases", "--data", str(work / "data"), "--out",
                            str(work / "m4"), "--cache", str(work / "cache4"))
    spans = json.loads(out)
    print("  where the cached-conversion run's time goes (seconds from the process start; the file check and "
          "the extraction ahead of it overlap the TensorFlow import and the backbone load):")
    for task, (begin, end) in spans.items():
        print(f"    {task:<14} {begin:6.1f} -> {end:6.1f}  ({end - begin:5.1f} s)")


def cpu_seconds(run):
    """(what ``run()`` returned, the CPU seconds (user + system) of the child processes it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def tlcli_train(where: list[str], out: Path, cache: Path, *extra: str) -> tuple[float, dict]:
    """`tlcli train` in a fresh process: (wall seconds, its --json result with its CPU seconds as "cpu")."""
    (wall, stdout, _), cpu = cpu_seconds(lambda: run_process(
        "module", "tlcli.cli", "train", *where, "--backbone", str(MOBILENET_V2), "--image-size", str(SIZE),
        "--out", str(out), "--cache-dir", str(cache), "--tensorboard", "none", "--force", "--json", *extra))
    return wall, {**json.loads(stdout), "cpu": cpu}


def train(args, work: Path) -> None:
    """Section 2."""
    total = build_set(work / "data", args.images)
    me = str(Path(__file__).resolve())
    floor, out, _ = run_process("path", me, "--child", "floor", "--data", str(work / "data"))
    parts = json.loads(out)
    print(f"\ncold head-only training on {total} images (hymenoptera repeated under other names)")
    print(f"  TF floor: {floor:.1f} s = TF import {parts['import']:.1f} + backbone load {parts['load']:.1f} + one "
          f"forward pass over {parts['images']} images {parts['pass']:.1f} ({parts['images'] / parts['pass']:.0f} "
          "images/s) + interpreter start")
    where = [str(work / "data")]
    first, r1 = tlcli_train(where, work / "m1", work / "cache1", "--extractor", "litert")
    (work / "cache2").mkdir()
    shutil.copytree(work / "cache1" / "backbones", work / "cache2" / "backbones")
    cached, r2 = tlcli_train(where, work / "m2", work / "cache2", "--extractor", "litert")
    rows = [("litert, first run with this backbone (conversion included)", first, r1),
            ("litert, converted backbone cached", cached, r2)]
    if "tf-train" not in args.skip:
        tf_s, r3 = tlcli_train(where, work / "m3", work / "cache3", "--extractor", "tf")
        rows.append(("--extractor tf", tf_s, r3))
    cores = len(os.sched_getaffinity(0))
    for name, sec, r in rows:
        print(f"  {name:<60} {sec:6.1f} s  {sec / floor:.2f}x floor  ({r['extracted']} extracted, engine "
              f"{r['extractor']}, val accuracy {r['val_accuracy']:.4f}; CPU {r['cpu']:.1f} s: no faster than "
              f"{r['cpu'] / cores:.1f} s = {r['cpu'] / cores / floor:.2f}x floor on {cores} cores)")
    if "phases" not in args.skip:
        phases(work, me)
    print(f"target cached conversion <= 0.6x floor: {cached / floor:.2f}x: {verdict(cached <= 0.6 * floor)}")
    print(f"target first run <= 1.0x floor: {first / floor:.2f}x: {verdict(first <= floor)}")


def accuracy(work: Path) -> None:
    """Section 3."""
    print("\nhymenoptera train -> val, head-only (cold caches: each LiteRT run converts the backbone too)")
    where = [str(HYMENOPTERA / "train"), "--val-dir", str(HYMENOPTERA / "val")]
    for extra in ([], ["--mirror"]):
        accs = {}
        for engine in ("tf", "litert"):
            sec, r = tlcli_train(where, work / "acc", work / f"acc-{engine}-{len(extra)}", "--extractor", engine,
                                 *extra)
            if engine == "litert" and r["extractor"] != "litert":
                print(f"  (LiteRT fell back to {r['extractor']})")
            accs[engine] = r["val_accuracy"]
            print(f"  {' '.join(extra) or 'plain':<9} --extractor {engine:<7} val accuracy {r['val_accuracy']:.4f}  "
                  f"{sec:5.1f} s")
        print(f"target same val accuracy as --extractor tf ({' '.join(extra) or 'plain'}): "
              f"{accs['litert']:.4f} vs {accs['tf']:.4f}: {verdict(accs['litert'] >= accs['tf'] - 1e-9)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--throughput-images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clock-ghz", type=float, help="the cores' clock (default: /proc/cpuinfo's cpu MHz)")
    ap.add_argument("--skip", default="", help="comma list of: throughput, train, tf-train, phases, accuracy")
    ap.add_argument("--child", choices=["floor", "phases"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        {"floor": child_floor, "phases": child_phases}[args.child](args)
        sys.stdout.flush()
        os._exit(0)  # skip TensorFlow's slow interpreter teardown, as the tlcli console script does
    require(HYMENOPTERA / "train", HYMENOPTERA / "val", MOBILENET_V2)
    args.skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="tlcli-extract-"))
    try:
        if "throughput" not in args.skip:
            throughput(args)
        if "train" not in args.skip:
            train(args, work)
        if "accuracy" not in args.skip:
            accuracy(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
