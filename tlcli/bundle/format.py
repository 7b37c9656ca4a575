"""The bundle's format: a self-describing directory (``BundleMeta``, ``load``, ``save``); where and
how it is written safely is ``place``'s.

Layout of ``<out>/``::

    saved_model.pb, variables/   SavedModel; signature ``serving_default``: images -> probabilities
    labels.txt                   one label per line, index = output unit
    tlcli.json                   ``BundleMeta``: labels, image size, backbone, config, metrics, versions,
                                 skipped files, exports (format ``FORMAT_VERSION``)
    splits.json                  the training and validation files (for export calibration / parity)
    model.tflite                 after ``tlcli export --format tflite`` (or ``--tflite``)
    model.onnx                   after ``tlcli export --format onnx``
    openvino/model.xml, .bin     after ``tlcli export --format openvino``
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from tlcli import __version__, labels
from tlcli.bundle.schema import read_regular
from tlcli.errors import BundleError, TlcliError
from tlcli.files import write_file, write_json

FORMAT_VERSION = 1
META_FILE = "tlcli.json"
LABELS_FILE = "labels.txt"
SPLITS_FILE = "splits.json"
TFLITE_FILE = "model.tflite"
FINGERPRINT_FILE = "fingerprint.pb"  # written with the SavedModel
TASK_SINGLE_LABEL, TASK_MULTI_LABEL = "single_label", "multi_label"


def input_spec(image_size: int) -> dict:
    """What the ``serving_default`` signature takes, as recorded under ``input``."""
    return {"dtype": "float32", "shape": [None, image_size, image_size, 3], "range": [0.0, 1.0],
            "color": "RGB", "resize": "bilinear, antialiased, aspect ratio not kept"}


SIGNATURES = {"serving_default": "images -> probabilities",
              "serving_bytes": "image_bytes (encoded JPEG/PNG) -> probabilities, labels"}
UNKNOWN_SIGNATURE = {"tlcli": "images -> probabilities, unknown_score (what tlcli's engines run)"}


@dataclass(kw_only=True)
class _Section:
    """A JSON object of tlcli.json as a dataclass. Keys it does not know (a newer tlcli of the
    same format may add some) are kept in ``extra`` and written back by ``to_dict``."""

    extra: dict = field(default_factory=dict, repr=False)
    _nested: ClassVar[dict] = {}     # field name -> _Section subclass
    _absent: ClassVar[dict] = {}     # field name -> its value when the key is missing from the file
    _optional: ClassVar[tuple] = ()  # fields written only when not None (added after release 0.1.0)

    @classmethod
    def known(cls) -> list[str]:
        """The JSON keys, in the order they are written."""
        return [f.name for f in fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict:
        out = {}
        for name in self.known():
            value = getattr(self, name)
            if value is None and name in self._optional:
                continue
            out[name] = value.to_dict() if isinstance(value, _Section) else value
        return out | {k: v for k, v in self.extra.items() if k not in out}

    @classmethod
    def _build(cls, data: dict):
        """An instance from a dict already validated by ``schema``; missing keys take
        ``_absent``'s value, else the field's default."""
        known = cls.known()
        kwargs = {name: copy.deepcopy(cls._absent[name]) for name in known
                  if name not in data and name in cls._absent}
        for name in known:
            if name in data:
                section = cls._nested.get(name)
                kwargs[name] = section._build(data[name]) if section else data[name]
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


@dataclass(kw_only=True)
class BackboneMeta(_Section):
    """The frozen feature extractor: its TF Hub handle or local path, the preset name it was
    chosen by (None for a handle) and the size of its feature vector. ``signature`` and
    ``output_key``: what a SavedModel without __call__ (a Keras 3 export) ran; ``parts``: the
    handles of the backbones whose features were concatenated (``handle`` names them joined
    by " + "). Each None, and not written, otherwise."""

    handle: str | None = None
    preset: str | None = None
    feature_dim: int | None = None
    signature: str | None = None
    output_key: str | None = None
    parts: list[str] | None = None

    _optional: ClassVar[tuple] = ("signature", "output_key", "parts")


@dataclass(kw_only=True)
class DataMeta(_Section):
    """The image folders trained on (absolute paths) and the images per class of each split;
    ``test_dir`` and ``test_counts``: DIR's test/ folder (``data.split_folders``), else None
    and not written (a tlcli before them keeps them as unknown keys)."""

    train_dir: str | None = None
    val_dir: str | None = None
    train_counts: dict = field(default_factory=dict)
    val_counts: dict = field(default_factory=dict)
    test_dir: str | None = None
    test_counts: dict | None = None

    _optional: ClassVar[tuple] = ("test_dir", "test_counts")


@dataclass(kw_only=True)
class MetricsMeta(_Section):
    """Accuracy on the training images, and on the validation images (None without them);
    ``val`` is the full ``metrics.Report.to_dict()``. ``test_accuracy`` and ``test``: the same
    on DIR's test/ folder, the final report (None, and not written, without one)."""

    train_accuracy: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    val: dict | None = None
    test_accuracy: float | None = None
    test: dict | None = None

    _optional: ClassVar[tuple] = ("test_accuracy", "test")


