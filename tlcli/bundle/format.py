"""The model bundle: a self-describing directory, written atomically.

Layout of ``<out>/``::

    saved_model.pb, variables/   SavedModel; signature ``serving_default``: images -> probabilities
    labels.txt                   one label per line, index = output unit
    tlcli.json                   ``BundleMeta``: labels, image size, backbone, config, metrics, versions,
                                 skipped files, exports (format ``FORMAT_VERSION``)
    splits.json                  the training and validation files (for export calibration / parity)
    model.tflite                 after ``tlcli export --tflite``
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from tlcli import __version__, files
from tlcli.errors import BundleError, OutputExistsError, TlcliError, UsageError
from tlcli.files import write_file, write_json

FORMAT_VERSION = 1
META_FILE = "tlcli.json"
LABELS_FILE = "labels.txt"
SPLITS_FILE = "splits.json"
TFLITE_FILE = "model.tflite"
FINGERPRINT_FILE = "fingerprint.pb"  # written with the SavedModel


def input_spec(image_size: int) -> dict:
    """What the ``serving_default`` signature takes, as recorded under ``input``."""
    return {"dtype": "float32", "shape": [None, image_size, image_size, 3], "range": [0.0, 1.0],
            "color": "RGB", "resize": "bilinear, antialiased, aspect ratio not kept"}


SIGNATURES = {"serving_default": "images -> probabilities",
              "serving_bytes": "image_bytes (encoded JPEG/PNG) -> probabilities, labels"}


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
    chosen by (None for a handle) and the size of its feature vector."""

    handle: str | None = None
    preset: str | None = None
    feature_dim: int | None = None


@dataclass(kw_only=True)
class DataMeta(_Section):
    """The image folders trained on (absolute paths) and the images per class of each split."""

    train_dir: str | None = None
    val_dir: str | None = None
    train_counts: dict = field(default_factory=dict)
    val_counts: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class MetricsMeta(_Section):
    """Accuracy on the training images, and on the validation images (None without them);
    ``val`` is the full ``metrics.Report.to_dict()``."""

    train_accuracy: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    val: dict | None = None


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

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("extractor") is None:
            del out["extractor"]  # a bundle of an older tlcli is written back as it was read
        return out


@dataclass(kw_only=True)
class BundleMeta(_Section):
    """The schema of tlcli.json, version ``FORMAT_VERSION``: everything predict, export and
    evaluate need to know about a trained model, and the record of how it was trained.

    ``labels`` (>= 2 distinct one-line names, index = output unit) and ``image_size`` (in
    [8, 1024]) are required. ``config`` is ``TrainConfig.to_dict()``; ``skipped`` the files
    the scan skipped (``{path, reason, detail}``); ``exports`` maps an exported file's name
    (inside the bundle) or absolute path to its ``ExportResult`` fields. ``mirror_average``:
    the head sees the mean features of each image and its left-right mirror image. ``audit``:
    what training's own data check found (``audit.train_check``: counts of train/val duplicate
    groups and likely mislabels; None, and not written, in bundles made before it).

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

    _nested: ClassVar[dict] = {"backbone": BackboneMeta, "data": DataMeta, "metrics": MetricsMeta,
                               "training": TrainingMeta}
    _absent: ClassVar[dict] = {"format_version": 0, "tlcli_version": None, "python_version": None,
                               "signatures": {}}
    _optional: ClassVar[tuple] = ("audit",)

    @classmethod
    def from_dict(cls, data, *, path: str | os.PathLike = META_FILE) -> "BundleMeta":
        """Validate parsed tlcli.json (``schema.check_meta``: types and ranges of every field
        this tlcli knows, at every level) and build it. Raises ``BundleError``, one line naming
        ``path``, the field and the fix; "made by a newer tlcli" for a format above
        ``FORMAT_VERSION``."""
        from tlcli import schema

        check_version(data, str(path))
        schema.check_meta(data, Path(path), cls)
        return cls._build(data)


def check_version(meta, where: str) -> None:
    """Raise ``BundleError`` when ``meta`` (parsed tlcli.json) has a format this tlcli cannot read."""
    from tlcli import schema

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
        """The side of the square model input, in [8, 1024]."""
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
        return labels_text(self.labels)


def labels_text(labels: list[str]) -> str:
    """labels.txt's content: one label per line, "\\n"-terminated."""
    return "".join(f"{label}\n" for label in labels)


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
    from tlcli import schema

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
    from tlcli import schema

    return schema.read_json(meta_path, schema.MAX_META_BYTES, "corrupt bundle metadata", "retrain or restore the file")

