"""Export to every format of the registry (``formats``: TFLite, ONNX, OpenVINO), each measured
against the SavedModel by the same parity pass (``parity``) before it is put in place.

Quantization modes (``--quantize``), where a format has them:

* ``none``: float32 weights and activations; must agree with the SavedModel to
  ``parity.FLOAT_TOLERANCE`` in probability, or the export fails.
* ``float16``: float16 weights (about half the size), float32 compute (TFLite, OpenVINO).
* ``dynamic``: int8 weights of large tensors (about a quarter), float activations (TFLite;
  ONNX through onnxruntime's dynamic quantizer).
* ``int8``: full integer weights and activations (TFLite), calibrated on up to 100 training
  images; ``io_type`` int8 / uint8 makes the input and output tensors integer too (for
  integer-only accelerators); float32 keeps float input and output around the integer graph.

Labels travel inside the file (the .tflite's metadata, ONNX ``metadata_props``, OpenVINO
``rt_info``), with the bundle's fingerprint, so that a file of another bundle is refused even
with the same labels. The bundle's own files have the bundle's ``labels.txt`` beside them. Only
when this TensorFlow cannot embed them in a .tflite does a file elsewhere get a
``<name>.labels.txt`` beside it (and a warning says so). Both are written from the validated
labels in tlcli.json, never copied from the bundle's files.

The SavedModel is checked by ``graphcheck`` before it is converted or run (parity check).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import files
from tlcli.bundle.schema import read_regular
from tlcli.config import DEFAULT_MODEL_DIR, EXPORT_FORMATS, IO_TYPES, QUANTIZE, check_max_pixels
from tlcli.deploy import formats, parity, tflite_meta
from tlcli.deploy.formats import Format
from tlcli.errors import OutputExistsError, TlcliError, UsageError
from tlcli.interrupts import sigterm_as_interrupt
from tlcli.progress import Callback, End, Start, Warn, silent

CALIBRATION_IMAGES = 100
PARITY_IMAGES = 500


@dataclass
class ExportResult:
    """What was written and how it compares with the SavedModel. The parity fields are None when
    no labelled images were available (``parity_images`` 0)."""

    path: str                      # the model file (OpenVINO: the .xml; its .bin is in ``files``)
    labels_path: str | None        # the labels.txt beside the file; None: the labels are only inside it
    labels_embedded: bool          # labels stored inside the file
    quantize: str
    io_type: str
    size_bytes: int                # of every file written, together
    parity_data: str | None        # which images the parity was measured on
    parity_images: int
    agreement: float | None        # fraction of images with the same top-1 class as the SavedModel
    saved_model_accuracy: float | None
    export_accuracy: float | None
    max_abs_diff: float | None     # largest probability difference
    warnings: list[str] = field(default_factory=list)  # the export stands; e.g. it could not be recorded
    # Per label, in label order: {"label", "images", "saved_model_accuracy", "export_accuracy"}
    # (accuracies None for a label with no parity images).
    per_class: list[dict] = field(default_factory=list)
    max_accuracy_drop: float | None = None  # the gate asked for, in accuracy points
    accuracy_drop: float | None = None      # SavedModel accuracy - export accuracy, in points
    format: str = "tflite"
    files: list[str] = field(default_factory=list)  # every file written (the model file first)
    ms_per_image: float | None = None       # one image at a time on this machine, after warm-up
    # "multi_label": agreement is of label sets and the accuracies of thresholded decisions
    # against the SavedModel's (``parity.label_compare``); None for a single-label model.
    task: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportAllResult:
    """``tlcli export --format all``: one result per format exported, in registry order, and the
    formats left out, as {"format", "reason"} (an extra not installed, a --quantize it lacks)."""

    results: list[ExportResult]
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"results": [r.to_dict() for r in self.results], "skipped": list(self.skipped)}


def labels_path_for(path: str | os.PathLike, b: bundles.Bundle, *, embedded: bool = True,
                    fmt: Format | None = None) -> Path | None:
    """Where the labels of an exported file go besides the file itself: the bundle's labels.txt
    for its own file of the format (model.tflite by default); for any other file, None when they
    are ``embedded`` in it, else ``<name>.labels.txt`` beside it."""
    p, own = Path(path), (fmt or formats.get("tflite")).path_in(b.path)
    if os.path.realpath(p) == os.path.realpath(own):  # also when reached through a link
        return b.path / bundles.LABELS_FILE
    return None if embedded else p.with_name(p.stem + ".labels.txt")


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


def _put_in_place(targets: list[Path], payloads: list[bytes], labels_path: Path | None, b: bundles.Bundle) -> None:
    """Write the model's files and its labels file together: all, or none (the previous ones
    stay). Raises ``TlcliError`` naming the file that could not be written."""
    labels = None if labels_path is None else _labels_update(labels_path, b)
    try:
        if not targets[0].parent.exists():
            targets[0].parent.mkdir()  # the bundle's own openvino/ (any other folder was checked to exist)
        files.write_together(([(labels_path, labels)] if labels is not None else []) + list(zip(targets, payloads)))
    except OSError as exc:
        raise TlcliError(f"{exc.filename}: cannot write ({exc.strerror}); {targets[0]} was not written (any "
                         "previous one is kept); check that folder, or choose another --output") from None


def _check_output(out: Path, b: bundles.Bundle, fmt: Format, *, force: bool, given: bool) -> Path:
    """Refuse an ``--output`` that export must not write: a folder, one in a missing folder, a
    file of the bundle other than the format's own (compared by real path), or an existing file
    (or companion, OpenVINO's .bin) that is not of the format (an image, a document, even one
    renamed): ``UsageError``. An existing file of the format (the bundle's own too) is replaced
    only with ``force``, as ``train`` replaces a bundle: ``OutputExistsError`` naming its
    quantization when the bundle recorded it. ``given``: ``out`` is the user's --output."""
    own_path = fmt.path_in(b.path)
    if out.is_dir():
        raise UsageError(f"--output {out}: is a directory; give a file name such as {out / own_path.name}")
    real, home = Path(os.path.realpath(out)), Path(os.path.realpath(b.path))
    own = real == Path(os.path.realpath(own_path))
    if not own and not out.absolute().parent.is_dir():
        raise UsageError(f"--output {out}: directory {out.absolute().parent} does not exist; create it first")
    # Inside the bundle, only files the bundle knows (bundle.place): one-file formats at its top.
    if home in real.parents and not own and (real.parent != home or real.suffix.lower() != fmt.suffix
                                             or fmt.module.companions(out)):
        raise UsageError(f"--output {out}: is a file of the model {b.path}; give {own_path} (the default) "
                         f"or a {fmt.suffix} file name")
    companions = fmt.module.companions(out)
    if out in companions:
        raise UsageError(f"--output {out}: a {fmt.name} model's name ends in {fmt.suffix}; choose such a name")
    # The bundle's own files are always replaceable (written atomically, a link replaced, not
    # followed): a damaged one must be re-exported. A companion (OpenVINO's .bin) is replaced
    # only beside a model file of the format.
    ours = out.is_file() and Path(os.path.realpath(out)).suffix.lower() == out.suffix.lower() == fmt.suffix \
        and fmt.module.looks_like(out)
    for p in [out, *companions]:
        if not own and (p.exists() or p.is_symlink()) and not (ours and p.is_file()):
            raise UsageError(f"--output {out}: {'' if p == out else f'{p} '}already exists and is not a "
                             f"{fmt.suffix} file{'' if p == out else ' of this model'}; export replaces only "
                             f"{fmt.name} files: choose a new name ending in {fmt.suffix}")
    if any(p.exists() or p.is_symlink() for p in [out, *companions]) and not force:
        was = b.meta.exports.get(_export_name(out, b), {})
        how = f" (exported with --quantize {was['quantize']})" if isinstance(was.get("quantize"), str) else ""
        where = f"--output {out}:" if given else f"--model {b.path}: its {own_path.relative_to(b.path)}"
        raise OutputExistsError(f"{where} already exists{how}; pass --force to replace it, or choose another --output")
    return out


def _export_name(out: Path, b: bundles.Bundle) -> str:
    """The key of the export to ``out`` under ``exports`` in tlcli.json: its path inside the
    bundle, else its absolute path."""
    real, home = Path(os.path.realpath(out.absolute())), Path(os.path.realpath(b.path))
    return real.relative_to(home).as_posix() if home in real.parents else str(out.absolute())


def _check_options(fmt: str, quantize: str, io_type: str, max_accuracy_drop: float | None,
                   max_pixels: int | None) -> None:
    check_max_pixels(max_pixels)
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")
    if fmt != "all" and quantize not in formats.get(fmt).quantize:
        raise UsageError(f"--quantize {quantize}: --format {fmt} has {', '.join(formats.get(fmt).quantize)}")
    if io_type not in IO_TYPES:
        raise UsageError(f"--io-type {io_type}: choose one of {', '.join(IO_TYPES)}")
    if io_type != "float32" and quantize != "int8":
        raise UsageError(f"--io-type {io_type}: integer input/output needs --quantize int8")
    if max_accuracy_drop is not None and not 0 <= max_accuracy_drop <= 100:
        raise UsageError(f"--max-accuracy-drop {max_accuracy_drop:g}: give accuracy points in [0, 100]")


def export_model(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, format: str = "tflite",
                 output: str | os.PathLike | None = None, quantize: str = "none", io_type: str = "float32",
                 data_dir: str | None = None, max_pixels: int | None = None, max_accuracy_drop: float | None = None,
                 force: bool = False, progress: Callback = silent) -> ExportResult:
    """Convert the bundle's SavedModel (the signature ``bundle.savedmodel.engine_signature`` names) to
    ``format`` (``formats.FORMATS``), measure it against the SavedModel (top-1 agreement, both
    accuracies overall and per label, the largest probability difference, ms per image) on up to
    500 of the bundle's validation images (or of ``data_dir``, a labelled folder that then also
    provides int8 calibration), and write it to the bundle's file of the format or ``output``
    with its labels (see module docstring); an existing file is replaced only with ``force``.
    The file is measured before it is put in place: a float export that differs by more than
    ``parity.FLOAT_TOLERANCE``, or (with ``max_accuracy_drop``, accuracy points) a model more
    than that below the SavedModel, is not written, and any previous file stays. The result is
    also recorded under ``exports`` in the bundle's tlcli.json (``bundle.record_export``); when
    that fails (a read-only bundle exported elsewhere), the export still succeeds and
    ``warnings`` says why, also sent as a warning event.

    Raises ``UsageError`` for a bad option (unknown format or mode, a mode the format lacks,
    integer I/O without int8, a missing output directory, no calibration images, a gate without
    labelled images, the format's extra not installed), ``OutputExistsError`` for an existing
    file without ``force``, ``BundleError`` for a bad bundle, ``TlcliError`` when conversion
    fails, a gate refuses the model, or another export or train is writing the bundle, and
    ``KeyboardInterrupt`` on Ctrl-C or SIGTERM (its temporary files are removed, and nothing is
    replaced).
    """
    _check_options(format, quantize, io_type, max_accuracy_drop, max_pixels)
    if format == "all":
        raise UsageError("--format all: use export_all, which writes every format")
    fmt = formats.get(format)
    fmt.require("--format", to_export=True)
    b = bundles.load(model_dir)
    with sigterm_as_interrupt(), bundles.lock(b.path, option="--model", required=False):
        out = _check_output(Path(output) if output else fmt.path_in(b.path), b, fmt, force=force, given=bool(output))
        ref = _Reference(b, data_dir, max_pixels or b.max_pixels, max_accuracy_drop, quantize)
        return _export(b, fmt, out, ref, quantize, io_type, progress)


def export_tflite(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, **options) -> ExportResult:
    """``export_model`` with ``format="tflite"`` (see there for the options and errors)."""
    return export_model(model_dir, format="tflite", **options)


def export_all(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, quantize: str = "none",
               data_dir: str | None = None, max_pixels: int | None = None, max_accuracy_drop: float | None = None,
               force: bool = False, progress: Callback = silent) -> ExportAllResult:
    """Every format whose extra is installed and that has ``quantize``, exported into the bundle
    as ``export_model`` does (each through the parity pass; the SavedModel's probabilities are
    computed once). Stops at the first format that fails (the ones before it stay written).
    Raises as ``export_model`` does, and ``UsageError`` when no format can be exported."""
    _check_options("all", quantize, "float32", max_accuracy_drop, max_pixels)
    b = bundles.load(model_dir)
    todo, skipped = [], []
    for fmt in formats.FORMATS.values():
        missing = fmt.missing(to_export=True)
        if missing:
            skipped.append({"format": fmt.name, "reason": f"{missing} is not installed: {fmt.install}"})
        elif quantize not in fmt.quantize:
            skipped.append({"format": fmt.name, "reason": f"no --quantize {quantize}"})
        else:
            todo.append(fmt)
    if not todo:
        raise UsageError(f"--format all: no format can be exported ({'; '.join(s['reason'] for s in skipped)})")
    with sigterm_as_interrupt(), bundles.lock(b.path, option="--model", required=False):
        outs = [_check_output(fmt.path_in(b.path), b, fmt, force=force, given=False) for fmt in todo]
        ref = _Reference(b, data_dir, max_pixels or b.max_pixels, max_accuracy_drop, quantize)
        results = [_export(b, fmt, out, ref, quantize, "float32", progress) for fmt, out in zip(todo, outs)]
    return ExportAllResult(results, skipped)


class _Reference:
    """The images an export is measured on and the SavedModel's probabilities for them, loaded
    once for every format of one command (TensorFlow is opened when first needed)."""

    def __init__(self, b: bundles.Bundle, data_dir: str | None, max_pixels: int, max_accuracy_drop: float | None,
                 quantize: str):
        self.labelled = parity.Labelled(b, data_dir, max_pixels)
        self.max_accuracy_drop = max_accuracy_drop
        self.calibration = None
        if quantize == "int8":
            calib, _ = self.labelled.sample("train", CALIBRATION_IMAGES, 0)
            self.calibration, _ = parity.load_batch(calib, b.image_size, max_pixels)
            if not len(self.calibration):
                raise UsageError(f"--quantize int8: no calibration images (the training images recorded in "
                                 f"{b.path / bundles.SPLITS_FILE} are gone); pass --data DIR")
        self.items, self.source = self.labelled.sample("val", PARITY_IMAGES, 1)
        self.x, self.y = parity.load_batch(self.items, b.image_size, max_pixels)
        if max_accuracy_drop is not None and not len(self.x):
            raise UsageError(f"--max-accuracy-drop {max_accuracy_drop:g}: no labelled images to measure the "
                             f"accuracy on (none recorded in {b.path / bundles.SPLITS_FILE}); pass --data DIR")
        self.b, self._probs = b, None

    def probabilities(self) -> np.ndarray:
        if self._probs is None:
            from tlcli.deploy.inference import open_engine

            self._probs = parity.run(open_engine(self.b, "tf"), self.x)
        return self._probs


def _convert(b: bundles.Bundle, fmt: Format, quantize: str, io_type: str,
             calibration: np.ndarray | None) -> tuple[list[bytes], bool]:
    from tlcli._tf import tf
    from tlcli.bundle import graphcheck
    from tlcli.bundle.savedmodel import engine_signature

    tf()  # first, so that TensorFlow's import noise is silenced
    # The converter loads the SavedModel and may constant-fold its ops: check it first.
    graphcheck.check_signature(graphcheck.check_saved_model(b.path), b)
    with bundles.tf_readable(b.path) as source:
        return fmt.module.convert(source, b, signature=engine_signature(b.path), quantize=quantize,
                                  io_type=io_type, calibration=calibration, metadata=tflite_meta.entries_for(b))


def _export(b: bundles.Bundle, fmt: Format, out: Path, ref: _Reference, quantize: str, io_type: str,
            progress: Callback) -> ExportResult:
    progress(Start("convert", total=1))
    payloads, embedded = _convert(b, fmt, quantize, io_type, ref.calibration)
    progress(End("convert", total=1, completed=1))
    targets = [out, *fmt.module.companions(out)]
    labels_path = labels_path_for(out, b, embedded=embedded, fmt=fmt)
    result = ExportResult(str(out), labels_path and str(labels_path), embedded, quantize, io_type,
                          sum(map(len, payloads)), None, 0, None, None, None, None,
                          max_accuracy_drop=ref.max_accuracy_drop, format=fmt.name, files=[str(p) for p in targets],
                          task=b.meta.task if b.meta.multi_label else None)
    progress(Start("parity", total=len(ref.x)))
    p_ref = ref.probabilities() if len(ref.x) else None
    for name in fmt.run:  # before the temporary folder: Ctrl-C inside a native import is an ImportError
        importlib.import_module(name)
    with tempfile.TemporaryDirectory(prefix="tlcli-export-") as tmp:
        measured = Path(tmp) / out.name  # measured here first: nothing lands in place before the gates
        for p, payload in zip([measured, *fmt.module.companions(measured)], payloads):
            p.write_bytes(payload)
        from tlcli.deploy.inference import open_engine

        engine = open_engine(b, fmt.name, path=measured)
        if len(ref.x):
            result = dataclasses.replace(result, **parity.compare(p_ref, parity.run(engine, ref.x), ref.y, b),
                                         parity_data=ref.source, parity_images=len(ref.x))
        one = ref.x[:1] if len(ref.x) else np.zeros((1, b.image_size, b.image_size, 3), np.float32)
        result.ms_per_image = parity.ms_per_image(engine, one)
        del engine
    progress(End("parity", total=len(ref.x), completed=len(ref.x)))
    parity.check_float(result, out)
    if ref.max_accuracy_drop is not None:
        parity.check_drop(result, out)
    _put_in_place(targets, payloads, labels_path, b)
    if not embedded:
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