@dataclass(kw_only=True)
class TrainingMeta(_Section):
    """How the run went: the distribution strategy, epochs run per phase, wall time, the
    per-epoch ``history`` ({phase: [{epoch, loss, ...}, ...]}), the TensorBoard folder and what
    ran the frozen backbone for the head's features (``extractor``: "tf", "litert", or "mixed" on
    a cluster whose workers disagreed; None in a bundle of an older tlcli)."""

    strategy: str | None = None
    replicas: int | None = None
    global_batch_size: int | None = None
    head_epochs: int = 0
    fine_tune_epochs: int = 0
    seconds: float | None = None
    history: dict = field(default_factory=dict)
    tensorboard: str | None = None
    extractor: str | None = None
    # The temperature folded into the head and the out-of-fold calibration error before and
    # after it (``model.calibration``); None in a bundle of an older tlcli.
    calibration: dict | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("extractor", "calibration"):
            if out.get(key) is None:
                del out[key]  # a bundle of an older tlcli is written back as it was read
        return out


@dataclass(kw_only=True)
class BundleMeta(_Section):
    """The schema of tlcli.json, version ``FORMAT_VERSION``: everything predict, export and
    evaluate need to know about a trained model, and the record of how it was trained.

    ``task``: "multi_label" for a model of one sigmoid per label, with ``thresholds`` (one per
    label, in [0, 1]); "single_label" (softmax), or absent in an older bundle, for one label a photo.

    ``labels`` (>= 2 distinct one-line names, index = output unit) and ``image_size`` (in
    ``config.MIN_IMAGE_SIZE`` .. ``MAX_IMAGE_SIZE``) are required. ``config`` is
    ``TrainConfig.to_dict()``; ``skipped`` the files
    the scan skipped (``{path, reason, detail}``); ``exports`` maps an exported file's name
    (inside the bundle) or absolute path to its ``ExportResult`` fields. ``mirror_average``:
    the head sees the mean features of each image and its left-right mirror image. ``audit``:
    what training's own data check found (``findings.train_check``: counts of train/val duplicate
    groups and likely mislabels; None, and not written, in bundles made before it).
    ``labels_override``: the review file applied with ``--labels-override`` ({file, sha256, rows,
    relabelled, dropped, kept}; ``data.labels_override``), None and not written without one.
    ``time_budget`` (seconds) and ``plan``: a ``--time-budget`` run's budget and plan
    (``training.plan.Plan``). ``unknown``: the unknown detector (``features.unknown``: method,
    threshold, target_rate, oof_rate, ...), with the SavedModel's ``tlcli`` signature.
    ``backbone_choice``: the leaderboard of ``--backbone A,B|auto``, its winner and why.
    ``test_time_augmentation``: the crop views' test (``features.tta.Decision``). Each of these
    is None, and not written, when it does not apply.

    A new instance is stamped with this tlcli's and Python's versions. ``from_dict`` reads a
    file of any format up to ``FORMAT_VERSION``: a key missing from an older file takes its
    default (the versions: None), and keys this tlcli does not know are kept, at every level.
    """

    format_version: int = FORMAT_VERSION
    tlcli_version: str | None = field(default_factory=lambda: __version__)
    python_version: str | None = field(default_factory=platform.python_version)
    tensorflow_version: str | None = None
    created: str | None = None
    labels: list[str]
    image_size: int
    input: dict | None = None
    signatures: dict = field(default_factory=lambda: dict(SIGNATURES))
    backbone: BackboneMeta = field(default_factory=BackboneMeta)
    mirror_average: bool = False
    config: dict = field(default_factory=dict)
    data: DataMeta = field(default_factory=DataMeta)
    metrics: MetricsMeta = field(default_factory=MetricsMeta)
    training: TrainingMeta = field(default_factory=TrainingMeta)
    skipped: list[dict] = field(default_factory=list)
    exports: dict[str, dict] = field(default_factory=dict)
    audit: dict | None = None
    unknown: dict | None = None
    labels_override: dict | None = None
    backbone_choice: dict | None = None
    task: str | None = None
    thresholds: list[float] | None = None
    time_budget: float | None = None
    plan: dict | None = None
    test_time_augmentation: dict | None = None

    _nested: ClassVar[dict] = {"backbone": BackboneMeta, "data": DataMeta, "metrics": MetricsMeta,
                               "training": TrainingMeta}
    _absent: ClassVar[dict] = {"format_version": 0, "tlcli_version": None, "python_version": None,
                               "signatures": {}}
    _optional: ClassVar[tuple] = ("audit", "unknown", "labels_override", "backbone_choice", "task", "thresholds",
                                  "time_budget", "plan", "test_time_augmentation")

    @property
    def multi_label(self) -> bool:
        """Whether the model gives one independent probability per label (rows need not sum to 1)."""
        return self.task == TASK_MULTI_LABEL

    @classmethod
    def from_dict(cls, data, *, path: str | os.PathLike = META_FILE) -> "BundleMeta":
        """Validate parsed tlcli.json (``schema.check_meta``: types and ranges of every field
        this tlcli knows, at every level) and build it. Raises ``BundleError``, one line naming
        ``path``, the field and the fix; "made by a newer tlcli" for a format above
        ``FORMAT_VERSION``."""
        from tlcli.bundle import schema

        check_version(data, str(path))
        schema.check_meta(data, Path(path), cls)
        return cls._build(data)


