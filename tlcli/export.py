"""TFLite export with quantization and a measured parity check against the SavedModel."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import data, images
from tlcli.config import DEFAULT_MAX_PIXELS, DEFAULT_MODEL_DIR
from tlcli.errors import TlcliError, UsageError
from tlcli.progress import Callback, Event, silent

QUANTIZE = ("none", "float16", "dynamic", "int8")
IO_TYPES = ("float32", "int8", "uint8")
CALIBRATION_IMAGES = 100
PARITY_IMAGES = 500


@dataclass
class ExportResult:
    path: str
    labels_path: str
    quantize: str
    size_bytes: int
    parity_images: int
    agreement: float | None        # top-1 agreement with the SavedModel
    saved_model_accuracy: float | None
    tflite_accuracy: float | None
    max_abs_diff: float | None     # largest probability difference

    def to_dict(self) -> dict:
        return asdict(self)


def _labelled(b: bundles.Bundle, data_dir: str | None, which: str, limit: int, seed: int,
              max_pixels: int) -> list[tuple[str, int]]:
    if data_dir:
        folder = data.scan(data_dir, image_size=b.image_size, labels=b.labels, max_pixels=max_pixels,
                           option="--data")
        items = [(s.path, s.label) for s in folder.samples]
    else:
        splits = b.splits()
        items = [(p, int(y)) for p, y in splits.get(which) or splits.get("train") or [] if Path(p).exists()]
    rng = random.Random(seed)
    if len(items) > limit:
        items = rng.sample(items, limit)
    return items


def _load_batch(items, size, max_pixels) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p, y in items:
        try:
            xs.append(images.load_for_model(p, size, max_pixels=max_pixels))
            ys.append(y)
        except images.ImageError:
            continue
    if not xs:
        return np.zeros((0, size, size, 3), np.float32), np.zeros(0, np.int64)
    return np.stack(xs), np.asarray(ys)


def export_tflite(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, output: str | os.PathLike | None = None,
                  quantize: str = "none", io_type: str = "float32", data_dir: str | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: Callback = silent) -> ExportResult:
    """Convert the bundle's SavedModel to TFLite (``model.tflite`` in the bundle, or ``output``)
    with labels written beside it, and measure top-1 agreement and accuracy against the SavedModel
    on the bundle's validation images (or ``data_dir``).

    ``quantize``: none | float16 | dynamic (int8 weights) | int8 (full integer, calibrated on up
    to 100 training images; ``io_type`` int8/uint8 makes input and output integer too).
    """
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")
    if io_type not in IO_TYPES:
        raise UsageError(f"--io-type {io_type}: choose one of {', '.join(IO_TYPES)}")
    if io_type != "float32" and quantize != "int8":
        raise UsageError(f"--io-type {io_type}: integer input/output needs --quantize int8")
    b = bundles.load(model_dir)
    out = Path(output) if output else b.tflite_path
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory; give a file name such as {out / 'model.tflite'}")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.absolute().parent} does not exist")
    from tlcli._tf import tf

    t = tf()
    progress(Event("start", "convert", total=1))
    try:
        converter = t.lite.TFLiteConverter.from_saved_model(str(b.path), signature_keys=["serving_default"])
    except Exception as exc:
        raise TlcliError(f"--model {b.path}: the SavedModel cannot be converted ({type(exc).__name__}); "
                         "the bundle may be corrupt; retrain it") from None
    if quantize in ("float16", "dynamic", "int8"):
        converter.optimizations = [t.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [t.float16]
    if quantize == "int8":
        calib = _labelled(b, data_dir, "train", CALIBRATION_IMAGES, 0, max_pixels)
        if not calib:
            raise UsageError(f"--quantize int8: no calibration images (the training images recorded in "
                             f"{b.path / bundles.SPLITS_FILE} are gone); pass --data DIR")
        x_cal, _ = _load_batch(calib, b.image_size, max_pixels)

        def representative():
            for i in range(len(x_cal)):
                yield [x_cal[i:i + 1]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float32":
            converter.inference_input_type = getattr(t, io_type)
            converter.inference_output_type = getattr(t, io_type)
    try:
        flat = converter.convert()
    except Exception as exc:
        raise TlcliError(f"TFLite conversion failed for {b.path} ({type(exc).__name__}: {str(exc)[:200]})") from None
    fd, tmp = tempfile.mkstemp(dir=out.absolute().parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(flat)
    os.replace(tmp, out)
    labels_path = out.with_name(out.stem + ".labels.txt") if out.name != bundles.TFLITE_FILE else \
        out.with_name(bundles.LABELS_FILE)
    if labels_path.absolute() != (b.path / bundles.LABELS_FILE).absolute():
        shutil.copyfile(b.path / bundles.LABELS_FILE, labels_path)
    progress(Event("end", "convert", total=1, completed=1))

    result = ExportResult(str(out), str(labels_path), quantize, out.stat().st_size, 0, None, None, None, None)
    items = _labelled(b, data_dir, "val", PARITY_IMAGES, 1, max_pixels)
    if items:
        from tlcli.inference import TFEngine, TFLiteEngine

        progress(Event("start", "parity", total=len(items)))
        x, y = _load_batch(items, b.image_size, max_pixels)
        ref, lite = TFEngine(b), TFLiteEngine(b, out)
        p_ref = np.concatenate([ref(x[i:i + 32]) for i in range(0, len(x), 32)])
        p_lite = np.concatenate([lite(x[i:i + 32]) for i in range(0, len(x), 32)])
        progress(Event("end", "parity", total=len(items), completed=len(items)))
        result.parity_images = len(x)
        result.agreement = float(np.mean(p_ref.argmax(1) == p_lite.argmax(1)))
        result.saved_model_accuracy = float(np.mean(p_ref.argmax(1) == y))
        result.tflite_accuracy = float(np.mean(p_lite.argmax(1) == y))
        result.max_abs_diff = float(np.max(np.abs(p_ref - p_lite)))
    meta = dict(b.meta)
    exports = meta.setdefault("exports", {})
    exports[out.name if out.absolute().parent == b.path.absolute() else str(out.absolute())] = result.to_dict()
    bundles.write_json(b.path / bundles.META_FILE, meta)
    return result
