"""TFLite export with quantization and a measured parity check against the SavedModel.

Quantization modes (``--quantize``):

* ``none``: float32 weights and activations.
* ``float16``: float16 weights (about half the size), float32 compute on most CPUs.
* ``dynamic``: int8 weights of large tensors (about a quarter), float activations.
* ``int8``: full integer weights and activations, calibrated on up to 100 training images;
  ``io_type`` int8 / uint8 makes the input and output tensors integer too (for integer-only
  accelerators); float32 keeps float input and output around the integer graph.

Labels travel inside the file, as a ``labels`` entry in the flatbuffer's metadata, written with
TensorFlow's own flatbuffer tools (see ``tflite_meta``); the bundle's ``model.tflite`` also has
the bundle's ``labels.txt`` beside it. Only when this TensorFlow cannot embed them does a file
elsewhere get a ``<name>.labels.txt`` beside it (and a warning says so). Both are written from the
validated labels in tlcli.json, never copied from the bundle's files.
A ``tlcli_bundle`` metadata entry holds the bundle's fingerprint, so that predict refuses the
file in another bundle even when the labels are the same.

The SavedModel is checked by ``graphcheck`` before it is converted or run (parity check).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import data, files
from tlcli.bundle.schema import read_regular
from tlcli.config import DEFAULT_MODEL_DIR, IO_TYPES, QUANTIZE, check_max_pixels
from tlcli.data import images
from tlcli.deploy import tflite_meta
from tlcli.errors import OutputExistsError, TlcliError, UsageError
from tlcli.interrupts import sigterm_as_interrupt
from tlcli.progress import Callback, End, Start, Warn, silent
from tlcli.quiet import native_stderr_silenced

CALIBRATION_IMAGES = 100
PARITY_IMAGES = 500


@dataclass
class ExportResult:
    """What was written and how it compares with the SavedModel. The parity fields are None when
    no labelled images were available (``parity_images`` 0)."""

    path: str
    labels_path: str | None        # the labels.txt beside the file; None: the labels are only inside it
    labels_embedded: bool          # labels stored in the .tflite metadata
    quantize: str
    io_type: str
    size_bytes: int
    parity_data: str | None        # which images the parity was measured on
    parity_images: int
    agreement: float | None        # fraction of images with the same top-1 class as the SavedModel
    saved_model_accuracy: float | None
    tflite_accuracy: float | None
    max_abs_diff: float | None     # largest probability difference
    warnings: list[str] = field(default_factory=list)  # the export stands; e.g. it could not be recorded
    # Per label, in label order: {"label", "images", "saved_model_accuracy", "tflite_accuracy"}
    # (accuracies None for a label with no parity images).
    per_class: list[dict] = field(default_factory=list)
    max_accuracy_drop: float | None = None  # the gate asked for, in accuracy points
    accuracy_drop: float | None = None      # SavedModel accuracy - TFLite accuracy, in points
    # "multi_label": agreement is of label sets and the accuracies of thresholded decisions
    # against the SavedModel's (``_label_parity``); None for a single-label model.
    task: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def labels_path_for(tflite_path: str | os.PathLike, b: bundles.Bundle, *, embedded: bool = True) -> Path | None:
    """Where the labels of an exported file go besides the file itself: the bundle's labels.txt
    for its model.tflite; for any other file, None when they are ``embedded`` in it, else
    ``<name>.labels.txt`` beside it."""
    p = Path(tflite_path)
    if os.path.realpath(p) == os.path.realpath(b.tflite_path):  # also when reached through a link
        return b.path / bundles.LABELS_FILE
    return None if embedded else p.with_name(p.stem + ".labels.txt")


class _Labelled:
    """Labelled images for calibration and parity: the bundle's recorded splits, or the --data
    folder. With --data, a shared bundle's splits (``tlcli share``: paths relative to the image
    folder) are looked up under it, and the folder is scanned only when none is there; without
    it, the recorded absolute paths are used. Each source is read once, when first needed."""

    def __init__(self, b: bundles.Bundle, data_dir: str | None, max_pixels: int):
        self.b, self.data_dir, self.max_pixels = b, data_dir, max_pixels
        self._pools: dict[str, list[tuple[str, int]]] = {}
        self._splits: dict | None = None

    def _pool(self, key: str) -> list[tuple[str, int]]:
        if key not in self._pools:
            if key == "data":
                folder = data.scan(self.data_dir, image_size=self.b.image_size, labels=self.b.labels,
                                   max_pixels=self.max_pixels, option="--data")
                self._pools[key] = [(s.path, s.label) for s in folder.samples]
            else:
                if self._splits is None:
                    self._splits = self.b.splits()
                located = (self._located(p) for p, _ in self._splits.get(key) or [])
                # is_file: a FIFO or device named in a crafted splits.json is skipped, never opened
                self._pools[key] = [(p, y) for p, (_, y) in zip(located, self._splits.get(key) or [])
                                    if p is not None and Path(p).is_file()]
        return self._pools[key]

    def _located(self, path: str) -> str | None:
        """A recorded path to open: an absolute one without --data, a relative one (a shared
        bundle's) under --data DIR and inside it; else None."""
        if os.path.isabs(path):
            return None if self.data_dir else path
        if not self.data_dir or Path(path).is_absolute() or ".." in Path(path).parts:
            return None
        return str(Path(self.data_dir) / path)

    def sample(self, which: str, limit: int, seed: int) -> tuple[list[tuple[str, int]], str]:
        """Up to ``limit`` (path, label) pairs, sampled with ``seed``, and where they came from."""
        items, source = self._pool(which), ("validation" if which == "val" else "training") + " images"
        if not items and which != "train":
            items, source = self._pool("train"), "training images (the bundle has no validation images)"
        if self.data_dir:
            if items:
                source += f" recorded in {bundles.SPLITS_FILE}, found in {self.data_dir}"
            else:
                items, source = self._pool("data"), f"images in {self.data_dir}"
        if len(items) > limit:
            items = random.Random(seed).sample(items, limit)
        return items, source


def _load_batch(items, size, max_pixels) -> tuple[np.ndarray, np.ndarray]:
    x, errors = images.decode_batch(items, lambda item: images.load_for_model(item[0], size, max_pixels=max_pixels))
    if x is None:
        return np.zeros((0, size, size, 3), np.float32), np.zeros(0, np.int64)
    return x, np.asarray([y for (_, y), err in zip(items, errors) if err is None])


def _labels_update(labels_path: Path, b: bundles.Bundle) -> bytes | None:
    """What to write to ``labels_path``: the bundle's validated labels, or None for the bundle's
    own labels.txt when it is already exactly that (not missing, changed, or a link)."""
    payload = b.labels_text().encode("utf-8")
    if labels_path.absolute() == (b.path / bundles.LABELS_FILE).absolute() and not labels_path.is_symlink():
        try:
            if read_regular(labels_path, len(payload)) == payload:
                return None
        except TlcliError:
            pass  # missing, not a regular file, or too long: regenerate it
    return payload


def _put_in_place(out: Path, payload: bytes, labels_path: Path | None, b: bundles.Bundle) -> None:
    """Write the .tflite ``out`` and its labels file together: both, or neither (the previous
    ones stay). Raises ``TlcliError`` naming the file that could not be written."""
    labels = None if labels_path is None else _labels_update(labels_path, b)
    try:
        files.write_together(([(labels_path, labels)] if labels is not None else []) + [(out, payload)])
    except OSError as exc:
        raise TlcliError(f"{exc.filename}: cannot write ({exc.strerror}); {out} was not written (any previous one "
                         "is kept); check that folder, or choose another --output") from None


def _check_output(out: Path, b: bundles.Bundle, *, force: bool, given: bool) -> Path:
    """Refuse an ``--output`` that export must not write: a folder, one in a missing folder, a
    file of the bundle other than its model.tflite (compared by real path), or an existing file
    that is not a ``.tflite`` flatbuffer (an image, a document, even one renamed to .tflite):
    ``UsageError``. An existing .tflite file (the bundle's model.tflite too) is replaced only
    with ``force``, as ``train`` replaces a bundle: ``OutputExistsError`` naming its quantization
    when the bundle recorded it. ``given``: ``out`` is the user's --output (else the default)."""
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory; give a file name such as {out / 'model.tflite'}")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.absolute().parent} does not exist; create it first")
    real, home = Path(os.path.realpath(out)), Path(os.path.realpath(b.path))
    if home in real.parents and (real.parent != home or real.suffix.lower() != ".tflite"):
        raise UsageError(f"--output {out}: is a file of the model {b.path}; give {b.tflite_path} (the default) "
                         "or a .tflite file name")
    own = out.name == bundles.TFLITE_FILE and os.path.realpath(out.absolute().parent) == str(home)
    # The bundle's own model.tflite is always replaceable (written atomically, a link replaced, not
    # followed): a damaged one must be re-exported.
    replaceable = out.is_file() and real.suffix.lower() == out.suffix.lower() == ".tflite" and _is_tflite(out)
    if not own and (out.exists() or out.is_symlink()) and not replaceable:
        raise UsageError(f"--output {out}: already exists and is not a .tflite file; export replaces only "
                         ".tflite files: choose a new name ending in .tflite")
    if (out.exists() or out.is_symlink()) and not force:
        was = b.meta.exports.get(_export_name(out, b), {})
        how = f" (exported with --quantize {was['quantize']})" if isinstance(was.get("quantize"), str) else ""
        where = f"--output {out}:" if given else f"--model {b.path}: its {out.name}"
        raise OutputExistsError(f"{where} already exists{how}; pass --force to replace it, or choose another --output")
    return out