def run_meta(cfg, spec, *, splits, image_size: int, feature_dim: int, mirror: bool, reports, chosen,
             global_batch: int, state, seconds: float, extractor: str = "tf") -> BundleMeta:
    """The tlcli.json of a finished training run (``training.train``): ``cfg`` its TrainConfig,
    ``spec`` the backbone, ``splits`` the data.Splits, ``reports`` (train, val or None) metrics
    reports, ``chosen`` the strategy, ``state`` the run_state.RunState, ``extractor`` the engine
    of the frozen features. The TensorBoard folder is filled in when the bundle is written."""
    from tlcli._tf import tf

    train_report, val = reports
    return BundleMeta(
        tensorflow_version=tf().__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        labels=splits.labels, image_size=image_size, input=input_spec(image_size),
        backbone=BackboneMeta(handle=spec.handle, preset=spec.preset, feature_dim=feature_dim),
        mirror_average=mirror, config=cfg.to_dict(),
        data=DataMeta(train_dir=str(Path(cfg.data_dir).absolute()),
                      val_dir=str(Path(cfg.val_dir).absolute()) if cfg.val_dir else None,
                      train_counts=splits.counts(splits.train), val_counts=splits.counts(splits.val)),
        metrics=MetricsMeta(train_accuracy=train_report.accuracy, val_accuracy=val.accuracy if val else None,
                            val_loss=val.loss if val else None, val=val.to_dict() if val else None),
        training=TrainingMeta(strategy=chosen.description, replicas=chosen.replicas, global_batch_size=global_batch,
                              head_epochs=state.head.epochs, fine_tune_epochs=state.fine_tune.epochs_run,
                              seconds=round(seconds, 2), history=state.history, extractor=extractor),
        skipped=[s.to_dict() for s in splits.skipped])


