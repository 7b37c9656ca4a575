"""Export benchmark: every engine on the same images in one run, beside the SavedModel.

    .venv/bin/python bench/export.py [--model BUNDLE] [--data DIR] [--repeats 3] [--images 64]

Without --model, trains a head-only bundle on ../shared/data/hymenoptera_data/train (validation:
.../val) with ../shared/models/mobilenet_v2_100_224_feature_vector into a temporary folder, and
prints SKIP when ../shared is absent. The bundle is copied first: the user's bundle is never
modified.

1. Parity: ``tlcli export --format all`` (float) on the bundle's validation images: top-1
   agreement with the SavedModel (count), accuracy, largest probability difference. Target on
   hymenoptera with MobileNetV2: 153/153 and <= 1e-4 for every float format.
2. Engines, each in its own fresh process on the same --images decoded images of --data:
   images/s at batch 1 and batch 32 (model loaded, decoding excluded, after warm-up), the
   process's peak RSS, and the time to open the engine; LiteRT both through its Interpreter (what
   tlcli runs) and through its CompiledModel API. Ratios to the SavedModel (tf).
3. Cold start: median wall time of --repeats fresh ``tlcli predict IMG`` processes per engine, and
   of predict (``--engine auto``) on a bundle holding only model.onnx or only openvino/ (no
   model.tflite), with whether TensorFlow was imported (target: under 1.5 s, no TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, model_and_data  # noqa: E402
from bench.deploy import machine_line, train_bundle  # noqa: E402

ENGINES = ["tf", "tflite", "tflite-compiled", "onnx", "openvino"]

# Run in a fresh process per engine: loads the engine, times it, prints one JSON line.
WORKER = r"""
import json, sys, time
import numpy as np
bundle_dir, engine_name, images_file = sys.argv[1:4]
x = np.load(images_file)
from tlcli import bundle as bundles
from tlcli.deploy import inference
b = bundles.load(bundle_dir)
start = time.perf_counter()
if engine_name == "tflite-compiled":
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    cm = CompiledModel.from_buffer((b.path / "model.tflite").read_bytes(), hardware_accel=HardwareAccelerator.CPU)
    shapes = {}
    def engine(batch):
        n = len(batch)
        if n not in shapes:
            cm.resize_input_tensor(0, list(batch.shape), 0, strict=False)
            shapes.clear()
            shapes[n] = (cm.create_input_buffers(0), cm.create_output_buffers(0))
        ins, outs = shapes[n]
        ins[0].write(np.ascontiguousarray(batch, np.float32))
        cm.run_by_index(0, ins, outs)
        return outs[0].read(n * len(b.labels), np.float32).reshape(n, -1)
else:
    engine = inference.open_engine(b, engine_name)