def check_version(meta, where: str) -> None:
    """Raise ``BundleError`` when ``meta`` (parsed tlcli.json) has a format this tlcli cannot read."""
    from tlcli.bundle import schema

    version = meta.get("format_version", 0) if isinstance(meta, dict) else 0
    if type(version) is int and version > FORMAT_VERSION:
        raise BundleError(f"{where}: made by a newer tlcli ({schema.show(meta.get('tlcli_version'))}, "
                          f"format {version}); this tlcli ({__version__}) reads format {FORMAT_VERSION} and "
                          "older: use the tlcli release or checkout that trained it, or a newer one")


@dataclass
class Bundle:
    """What predict, export and evaluate need to know about a trained model, validated by
    ``load``: ``meta`` is the parsed tlcli.json, and ``recorded_splits`` the parsed
    splits.json (None when the bundle has none)."""

    path: Path
    meta: BundleMeta
    recorded_splits: dict | None = None

    @property
    def labels(self) -> list[str]:
        """>= 2 distinct one-line class names; index = output unit."""
        return self.meta.labels

    @property
    def image_size(self) -> int:
        """The side of the square model input, in [config.MIN_IMAGE_SIZE, config.MAX_IMAGE_SIZE]."""
        return self.meta.image_size

    @property
    def max_pixels(self) -> int:
        """The decoded-pixel limit the model was trained with (predict/evaluate/export default)."""
        from tlcli.config import DEFAULT_MAX_PIXELS

        return int(self.meta.config.get("max_pixels") or DEFAULT_MAX_PIXELS)

    @property
    def tflite_path(self) -> Path:
        return self.path / TFLITE_FILE

    def splits(self) -> dict:
        """{"train": [[path, label_index], ...], "val": [...]} as recorded at training time
        (validated by ``load``; empty lists when the bundle has no splits.json)."""
        s = self.recorded_splits or {}
        return {"train": list(s.get("train", [])), "val": list(s.get("val", []))}

    def fingerprint(self) -> str | None:
        """A digest of the SavedModel (its ``fingerprint.pb``, which hashes the graph and the
        variables), or None when the bundle has none. Export embeds it in the .tflite, so that
        another bundle's file is recognised even with the same labels."""
        import hashlib

        p = self.path / FINGERPRINT_FILE
        if not p.exists():
            return None
        return hashlib.blake2b(read_regular(p, 1 << 20), digest_size=16).hexdigest()

    def labels_text(self) -> str:
        """labels.txt's content, from the validated labels: one per line, "\\n"-terminated."""
        return labels.to_text(self.labels)


