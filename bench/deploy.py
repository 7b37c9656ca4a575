"""Deployment benchmark: TFLite quantization modes and predict speed per engine, as ratios.

    .venv/bin/python bench/deploy.py [--model BUNDLE] [--data DIR] [--repeats 5]

Without --model, trains a head-only bundle on ../shared/data/hymenoptera_data/train (validation:
.../val) with ../shared/models/mobilenet_v2_100_224_feature_vector into a temporary folder, and
prints SKIP when ../shared is absent. --data (default .../hymenoptera_data/val) is the folder
predicted over for throughput; its first image is the cold-start input. The bundle is copied
first: the user's bundle is never modified.

Prints, for each quantization mode, the .tflite size, top-1 agreement with the SavedModel and
TFLite accuracy (measured by ``tlcli export`` on the bundle's validation images) as ratios to
float (``none``); then per engine, the cold-start wall time of ``tlcli predict IMG`` (median of
--repeats fresh processes) and the throughput over --data (images/s after the model is loaded,
decoding included, as ``tlcli predict`` reports it), as ratios to the TensorFlow engine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, model_and_data  # noqa: E402

MODES = [("none", "float32"), ("float16", "float32"), ("dynamic", "float32"), ("int8", "float32"),
         ("int8", "uint8")]


def mode_name(quantize: str, io_type: str) -> str:
    return quantize if io_type == "float32" else f"{quantize}/{io_type} io"


def train_bundle(out: Path) -> Path:
    import tlcli

    print(f"training a bundle on {HYMENOPTERA / 'train'} (val {HYMENOPTERA / 'val'}, backbone "
          f"{MOBILENET_V2.name}) ...", flush=True)
    start = time.perf_counter()
    result = tlcli.train(HYMENOPTERA / "train", val_dir=str(HYMENOPTERA / "val"), backbone=str(MOBILENET_V2),
                         image_size=224, out=str(out), tensorboard=None)
    print(f"  trained in {time.perf_counter() - start:.0f} s, val accuracy {result.val_accuracy:.3f}")
    return out


def machine_line() -> str:
    return (f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; other jobs "
            "may share the cores, so timings can be disturbed")


def bench_bundle(model: Path | None, tmp: str) -> Path:
    """A bundle in ``tmp`` to measure: a copy of ``model``, or one trained on hymenoptera."""
    bundle = Path(tmp) / "model"
    if model:
        shutil.copytree(model, bundle)
    else:
        train_bundle(bundle)
    return bundle


def tlcli_command() -> list[str]:
    script = Path(sys.executable).parent / "tlcli"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tlcli.cli"]


def cold_start(bundle: Path, engine: str, image: Path, repeats: int) -> float:
    """Median wall seconds of a fresh ``tlcli predict IMAGE`` process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([*tlcli_command(), "predict", str(image), "--model", str(bundle), "--engine", engine,
                               "--json"], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"tlcli predict failed ({engine}): {proc.stderr.strip()[-500:]}")
    return statistics.median(times)


def throughput(bundle: Path, engine: str, files: list[str], tflite: Path | None = None) -> float:
    """Images per second over ``files``, model already loaded, as ``tlcli predict`` times it."""
    from tlcli import bundle as bundles
    from tlcli.deploy import inference

    b = bundles.load(bundle)
    eng = inference.open_engine(b, engine, path=tflite)
    list(inference.iter_predict(files[:8], bundle=b, engine=eng))  # warm up (first allocation)
    start = time.perf_counter()
    done = sum(p.error is None for p, _ in inference.iter_predict(files, bundle=b, engine=eng))
    return done / (time.perf_counter() - start)


def main() -> None:
    args = model_and_data(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                          data_help="images to predict over", repeats=5)
    data_dir = args.data

    import tlcli
    from tlcli import bundle as bundles
    from tlcli.data.walk import expand

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="tlcli-deploy-") as tmp:
        bundle = bench_bundle(args.model, tmp)
        b = bundles.load(bundle)
        files = expand([data_dir])
        print(f"bundle: {args.model or '(trained above)'}: {len(b.labels)} classes, image size {b.image_size}, "
              f"backbone {b.meta.backbone.handle or '?'}")

        # ---- quantization ------------------------------------------------------------------
        results = {}
        for q, io in MODES:
            start = time.perf_counter()
            results[(q, io)] = tlcli.export_tflite(bundle, output=bundle / f"bench-{q}-{io}.tflite", quantize=q,
                                                   io_type=io)
            print(f"  exported {mode_name(q, io)} in {time.perf_counter() - start:.0f} s", flush=True)
        base = results[("none", "float32")]
        print(f"\nQuantization: parity on {base.parity_images} {base.parity_data}; ratios to none (float32)")
        print(f"{'mode':<16}{'size MB':>9}{'size/none':>11}{'agreement':>11}{'accuracy':>10}{'acc/none':>10}"
              f"{'max |dp|':>10}")
        for (q, io), r in results.items():
            ok = r.agreement is not None
            print(f"{mode_name(q, io):<16}{r.size_bytes / 1e6:>9.2f}{r.size_bytes / base.size_bytes:>11.3f}"
                  + (f"{r.agreement:>11.3f}{r.export_accuracy:>10.3f}{r.export_accuracy / base.export_accuracy:>10.3f}"
                     f"{r.max_abs_diff:>10.4f}" if ok else "   (no labelled images to measure parity)"))
        if base.saved_model_accuracy is not None:
            print(f"SavedModel accuracy on the same images: {base.saved_model_accuracy:.3f}")

        # ---- predict speed -----------------------------------------------------------------
        image = next(f for f in files if Path(f).is_file())
        engines = [("tf", "tf", None)] + [(f"tflite {mode_name(q, io)}", "tflite", bundle / f"bench-{q}-{io}.tflite")
                                          for q, io in MODES]
        print(f"\nPredict: cold start = median wall time of {args.repeats} fresh '{' '.join(tlcli_command())} "
              f"predict IMG' processes;\nthroughput = images/s over {len(files)} files in {data_dir} "
              "(model loaded, decoding included); ratios to tf", flush=True)
        print(f"{'engine':<26}{'cold s':>8}{'cold/tf':>9}{'images/s':>10}{'speed/tf':>10}")
        rows = {}
        for label, engine, tflite in engines:
            if tflite is not None:
                shutil.copyfile(tflite, bundle / bundles.TFLITE_FILE)  # predict reads the bundle's model.tflite
            cold = cold_start(bundle, engine, Path(image), args.repeats)
            speed = throughput(bundle, engine, files, tflite)
            rows[label] = (cold, speed)
            tf_cold, tf_speed = rows["tf"]
            print(f"{label:<26}{cold:>8.2f}{cold / tf_cold:>9.3f}{speed:>10.1f}{speed / tf_speed:>10.2f}", flush=True)
        cold = rows["tflite none"][0]
        verdict = "met" if cold <= 1.0 and cold <= rows["tf"][0] / 4 else "NOT met"
        print(f"\ntarget (tflite cold start <= 1.0 s and <= 1/4 of tf): {verdict} "
              f"({cold:.2f} s, {cold / rows['tf'][0]:.3f} of tf)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