def _export_name(out: Path, b: bundles.Bundle) -> str:
    """The key of the export to ``out`` under ``exports`` in tlcli.json: its name inside the
    bundle, else its absolute path."""
    inside = os.path.realpath(out.absolute().parent) == os.path.realpath(b.path)
    return out.name if inside else str(out.absolute())


def _is_tflite(path: Path) -> bool:
    """Whether ``path`` starts like a TFLite flatbuffer (file identifier "TFL3" at byte 4): an
    image or document merely renamed to .tflite is not replaced."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def _convert(t, b: bundles.Bundle, quantize: str, io_type: str, calibration: np.ndarray | None) -> bytes:
    from tlcli.bundle import graphcheck

    # The converter loads the SavedModel and may constant-fold its ops: check it first.
    graphcheck.check_signature(graphcheck.check_saved_model(b.path), b)
    with bundles.tf_readable(b.path) as source:
        return _convert_from(t, source, b, quantize, io_type, calibration)


def _convert_from(t, source: Path, b: bundles.Bundle, quantize: str, io_type: str,
                  calibration: np.ndarray | None) -> bytes:
    try:
        converter = t.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=["serving_default"])
    except Exception as exc:
        raise TlcliError(f"--model {b.path}: the SavedModel cannot be converted ({type(exc).__name__}); "
                         "the bundle may be corrupt; retrain it") from None
    if quantize != "none":
        converter.optimizations = [t.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [t.float16]
    if quantize == "int8":
        # The input's quantization range is the calibration images' observed range; one pure
        # black and one pure white pixel pin it to [0, 1], so the input scale is exactly 1/255:
        # uint8 input is then the raw 8-bit RGB pixels, and no bright pixel is ever clipped.
        pinned = calibration[:1].copy()
        pinned[0, 0, 0], pinned[0, 0, -1] = 0.0, 1.0

        def representative():
            yield [pinned]
            for i in range(len(calibration)):
                yield [calibration[i:i + 1]]

        converter.representative_dataset = representative
        # Builtins only: conversion fails rather than silently leaving float ops in the graph.
        converter.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io_type != "float32":
            converter.inference_input_type = getattr(t, io_type)
            converter.inference_output_type = getattr(t, io_type)
    try:
        with native_stderr_silenced():  # the quantizer prints its settings from C++
            return converter.convert()
    except Exception as exc:
        raise TlcliError(f"TFLite conversion failed for {b.path} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None


def _parity(b: bundles.Bundle, path: Path, x: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 agreement, both accuracies (overall and per label) and the largest probability
    difference of the .tflite at ``path`` against the SavedModel on images ``x`` labelled ``y``."""
    from tlcli.deploy.inference import open_engine

    ref, lite = open_engine(b, "tf"), open_engine(b, "tflite", tflite_path=path)
    p_ref = np.concatenate([ref(x[i:i + 32]) for i in range(0, len(x), 32)])
    p_lite = np.concatenate([lite(x[i:i + 32]) for i in range(0, len(x), 32)])
    if b.meta.multi_label:
        return _label_parity(b, p_ref, p_lite)
    right_ref, right_lite = p_ref.argmax(1) == y, p_lite.argmax(1) == y
    per_class = []
    for i, label in enumerate(b.labels):
        mine = y == i
        n = int(mine.sum())
        per_class.append({"label": label, "images": n,
                          "saved_model_accuracy": float(right_ref[mine].mean()) if n else None,
                          "tflite_accuracy": float(right_lite[mine].mean()) if n else None})
    return {"agreement": float(np.mean(p_ref.argmax(1) == p_lite.argmax(1))),
            "saved_model_accuracy": float(right_ref.mean()), "tflite_accuracy": float(right_lite.mean()),
            "max_abs_diff": float(np.max(np.abs(p_ref - p_lite))), "per_class": per_class}