def save(staging: str | os.PathLike, meta: BundleMeta, *, splits: dict) -> None:
    """Write a bundle's metadata into the folder ``staging``: labels.txt (from ``meta.labels``),
    tlcli.json (``meta.to_dict()``) and splits.json (``splits``: {"train": [[path, label
    index], ...], "val": [...]}), each atomically (``files.write_atomic``). Raises
    ``TlcliError`` naming the file that cannot be written."""
    staging = Path(staging)
    write_file(staging / LABELS_FILE, labels_text(meta.labels).encode("utf-8"))
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


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path`` (symlinks followed) if it is a regular file of at most ``limit``
    bytes. A FIFO, socket or device is refused without blocking on it or reading it. Raises
    ``BundleError`` naming the file."""
    path = Path(path)
    try:
        fd, st = files.open_regular(path)
    except files.NotRegularFile as exc:
        raise BundleError(f"{path}: not a regular file ({exc.kind}); the bundle is damaged "
                          "or crafted; retrain it or restore the file") from None
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; the bundle is incomplete; retrain it or restore the file") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if st.st_size <= limit else b""
        if st.st_size > limit or len(data) > limit:
            raise BundleError(f"{path}: larger than {limit // (1 << 20)} MiB, far beyond what tlcli writes; "
                              "the bundle is damaged or crafted; retrain it or restore the file")
    return data


def _real(path: str | os.PathLike) -> Path:
    """The path with every symbolic link and ``..`` resolved (also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(path: str | os.PathLike, option: str, data) -> None:
    """Refuse an output ``path`` that is, lies inside or contains one of the image folders
    ``data`` (pairs such as ("DIR", path); None paths are skipped), comparing real paths: outputs
    inside the images are trained on at the next run, and replacing a folder that holds them
    deletes them. Raises ``UsageError``."""
    real = _real(path)
    for name, folder in data:
        if not folder:
            continue
        other = _real(folder)
        why = ("is" if real == other else "lies inside" if other in real.parents
               else "contains" if real in other.parents else None)
        if why:
            raise UsageError(f"{option} {path}: {why} the image folder {name} {folder}; "
                             f"choose another {option}, outside the image folders")


def check_place(out: str | os.PathLike) -> Path:
    """Refuse an ``--out`` that no run may replace or write beside: the root, home or current
    folder or one that contains them, a symbolic link, or one whose parent folder is missing.
    Raises ``UsageError`` or ``TlcliError``."""
    from tlcli.config import DEFAULT_MODEL_DIR

    out = Path(out)
    real = _real(out)
    try:
        home = _real(Path.home())
    except (RuntimeError, KeyError):  # no HOME and no password entry
        home = None
    for name, folder in (("the root folder", Path(real.anchor)), ("the home folder", home),
                         ("the current folder", _real(Path.cwd()))):
        if folder is not None and (real == folder or real in folder.parents):
            why = "is" if real == folder else "contains"
            raise UsageError(f"--out {out}: {why} {name}; give a folder of its own for the model, "
                             f"such as --out {DEFAULT_MODEL_DIR}")
    if out.is_symlink():
        raise UsageError(f"--out {out}: is a symbolic link; give the folder itself ({real})")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise TlcliError(f"--out {out}: parent directory {parent} does not exist; create it first")
    return out


# What a bundle holds, as 'tlcli train' and 'tlcli export' write it; '--force' replaces only a
# folder holding tlcli.json and nothing else, so that it never deletes anything tlcli did not write.
_BUNDLE_FILES = {"saved_model.pb", "fingerprint.pb", LABELS_FILE, META_FILE, SPLITS_FILE, TFLITE_FILE,
                 "training_curves.png"}
_EXPORT_SUFFIXES = (".tflite", ".labels.txt")  # export --output written inside the bundle
_ATOMIC_TMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # left by files.write_atomic when a crash stopped it
_VARIABLES = re.compile(r"variables\.(index|data-\d+-of-\d+)")
_EVENTS = re.compile(r"events\.out\.tfevents\..+")


def _foreign_in(folder: Path, allowed, prefix: str) -> list[str]:
    """Entries under ``folder`` (recursively) that are links or files whose name ``allowed`` rejects."""
    foreign = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink() or (name in names and not (p.is_file() and allowed(name))):
                foreign.append(f"{prefix}/{rel / name}")
        if len(foreign) >= 3:
            break
    return foreign


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """What the folder ``path`` holds besides a bundle's files (relative names, up to a few);
    [] for a bundle. A bundle's files: saved_model.pb, fingerprint.pb, variables/ (checkpoint
    shards), assets/, labels.txt, tlcli.json, splits.json, training_curves.png, model.tflite and
    other exported ``*.tflite`` / ``*.labels.txt``, TensorBoard folders (event files only) and
    ``files.write_atomic``'s leftover temp files. Symbolic links are always foreign."""
    foreign = []
    for entry in sorted(Path(path).iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif entry.is_file():
            if not (name in _BUNDLE_FILES or name.endswith(_EXPORT_SUFFIXES) or _ATOMIC_TMP.fullmatch(name)):
                foreign.append(name)
        elif entry.is_dir():
            allowed = (_VARIABLES.fullmatch if name == "variables" else (lambda n: True) if name == "assets"
                       else _EVENTS.fullmatch)
            foreign += _foreign_in(entry, allowed, name)
        else:
            foreign.append(name)  # a FIFO, socket or device
        if len(foreign) >= 3:
            break
    return foreign


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse to replace a folder that is not a tlcli bundle (an empty folder is replaceable).
    Raises ``OutputExistsError`` naming what would be lost."""
    out = Path(out)
    try:
        if not any(out.iterdir()):
            return
        foreign = foreign_entries(out) if (out / META_FILE).is_file() else None
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot read it ({exc.strerror}); choose another --out") from None
    if foreign is None:
        raise OutputExistsError(f"--out {out}: not a tlcli model ({META_FILE} is missing), so --force will "
                                "not replace it; choose another --out")
    if foreign:
        raise OutputExistsError(f"--out {out}: holds {', '.join(foreign)}, which a tlcli model does not, so "
                                "--force will not replace it; move that out, or choose another --out")


def check_output(out: str | os.PathLike, *, force: bool, need_bytes: int = 0, data=()) -> Path:
    """Fail fast, before training, if ``out`` cannot receive a bundle: see ``check_place``,
    ``check_apart`` (with the image folders ``data``) and ``check_replaceable``; its folder must
    be writable with ``need_bytes`` free."""
    out = check_place(out)
    check_apart(out, "--out", data)
    if out.exists() and not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it, "
                                "or choose another --out")
    if out.exists() and not out.is_dir():
        raise TlcliError(f"--out {out}: is a file, not a model directory; choose another --out")
    if out.exists():
        check_replaceable(out)
    parent = out.absolute().parent
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".tlcli-probe-")
        probe.close()
    except OSError as exc:
        raise TlcliError(f"--out {out}: cannot write in {parent} ({exc.strerror}); choose another --out") from None
    check_free_space(out, need_bytes)
    return out


def space_needed(backbone_path: str | os.PathLike, *, fine_tune: bool) -> int:
    """Bytes a run writes beside --out: the bundle (about the backbone's size, plus a margin for
    metadata and curves) and, with fine-tuning, the resumable checkpoints: the last and the best,
    each holding the weights and Adam's two moments."""
    size = sum(f.stat().st_size for f in Path(backbone_path).rglob("*") if f.is_file())  # links followed
    return size + 20_000_000 + (2 * 3 * size if fine_tune else 0)


def check_free_space(out: str | os.PathLike, need_bytes: int) -> None:
    """Raise ``TlcliError`` when the folder that receives ``out`` has under ``need_bytes`` free."""
    parent = Path(out).absolute().parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise TlcliError(f"--out {out}: only {free / 1e6:.0f} MB free in {parent}, about "
                         f"{need_bytes / 1e6:.0f} MB needed; free some space or choose another --out")


def _sibling(out: str | os.PathLike, kind: str) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.{kind}"


def staging_dir(out: str | os.PathLike) -> Path:
    """A fresh hidden directory next to ``out``, to be renamed into place by ``commit``."""
    tmp = _sibling(out, f"tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def lock(out: str | os.PathLike):
    """Hold an exclusive lock on the working folder of ``out`` (``.<name>.lock`` beside it) for
    the block: a second run into the same ``out`` fails at once with ``TlcliError``. The lock
    file is removed on exit. Without ``fcntl`` (Windows) runs are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = _sibling(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise TlcliError(f"--out {out}: cannot create the lock file {path} ({exc.strerror}); "
                             "choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TlcliError(f"--out {out}: another tlcli train is writing this model (it holds {path}); "
                             "wait for it to finish, or choose another --out") from None
        try:  # the run that held it may have removed the file before we got the lock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def clean_stale(out: str | os.PathLike) -> list[str]:
    """Remove what killed runs left beside ``out``: staging folders (``.<name>.tmp-*``) and
    replaced bundles (``.<name>.old-*``). When ``out`` is missing because a run was killed
    between commit's two renames, the newest replaced bundle is renamed back to ``out`` instead.
    Call it only while holding ``lock(out)``: then none of them is in use. Returns what it did,
    as messages."""
    out = Path(out).absolute()
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        stale = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()
                 and not p.is_symlink()]
    except OSError:
        return []
    notes = []
    old = sorted((p for p in stale if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if old and not out.exists() and not out.is_symlink():
        os.rename(old[-1], out)
        stale.remove(old[-1])
        notes.append(f"restored the previous model at {out}: a run was stopped while replacing it")
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        notes.append(f"removed {len(stale)} folder(s) that stopped runs left beside {out}")
    return notes


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends (main thread only; elsewhere a no-op)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def commit(staging: Path, out: str | os.PathLike, *, force: bool) -> Path:
    """Atomically move a finished staging directory to ``out``, replacing it only if ``force``
    and ``check_replaceable`` allows. Once the new bundle is in place the commit has succeeded:
    a Ctrl-C after that only leaves the old copy for the next run's ``clean_stale``."""
    out = Path(out).absolute()
    if not out.exists():
        os.rename(staging, out)
        return out
    if not force:
        raise OutputExistsError(f"--out {out}: already exists; pass --force to replace it")
    check_replaceable(out)  # again: the folder may have changed while the model trained
    old = _sibling(out, f"old-{uuid.uuid4().hex[:8]}")
    done = False
    try:
        with _signals_deferred():  # a Ctrl-C between the two renames would leave no bundle at out
            os.rename(out, old)
            try:
                os.rename(staging, out)
            except OSError:
                os.rename(old, out)
                raise
            done = True
        shutil.rmtree(old, ignore_errors=True)
    except KeyboardInterrupt:
        if not done:
            raise
    return out