@contextlib.contextmanager
def tf_readable(path: str | os.PathLike):
    """Yield a path TensorFlow can open for ``path``. TF globs SavedModel paths, so a folder
    named like "runs [old]" is not found; such a path is reached through a plain-named link."""
    path = Path(path).absolute()
    if not any(c in str(path) for c in "[]*?"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tlcli-") as tmp:
        link = Path(tmp) / "model"
        os.symlink(path, link, target_is_directory=True)
        yield link


def load(model_dir: str | os.PathLike) -> Bundle:
    """Read and validate a bundle's metadata (``BundleMeta.from_dict``, ``schema.check_splits``):
    every file is opened only if it is a regular file, and read up to a size bound. Raises
    ``BundleError``, one line naming the file, what is wrong and the fix."""
    from tlcli.bundle import schema

    path = Path(model_dir)
    if not path.exists():
        raise BundleError(f"--model {path}: no such directory; train one with 'tlcli train DIR --out {path}'")
    if not path.is_dir():
        raise BundleError(f"--model {path}: not a directory; give the model directory that 'tlcli train' wrote")
    meta_path = path / META_FILE
    if not meta_path.exists() and not meta_path.is_symlink():
        raise BundleError(f"--model {path}: not a tlcli model ({META_FILE} is missing); "
                          "give the directory that 'tlcli train' wrote")
    raw = _read_meta(meta_path)
    check_version(raw, f"--model {path}")
    meta = BundleMeta.from_dict(raw, path=meta_path)
    splits_path = path / SPLITS_FILE
    splits = None
    if splits_path.exists() or splits_path.is_symlink():
        splits = schema.check_splits(schema.read_json(splits_path, schema.MAX_SPLITS_BYTES, *schema.SPLITS_FIX),
                                     len(meta.labels), splits_path)
    return Bundle(path=path, meta=meta, recorded_splits=splits)


def _read_meta(meta_path: Path):
    from tlcli.bundle import schema

    return schema.read_json(meta_path, schema.MAX_META_BYTES, "corrupt bundle metadata", "retrain or restore the file")


def save(staging: str | os.PathLike, meta: BundleMeta, *, splits: dict) -> None:
    """Write a bundle's metadata into the folder ``staging``: labels.txt (from ``meta.labels``),
    tlcli.json (``meta.to_dict()``) and splits.json (``splits``: {"train": [[path, label
    index], ...], "val": [...]}), each atomically (``files.write_atomic``). Raises
    ``TlcliError`` naming the file that cannot be written."""
    staging = Path(staging)
    write_file(staging / LABELS_FILE, labels.to_text(meta.labels).encode("utf-8"))
    write_json(staging / META_FILE, meta.to_dict())
    write_file(staging / SPLITS_FILE, splits_text(splits).encode("ascii"))


def splits_text(splits: dict) -> str:
    """splits.json's text: standard JSON, ASCII, one [path, label] entry a line. (json's indent
    runs its pure-Python encoder: 13 s for a million images; this encodes each path with json's
    C string encoder.)"""
    from json.encoder import encode_basestring_ascii as quoted

    parts = []
    for key in ("train", "val"):
        rows = ",\n".join(f"    [{quoted(str(p))}, {int(label)}]" for p, label in splits.get(key, []))
        parts.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def record_export(b: Bundle, name: str, entry: dict) -> str | None:
    """Add ``entry`` (an export's result) as ``exports[name]`` in the bundle's tlcli.json,
    atomically, and in ``b.meta``. The file is read again first, so that an export recorded
    since ``b`` was loaded is kept. Returns None when recorded, else a warning that says why
    not (a read-only bundle, a full disk, a file damaged meanwhile): the export itself stands."""
    meta_path = b.path / META_FILE
    b.meta.exports[name] = entry  # the export happened, whether or not the file records it
    try:
        current = BundleMeta.from_dict(_read_meta(meta_path), path=meta_path)
        current.exports[name] = entry
        write_json(meta_path, current.to_dict())
    except TlcliError as exc:  # BundleError included
        return f"the export is not recorded in the bundle's {META_FILE}: {exc}"
    return None