def _label_parity(b: bundles.Bundle, p_ref: np.ndarray, p_lite: np.ndarray) -> dict:
    """``_parity`` of a multi-label bundle, whose rows need not sum to 1 and whose splits.json
    records one label a photo: each label is decided at its threshold, and the SavedModel's
    decisions are the reference. ``agreement``: the share of images given the same label set;
    the accuracies: the share of (image, label) decisions equal to the SavedModel's (its own:
    1), overall and per label, so the accuracy gate bounds the decisions the export changes."""
    cuts = np.asarray(b.meta.thresholds, np.float32)[None, :]
    ref, lite = p_ref >= cuts, p_lite >= cuts
    same = ref == lite
    per_class = [{"label": label, "images": len(ref), "saved_model_accuracy": 1.0,
                  "tflite_accuracy": float(same[:, j].mean())} for j, label in enumerate(b.labels)]
    return {"agreement": float(same.all(axis=1).mean()), "saved_model_accuracy": 1.0,
            "tflite_accuracy": float(same.mean()), "max_abs_diff": float(np.max(np.abs(p_ref - p_lite))),
            "per_class": per_class}


def _check_drop(result: ExportResult, out: Path) -> None:
    """Refuse (``TlcliError``, exit 1) a model whose accuracy is more than ``max_accuracy_drop``
    points below the SavedModel's; ``out`` has not been written then."""
    drop = 100 * (result.saved_model_accuracy - result.tflite_accuracy)
    result.accuracy_drop = drop
    if drop > result.max_accuracy_drop + 1e-9:
        raise TlcliError(f"--max-accuracy-drop {result.max_accuracy_drop:g}: the {result.quantize} TFLite model "
                         f"scores {100 * result.tflite_accuracy:.1f}% on {result.parity_images} "
                         f"{result.parity_data}, {drop:.1f} points below the SavedModel's "
                         f"{100 * result.saved_model_accuracy:.1f}%; {out} was not written (any previous one is "
                         "kept); allow a larger drop or choose another --quantize")