engine(x[:1])
opened = time.perf_counter() - start
probs = np.concatenate([engine(x[i:i + 32]) for i in range(0, len(x), 32)])
def rate(batch):
    for i in range(0, min(len(x), 2 * batch), batch):
        engine(x[i:i + batch])  # warm up this batch size
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        engine(x[i:i + batch])
    return len(x) / (time.perf_counter() - start)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent through exec
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
out = {"open_s": opened, "b1": rate(1), "b32": rate(32), "rss_mb": rss, "tf_imported": "tensorflow" in sys.modules}
np.save(images_file + "." + engine_name + ".npy", probs)
print(json.dumps(out))
"""

# A fresh `tlcli predict IMG --json` process that also says whether TensorFlow was imported.
COLD = ("import sys\nfrom tlcli.cli import run\nsys.argv = ['tlcli', 'predict', '--json', *sys.argv[1:]]\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('noTF', file=sys.stderr)\nsys.exit(code)")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def engine_figures(bundle: Path, engine: str, images_file: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(bundle), engine, str(images_file)], capture_output=True,
                          text=True, env=env())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_start(bundle: Path, args: list[str], image: Path, repeats: int) -> tuple[float, bool]:
    """Median wall seconds of a fresh predict process, and whether TensorFlow was imported."""
    times, tf_seen = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", COLD, str(image), "--model", str(bundle), *args],
                              capture_output=True, text=True, env=env())
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"predict failed ({args}): {proc.stderr.strip()[-500:]}")
        # tlcli's run() ends a process that imported TensorFlow with os._exit: no line then
        tf_seen |= (proc.stderr.strip().splitlines() or [""])[-1] != "noTF"
    return statistics.median(times), tf_seen


def only(bundle: Path, tmp: Path, keep: str) -> Path:
    """A copy of ``bundle`` without the exported files but ``keep``."""
    dst = tmp / f"only-{keep}"
    drop = {"model.tflite", "model.onnx", "openvino"} - {keep}
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def parity_section(bundle: Path) -> None:
    import tlcli

    start = time.perf_counter()
    r = tlcli.export_all(bundle, force=True)
    print(f"exported {', '.join(x.format for x in r.results)} in {time.perf_counter() - start:.0f} s "
          + "".join(f"; {s['format']} skipped: {s['reason']}" for s in r.skipped))
    print(f"\nParity (float exports) on {r.results[0].parity_images} {r.results[0].parity_data}; SavedModel accuracy "
          f"{r.results[0].saved_model_accuracy:.4f}")
    print(f"{'format':<10}{'size MB':>9}{'agree':>11}{'accuracy':>10}{'max |dp|':>11}{'ms/img':>8}")
    for x in r.results:
        agree = f"{round(x.agreement * x.parity_images)}/{x.parity_images}"
        print(f"{x.format:<10}{x.size_bytes / 1e6:>9.2f}{agree:>11}{x.export_accuracy:>10.4f}{x.max_abs_diff:>11.2e}"
              f"{x.ms_per_image:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images for the throughput figures")
    args = model_and_data(parser, data_help="images to run", repeats=3)

    import numpy as np

    from tlcli import bundle as bundles
    from tlcli.data import images
    from tlcli.data.walk import expand

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="tlcli-bench-export-") as tmp:
        bundle = Path(tmp) / "model"
        shutil.copytree(args.model, bundle) if args.model else train_bundle(bundle)
        b = bundles.load(bundle)
        parity_section(bundle)

        files = expand([args.data])[:args.images]
        x = np.stack([images.load_for_model(f, b.image_size) for f in files])
        images_file = Path(tmp) / "images.npy"
        np.save(images_file, x)
        print(f"\nEngines: {len(x)} images of {args.data}, one fresh process each; "
              "images/s without decoding; ratios to tf")
        print(f"{'engine':<16}{'open s':>7}{'b1 img/s':>9}{'b1/tf':>7}{'b32 img/s':>10}{'b32/tf':>7}{'RSS MB':>8}"
              f"{'RSS/tf':>7}{'TF?':>5}")
        base = None
        for engine in ENGINES:
            f = engine_figures(bundle, engine, str(images_file))
            if "error" in f:
                print(f"{engine:<16}failed: {f['error'][:60]}")
                continue
            base = base or f
            diff = np.abs(np.load(f"{images_file}.{engine}.npy") - np.load(f"{images_file}.tf.npy")).max()
            print(f"{engine:<16}{f['open_s']:>7.2f}{f['b1']:>9.1f}{f['b1'] / base['b1']:>7.2f}{f['b32']:>10.1f}"
                  f"{f['b32'] / base['b32']:>7.2f}{f['rss_mb']:>8.0f}{f['rss_mb'] / base['rss_mb']:>7.2f}"
                  f"{'yes' if f['tf_imported'] else 'no':>5}   max |dp| vs tf {diff:.1e}", flush=True)

        image = Path(files[0])
        print(f"\nCold start: median wall time of {args.repeats} fresh 'tlcli predict IMG --json' processes")
        cases = [(f"--engine {e}", bundle, ["--engine", e]) for e in ("tf", "tflite", "onnx", "openvino")]
        cases += [(f"auto, {k}-only bundle", only(bundle, Path(tmp), k), []) for k in ("model.onnx", "openvino")]
        for label, where, extra in cases:
            seconds, tf_seen = cold_start(where, extra, image, args.repeats)
            print(f"{label:<30}{seconds:>7.2f} s   TensorFlow imported: {'yes' if tf_seen else 'no'}", flush=True)


if __name__ == "__main__":
    main()
