"""Every training default, every choice and every option check lives here; the CLI reads its
defaults from ``TrainConfig`` and its choices from the enums, and the library validates with
the same enums."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

from tlcli.errors import UsageError

DEFAULT_PRESET = "mobilenet_v2_100_224"  # the row of model/presets.PRESETS used by default

# Decoded pixels allowed per image. 128 MP is above any phone photo after JPEG draft
# downscaling. Pillow holds RGB in 4 bytes a pixel, so one decode at the limit peaks at about
# 0.55 GB (RGB), 0.65 GB (palette with transparency) or 1.05 GB (RGBA); decodes in flight
# share images.DECODE_MEMORY_BUDGET, so the largest run one at a time.
DEFAULT_MAX_PIXELS = 128_000_000
DEFAULT_MODEL_DIR = "tlcli-model"
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # the model input sides training accepts (and a bundle may hold)


def hub_cache_dir() -> Path:
    """Where TF Hub models are cached: ``$TFHUB_CACHE_DIR``, else ``tfhub`` in tlcli's cache folder
    (tensorflow_hub's own default is in /tmp, which a reboot empties)."""
    return Path(os.environ.get("TFHUB_CACHE_DIR") or default_cache_dir() / "tfhub")


def default_cache_dir() -> Path:
    """tlcli's cache folder (features, converted backbones): ``$TLCLI_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/tlcli``, else ``~/.cache/tlcli``."""
    env = os.environ.get("TLCLI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlcli"


class Strategy(StrEnum):
    """``--strategy``: how training is distributed (see tlcli/training/strategy.py)."""

    AUTO = "auto"
    DEFAULT = "default"
    MIRRORED = "mirrored"
    TPU = "tpu"
    MULTI_WORKER = "multi_worker"


class Precision(StrEnum):
    """``--precision`` of fine-tuning (see tlcli/training/strategy.py): ``auto`` is mixed_float16 on a GPU of
    compute capability >= 7.0, mixed_bfloat16 on a TPU, float32 on a CPU."""

    AUTO = "auto"
    FLOAT32 = "float32"
    MIXED_FLOAT16 = "mixed_float16"
    MIXED_BFLOAT16 = "mixed_bfloat16"


class Engine(StrEnum):
    """``--engine`` of predict, evaluate and serve: ``tf`` is the SavedModel, the others an exported
    format (tlcli/deploy/formats); ``auto`` is the fastest format the bundle holds, else ``tf``."""

    AUTO = "auto"
    TF = "tf"
    TFLITE = "tflite"
    ONNX = "onnx"
    OPENVINO = "openvino"


class ExportFormat(StrEnum):
    """``--format`` of export: one format of tlcli/deploy/formats, or ``all`` whose extra is installed."""

    TFLITE = "tflite"
    ONNX = "onnx"
    OPENVINO = "openvino"
    ALL = "all"


class Extractor(StrEnum):
    """``--extractor`` of train: what runs the frozen backbone for its features (see
    tlcli/model/litert.py). ``auto`` is LiteRT when TensorFlow lists no GPU or TPU."""

    AUTO = "auto"
    TF = "tf"
    LITERT = "litert"


class Quantize(StrEnum):
    """``--quantize`` of export."""

    NONE = "none"
    FLOAT16 = "float16"
    DYNAMIC = "dynamic"
    INT8 = "int8"


class IOType(StrEnum):
    """``--io-type`` of export: the dtype of the TFLite model's input and output tensors."""

    FLOAT32 = "float32"
    INT8 = "int8"
    UINT8 = "uint8"


STRATEGIES = tuple(s.value for s in Strategy)
PRECISIONS = tuple(p.value for p in Precision)
ENGINES = tuple(e.value for e in Engine)
EXPORT_FORMATS = tuple(f.value for f in ExportFormat)
EXTRACTORS = tuple(e.value for e in Extractor)
QUANTIZE = tuple(q.value for q in Quantize)
IO_TYPES = tuple(t.value for t in IOType)
# Defaults of predict and evaluate, shared by the library functions and the CLI.
PREDICT_TOP_K = 3
PREDICT_ENGINE = "auto"
EVALUATE_TOP_K = 5
EVALUATE_ENGINE = "auto"
EVALUATE_MISTAKES = 10
# Saliency overlays in evaluate's report: the most confident mistakes of mistakes.html (about a second each).
EVALUATE_OVERLAYS = 24
# A backbone download (train, audit, models fetch) ends when the server sends nothing for this long.
FETCH_TIMEOUT_SECONDS = 60.0
# Defaults of serve (tlcli/deploy/server.py): loopback only unless asked; TF Serving's REST port.
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8501
SERVE_MAX_BODY_BYTES = 64 << 20
SERVE_MAX_IMAGES = 256  # images in one request; they are decoded and classified BATCH at a time
SERVE_HEADER_SECONDS = 10.0  # a request's headers must arrive within this, from the connection or last answer
SERVE_BODY_SECONDS = 60.0  # and its body within this, once the headers are in


@dataclass
class TrainConfig:
    """One training run. Saved in the bundle's ``tlcli.json`` so nothing is asked twice."""

    data_dir: str = ""
    # One backbone, or candidates "A,B,..." / "auto" (the presets in the TF Hub cache): the head is
    # cross-validated on each one's features of the training images and the best is kept.
    backbone: str = DEFAULT_PRESET
    # A SavedModel without __call__ (a Keras 3 export) runs through a signature, taking one of its
    # outputs; None = found from the model (its only one, or serving_default).
    backbone_signature: str | None = None
    backbone_output: str | None = None
    image_size: int | None = None
    out: str = DEFAULT_MODEL_DIR
    val_split: float = 0.2
    val_dir: str | None = None
    seed: int = 0
    # A review file (``tlcli audit``'s review.csv, its actions filled in): relabels and drops applied
    # to the scanned images, never to the files (tlcli/data/labels_override.py).
    labels_override: str | None = None
    # Head phase, on cached features (tlcli/model/head.py): an epoch is one full-batch step, so the cap
    # is cheap. Early stopping on held-out folds of the training images picks the epoch count,
    # cross-validation picks the L2 strength (None = auto), then the head is refit on all of them.
    epochs: int = 300
    batch_size: int = 32              # per replica: feature extraction and fine-tuning
    learning_rate: float | None = None  # head step size; None = 1/L, the largest provably stable step
    patience: int = 20
    l2: float | None = None
    label_smoothing: float = 0.1
    class_weights: bool = True
    # Several labels a photo: one sigmoid per label, each with its own cross-validated threshold
    # (tlcli/model/multilabel.py). Implied by a labels CSV with a ``labels`` column.
    multi_label: bool = False
    # Optional fine-tuning phase: the head is first fit on all but a stratified holdout, which
    # then drives early stopping of the fine-tuning.
    holdout: float = 0.15
    dropout: float = 0.2              # in front of the head while fine-tuning
    fine_tune: bool = False
    fine_tune_epochs: int = 5
    fine_tune_learning_rate: float = 1e-4  # peak of the warm-up + cosine schedule (model/classifier.py)
    fine_tune_patience: int = 2
    # Each fine-tuning batch's gradient in slices of this many images, summed: the same update, a
    # quarter of the memory. None = 8 on the CPU, the whole batch on a GPU or TPU; 0 = whole batches.
    fine_tune_micro_batch: int | None = None
    precision: str = "auto"           # of fine-tuning; the saved model is float32 whatever it is
    augment: bool = True
    time_budget: float | str | None = None  # --time-budget: seconds or "10m"; plan in training/plan.py
    # Mirror averaging: the head learns from each training image and its left-right mirror
    # image, and the model averages the features of both (the backbone runs twice per image).
    # None = on with --fine-tune (the run that trades time for accuracy), off otherwise.
    mirror: bool | None = None
    # Machinery.
    strategy: str = "auto"
    extractor: str = "auto"           # frozen-backbone features: auto | tf | litert
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_dir: str | None = None
    tensorboard: str | None = "logs"
    force: bool = False
    resume: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_options(cls, options: dict, *, renamed: dict[str, str] | None = None) -> "TrainConfig":
        """A config from parsed options named as a command's parameters (``renamed`` maps those
        whose name differs from the field's): enums give their values, paths their text, and
        names that are not fields (``json_out``, ``ctx``) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        renamed = renamed or {}
        values = {renamed.get(k, k): v for k, v in options.items()}
        return cls(**{k: _plain(v) for k, v in values.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


DEFAULTS = TrainConfig()


MAX_SEED = 2**32 - 1  # what numpy's global seed (set by keras' set_random_seed) accepts


def _plain(value):
    """An option's value as the config stores it: an enum's value, a path's text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def check_max_pixels(max_pixels: int | None) -> None:
    """Raise ``UsageError`` unless ``max_pixels`` is None (the bundle's own limit) or >= 1."""
    if max_pixels is not None and not (_integer(max_pixels) and max_pixels >= 1):
        raise UsageError(f"--max-pixels {max_pixels}: must be >= 1")


UNKNOWN_OFF = "off"  # --unknown-threshold off: no photo is called unknown


def check_unknown_threshold(value) -> float | str | None:
    """``--unknown-threshold FLOAT|off`` checked: None (the bundle's own threshold), ``"off"``, or
    a finite number >= 0 (a string is parsed). Raises ``UsageError``."""
    if value is None or value == UNKNOWN_OFF:
        return value
    given = value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if not (_number(value) and value >= 0):
        raise UsageError(f"--unknown-threshold {given}: give a number >= 0 (a photo scoring above it is called "
                         f"unknown), or {UNKNOWN_OFF} to call none unknown")
    return float(value)


def _number(x) -> bool:
    """A finite int or float (not a bool): NaN and infinity pass no range check."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
MIN_TIME_BUDGET, MAX_TIME_BUDGET = 1.0, 7 * 24 * 3600.0


def parse_duration(value, option: str = "--time-budget") -> float:
    """Seconds from a duration: a number of seconds, or text such as ``90``, ``90s``, ``2.5m``, ``1h``.
    Raises ``UsageError`` (one line naming ``option``) for anything else, and outside
    [``MIN_TIME_BUDGET``, ``MAX_TIME_BUDGET``]."""
    seconds = None
    if _number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1:], None)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1) if number and number[0] not in "+-" else None
        except ValueError:
            seconds = None
        if seconds is not None and not math.isfinite(seconds):
            seconds = None
    if seconds is None:
        raise UsageError(f"{option} {value}: give a duration such as 90s, 10m or 1h")
    if not MIN_TIME_BUDGET <= seconds <= MAX_TIME_BUDGET:
        raise UsageError(f"{option} {value}: must be between {MIN_TIME_BUDGET:g}s and {MAX_TIME_BUDGET / 3600:g}h")
    return seconds


def time_budget_seconds(cfg: TrainConfig) -> float | None:
    """``cfg.time_budget`` in seconds, or None without one (``parse_duration``)."""
    return None if cfg.time_budget is None else parse_duration(cfg.time_budget)


def head_options(cfg: TrainConfig) -> dict:
    """The head fit's options from ``cfg``: ``head.fit_head``'s keywords, but the class weights."""
    return dict(epochs=cfg.epochs, learning_rate=cfg.learning_rate, label_smoothing=cfg.label_smoothing,
                patience=cfg.patience, seed=cfg.seed, l2=cfg.l2)


def tunes(cfg: TrainConfig) -> bool:
    """Whether the run may fine-tune: ``--fine-tune``, or a ``--time-budget`` whose plan decides."""
    return bool(cfg.fine_tune or cfg.time_budget is not None)


def validate(cfg: TrainConfig) -> None:
    """Raise ``UsageError`` for an option value that cannot work, naming the option: each
    ``TrainConfig`` field ``x_y`` is the flag ``--x-y`` of ``tlcli train``. Every float must be finite."""
    fraction = "must be a number in [0, 1)"
    checks = [
        ("--val-split", cfg.val_split, _number(cfg.val_split) and 0.0 <= cfg.val_split < 1.0, fraction),
        ("--epochs", cfg.epochs, _integer(cfg.epochs) and cfg.epochs >= 1, "must be >= 1"),
        ("--batch-size", cfg.batch_size, _integer(cfg.batch_size) and cfg.batch_size >= 1, "must be >= 1"),
        ("--learning-rate", cfg.learning_rate, cfg.learning_rate is None
         or _number(cfg.learning_rate) and cfg.learning_rate > 0, "must be a finite number > 0"),
        ("--l2", cfg.l2, cfg.l2 is None or _number(cfg.l2) and cfg.l2 >= 0, "must be a finite number >= 0"),
        ("--seed", cfg.seed, _integer(cfg.seed) and 0 <= cfg.seed <= MAX_SEED, f"must be in [0, {MAX_SEED}]"),
        ("--fine-tune-epochs", cfg.fine_tune_epochs, _integer(cfg.fine_tune_epochs) and cfg.fine_tune_epochs >= 1,
         "must be >= 1"),
        ("--fine-tune-learning-rate", cfg.fine_tune_learning_rate,
         _number(cfg.fine_tune_learning_rate) and cfg.fine_tune_learning_rate > 0, "must be a finite number > 0"),
        ("--fine-tune-micro-batch", cfg.fine_tune_micro_batch, cfg.fine_tune_micro_batch is None
         or _integer(cfg.fine_tune_micro_batch) and cfg.fine_tune_micro_batch >= 0, "must be >= 0 (0 = whole batches)"),
        ("--image-size", cfg.image_size, cfg.image_size is None
         or _integer(cfg.image_size) and MIN_IMAGE_SIZE <= cfg.image_size <= MAX_IMAGE_SIZE,
         f"must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"),
        ("--max-pixels", cfg.max_pixels, _integer(cfg.max_pixels) and cfg.max_pixels >= 1, "must be >= 1"),
        ("--dropout", cfg.dropout, _number(cfg.dropout) and 0.0 <= cfg.dropout < 1.0, fraction),
        ("--label-smoothing", cfg.label_smoothing, _number(cfg.label_smoothing)
         and 0.0 <= cfg.label_smoothing < 1.0, fraction),
        ("--holdout", cfg.holdout, _number(cfg.holdout) and 0.0 <= cfg.holdout < 1.0, fraction),
        ("--patience", cfg.patience, _integer(cfg.patience) and cfg.patience >= 1, "must be >= 1"),
        ("--fine-tune-patience", cfg.fine_tune_patience, _integer(cfg.fine_tune_patience)
         and cfg.fine_tune_patience >= 1, "must be >= 1"),
        ("--strategy", cfg.strategy, cfg.strategy in STRATEGIES, f"must be one of {', '.join(STRATEGIES)}"),
        ("--precision", cfg.precision, cfg.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
        ("--extractor", cfg.extractor, cfg.extractor in EXTRACTORS, f"must be one of {', '.join(EXTRACTORS)}"),
    ]
    for option, value, ok, why in checks:
        if not ok:
            raise UsageError(f"{option} {value}: {why}")
    _check_backbone_flags(cfg)
    time_budget_seconds(cfg)


def is_backbone_choice(backbone: str) -> bool:
    """Whether ``--backbone`` names candidates to choose from ("auto", or "A,B,...") rather than
    one backbone (a local folder whose name has a comma is one backbone)."""
    return backbone == "auto" or ("," in backbone and not Path(backbone).expanduser().is_dir())


def _check_backbone_flags(cfg: TrainConfig) -> None:
    for option, value in (("--backbone-signature", cfg.backbone_signature), ("--backbone-output", cfg.backbone_output)):
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise UsageError(f"{option} {value!r}: give a signature or output name")
        if value is not None and is_backbone_choice(cfg.backbone):
            raise UsageError(f"{option} {value}: give it with one --backbone, not with candidates "
                             f"({cfg.backbone}); each candidate's signature is found from the model")
    if cfg.backbone_signature is not None and cfg.fine_tune:
        raise UsageError(f"--backbone-signature {cfg.backbone_signature}: a backbone run through a signature "
                         "cannot be fine-tuned; train without --fine-tune")
    if cfg.backbone_signature is not None and cfg.time_budget is not None:
        raise UsageError(f"--backbone-signature {cfg.backbone_signature}: a backbone run through a signature "
                         "cannot be fine-tuned, so there is nothing to plan; train without --time-budget")