def _check_options(quantize: str, io_type: str, max_accuracy_drop: float | None, max_pixels: int | None) -> None:
    check_max_pixels(max_pixels)
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")
    if io_type not in IO_TYPES:
        raise UsageError(f"--io-type {io_type}: choose one of {', '.join(IO_TYPES)}")
    if io_type != "float32" and quantize != "int8":
        raise UsageError(f"--io-type {io_type}: integer input/output needs --quantize int8")
    if max_accuracy_drop is not None and not 0 <= max_accuracy_drop <= 100:
        raise UsageError(f"--max-accuracy-drop {max_accuracy_drop:g}: give accuracy points in [0, 100]")


def export_tflite(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, output: str | os.PathLike | None = None,
                  quantize: str = "none", io_type: str = "float32", data_dir: str | None = None,
                  max_pixels: int | None = None, max_accuracy_drop: float | None = None, force: bool = False,
                  progress: Callback = silent) -> ExportResult:
    """Convert the bundle's SavedModel (``serving_default``) to TFLite, measure top-1 agreement
    and both accuracies (overall and per label) against the SavedModel on up to 500 of the
    bundle's validation images (or of ``data_dir``, a labelled folder that then also provides int8
    calibration), and write it to the bundle's ``model.tflite`` or ``output`` with its labels (see
    module docstring); an existing file is replaced only with ``force``. The file is measured
    before it is put in place: with
    ``max_accuracy_drop`` (accuracy points), a model more than that below the SavedModel is not
    written, and any previous file stays. The result is also recorded under ``exports`` in the
    bundle's tlcli.json (``bundle.record_export``); when that fails (a read-only bundle exported
    elsewhere), the export still succeeds and ``warnings`` says why, also sent as a warning event.

    Raises ``UsageError`` for a bad option (unknown mode, integer I/O without int8, a missing
    output directory, no calibration images, a gate without labelled images), ``OutputExistsError``
    for an existing file without ``force``, ``BundleError`` for a bad bundle, ``TlcliError`` when
    conversion fails, the gate refuses the model, or another export or train is writing the
    bundle, and ``KeyboardInterrupt`` on Ctrl-C or SIGTERM (its temporary files are removed, and
    nothing is replaced).
    """
    _check_options(quantize, io_type, max_accuracy_drop, max_pixels)
    b = bundles.load(model_dir)
    with sigterm_as_interrupt(), bundles.lock(b.path, option="--model", required=False):
        return _export(b, output, quantize, io_type, data_dir, max_pixels, max_accuracy_drop, force, progress)


def _export(b: bundles.Bundle, output, quantize: str, io_type: str, data_dir: str | None, max_pixels: int | None,
            max_accuracy_drop: float | None, force: bool, progress: Callback) -> ExportResult:
    max_pixels = max_pixels or b.max_pixels
    out = _check_output(Path(output) if output else b.tflite_path, b, force=force, given=bool(output))
    labelled = _Labelled(b, data_dir, max_pixels)
    calibration = None
    if quantize == "int8":
        calib, _ = labelled.sample("train", CALIBRATION_IMAGES, 0)
        calibration, _ = _load_batch(calib, b.image_size, max_pixels)
        if not len(calibration):
            raise UsageError(f"--quantize int8: no calibration images (the training images recorded in "
                             f"{b.path / bundles.SPLITS_FILE} are gone); pass --data DIR")
    items, source = labelled.sample("val", PARITY_IMAGES, 1)
    x, y = _load_batch(items, b.image_size, max_pixels)
    if max_accuracy_drop is not None and not len(x):
        raise UsageError(f"--max-accuracy-drop {max_accuracy_drop:g}: no labelled images to measure the accuracy "
                         f"on (none recorded in {b.path / bundles.SPLITS_FILE}); pass --data DIR")
    from tlcli._tf import tf

    t = tf()
    progress(Start("convert", total=1))
    flat = _convert(t, b, quantize, io_type, calibration)
    with_labels = tflite_meta.embed(flat, tflite_meta.entries_for(b))
    payload = with_labels or flat
    progress(End("convert", total=1, completed=1))

    labels_path = labels_path_for(out, b, embedded=with_labels is not None)
    result = ExportResult(str(out), labels_path and str(labels_path), with_labels is not None, quantize, io_type,
                          len(payload), None, 0, None, None, None, None, max_accuracy_drop=max_accuracy_drop,
                          task=b.meta.task if b.meta.multi_label else None)
    if len(x):
        progress(Start("parity", total=len(items)))
        with tempfile.TemporaryDirectory(prefix="tlcli-export-") as tmp:
            measured = Path(tmp) / out.name  # measured here first: nothing lands in place before the gate
            measured.write_bytes(payload)
            result = dataclasses.replace(result, **_parity(b, measured, x, y), parity_data=source,
                                         parity_images=len(x))
        progress(End("parity", total=len(items), completed=len(items)))
        if max_accuracy_drop is not None:
            _check_drop(result, out)
    _put_in_place(out, payload, labels_path, b)
    if with_labels is None:
        _warn(result, progress, f"this TensorFlow cannot store the labels inside {out.name}; they are in "
                                f"{labels_path} beside it")
    entry = {k: v for k, v in result.to_dict().items() if k != "warnings"}
    warning = bundles.record_export(b, _export_name(out, b), entry)  # a read-only bundle exported elsewhere fails
    if warning:
        _warn(result, progress, warning)
    return result


def _warn(result: ExportResult, progress: Callback, warning: str) -> None:
    result.warnings.append(warning)
    progress(Warn(warning))
