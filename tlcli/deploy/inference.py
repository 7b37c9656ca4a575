"""Prediction from a bundle, with TensorFlow (the SavedModel) or an exported format (``formats``:
LiteRT, onnxruntime, OpenVINO), and the one engine opener.

Only the TensorFlow engine imports TensorFlow: decoding is the project's Pillow decoder and the
preprocessing is the same numpy code the training pipeline uses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tlcli import bundle as bundles
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    ENGINES,
    PREDICT_ENGINE,
    PREDICT_TOP_K,
    UNKNOWN_OFF,
    check_max_pixels,
    check_unknown_threshold,
)
from tlcli.data import image_files, images, walk
from tlcli.deploy import formats
from tlcli.deploy.formats.outputs import checked_outputs, checked_probabilities, run_error  # noqa: F401
from tlcli.deploy.formats.tflite_format import TFLiteEngine  # noqa: F401 (its home before the registry)
from tlcli.errors import BundleError, ImageError, UsageError


@dataclass
class Prediction:
    """``predictions`` is a list of {"label", "probability"}, best first; ``error`` is None or a
    message (the file could not be used); ``overlay`` the saliency overlay written for it
    (``predict --explain``), else None and left out of ``to_dict``. ``labels``: of a multi-label
    model, the names of every label at or above its threshold, most probable first (each also in
    ``predictions``); None, and not in ``to_dict``, for a single-label model. With a bundle's
    unknown detector (``features.unknown``), ``unknown_score`` (larger: less like the training
    photos) and ``unknown`` (it is above the threshold); both None, and left out of ``to_dict``,
    without one."""

    path: str
    predictions: list[dict] = field(default_factory=list)
    error: str | None = None
    labels: list[str] | None = None
    overlay: str | None = None
    unknown: bool | None = None
    unknown_score: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("labels", "overlay", "unknown", "unknown_score"):
            if d[key] is None:
                del d[key]
        return d


def _file_error(p: str, exc: ImageError) -> str:
    """The per-file message for a path that could not be loaded."""
    if os.path.isdir(p):
        try:
            with os.scandir(p):
                pass
        except OSError as err:
            return f"{p}: cannot read this folder ({err.strerror})"
        return f"{p}: folder with no files to classify"
    if exc.reason == image_files.UNREADABLE and not os.path.lexists(p):
        return f"{p}: no such file"
    return str(exc)


class TFEngine:
    """The bundle's SavedModel through TensorFlow: its ``tlcli`` signature (probabilities and
    the unknown score) when it has one, else ``serving_default`` (``savedmodel.engine_signature``).
    Before TensorFlow loads it, ``graphcheck`` refuses a SavedModel that could run anything but
    image classification (file, system or Python ops) or whose signatures disagree with
    tlcli.json. Raises ``BundleError``."""

    name = "tf"

    def __init__(self, bundle: bundles.Bundle):
        from tlcli._tf import tf
        from tlcli.bundle import graphcheck, savedmodel

        t = tf()  # first, so that TensorFlow's import noise is silenced (graphcheck's proto needs TF)
        proto = graphcheck.check_saved_model(bundle.path)
        graphcheck.check_signature(proto, bundle)
        self.signature = savedmodel.signature_of(proto)
        try:
            with bundles.tf_readable(bundle.path) as path:
                loaded = t.saved_model.load(str(path))
            self.fn = loaded.signatures[self.signature]
            self.scores_unknown = self.signature == savedmodel.ENGINE_SIGNATURE
        except Exception as exc:
            raise BundleError(f"--model {bundle.path}: the SavedModel cannot be loaded ({type(exc).__name__}); "
                              "the bundle is corrupt; retrain it") from None
        self._keep = loaded
        self.t = t
        self.where, self.classes = bundle.path / graphcheck.SAVED_MODEL_FILE, len(bundle.labels)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """{"probabilities": float32 [n, classes], and "unknown_score": float32 [n] with a detector}."""
        try:
            found = {name: value.numpy() for name, value in self.fn(images=self.t.constant(batch)).items()}
        except Exception as exc:  # a crafted graph that fails at run time (Assert, Reshape ...)
            raise run_error(self.where, exc) from None
        return checked_outputs(found, len(batch), self.classes, self.where)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)["probabilities"]


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: unknown; choose one of {', '.join(ENGINES)}")


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: must be >= 1")


def resolve_engine(bundle: bundles.Bundle, engine: str = PREDICT_ENGINE, *, path: Path | None = None) -> str:
    """The engine to run: "tf" or a format of ``formats.FORMATS``. ``auto`` picks the first of
    ``formats.AUTO_ORDER`` (fastest first, as measured) whose file the bundle holds (``path`` for
    that format when given) and whose runtime is installed, else TensorFlow. A named engine is
    taken as given; its runtime is required (``UsageError`` naming the extra to install)."""
    check_engine(engine)
    if engine == "auto":
        return next((name for name in formats.AUTO_ORDER if _held(bundle, formats.get(name), path)), "tf")
    if engine != "tf":
        formats.get(engine).require("--engine")
    return engine


def _held(bundle: bundles.Bundle, fmt: formats.Format, path: Path | None) -> bool:
    where = path if path is not None and Path(path).suffix == fmt.suffix else fmt.path_in(bundle.path)
    return (where.exists() or where.is_symlink()) and fmt.missing() is None


def open_engine(bundle: bundles.Bundle, engine: str = PREDICT_ENGINE, *, path: Path | None = None,
                num_threads: int | None = None):
    """The engine ``resolve_engine`` picks, loaded: every command that runs a bundle opens its
    engine here. ``path``: the exported file to run instead of the bundle's own; ``num_threads``:
    the runtime's threads (default: its own choice, about one per CPU)."""
    name = resolve_engine(bundle, engine, path=path)
    if name == "tf":
        return TFEngine(bundle)
    fmt = formats.get(name)
    return fmt.module.Engine(bundle, path if path is not None and Path(path).suffix == fmt.suffix else None,
                             num_threads=num_threads)


def iter_predict(paths: list[str], *, bundle: bundles.Bundle, engine, top_k: int = PREDICT_TOP_K,
                 batch_size: int = 32, max_pixels: int | None = None,
                 threshold: float | None = None,
                 unknown_threshold: float | None = None) -> Iterator[tuple[Prediction, np.ndarray | None]]:
    """Yield (Prediction, probabilities or None) per path, in order. Bad files get ``error``.
    ``max_pixels`` defaults to the limit the model was trained with. Of a multi-label bundle,
    ``predictions`` holds at least every label at or above its threshold (``thresholds``).
    ``unknown_threshold`` (``unknown_threshold_for``): with an engine that gives the unknown score,
    each Prediction gets it and ``unknown`` (score above the threshold); None leaves both out."""
    size = bundle.image_size
    max_pixels = max_pixels or bundle.max_pixels
    k = max(1, min(top_k, len(bundle.labels)))
    cuts = thresholds(bundle, threshold)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x, errors = images.decode_batch(chunk, lambda p: images.load_for_model(p, size, max_pixels=max_pixels))
        rows, scores = paired_outputs({} if x is None else engine_outputs(engine, x), errors, unknown_threshold)
        for p, err, row, score in zip(chunk, errors, rows, scores):
            if err is not None:
                yield Prediction(p, [], _file_error(p, err), [] if cuts is not None else None), None
            else:
                yield prediction(p, row, bundle.labels, k, cuts, score, unknown_threshold), row


def paired_outputs(found: dict, errors: list, threshold: float | None) -> tuple[list, list]:
    """(each item's probabilities, each item's unknown score) of the engine's outputs ``found``
    for a batch of ``decode_batch`` (``images.paired``: None for an item that did not decode);
    the scores all None without a threshold or without scores in ``found``."""
    rows = images.paired(errors, found.get("probabilities"))
    if threshold is None or "unknown_score" not in found:
        return rows, [None] * len(errors)
    return rows, images.paired(errors, found["unknown_score"])


def prediction(path: str, row: np.ndarray, labels: list[str], k: int, cuts: np.ndarray | None,
               score: float | None = None, unknown_threshold: float | None = None) -> Prediction:
    """The Prediction of one image's probabilities ``row``: its ``k`` best labels; with ``cuts``
    (a multi-label model's thresholds, ``thresholds``) also the labels at or above them, every
    one of them among the ranked ones; with an unknown ``score``, it and whether it is above
    ``unknown_threshold``."""
    unknown = {} if score is None else {"unknown": bool(score > unknown_threshold), "unknown_score": float(score)}
    if cuts is None:
        return Prediction(path, ranked(row, labels, k), **unknown)
    names = [labels[i] for i in np.argsort(-row, kind="stable") if row[i] >= cuts[i]]
    return Prediction(path, ranked(row, labels, max(k, len(names))), labels=names, **unknown)


def thresholds(bundle: bundles.Bundle, threshold: float | None = None) -> np.ndarray | None:
    """A multi-label bundle's threshold per label (float32 [L]): ``threshold`` for every label when
    given, else the bundle's own; None for a single-label bundle. Raises ``UsageError`` for a
    ``threshold`` outside [0, 1], or given for a single-label bundle."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: must be in [0, 1]")
    if not bundle.meta.multi_label:
        if threshold is not None:
            raise UsageError(f"--threshold {threshold}: --model {bundle.path} is a single-label model (it picks "
                             "the most probable label); drop --threshold")
        return None
    if threshold is not None:
        return np.full(len(bundle.labels), threshold, np.float32)
    return np.asarray(bundle.meta.thresholds, np.float32)


def engine_outputs(engine, batch: np.ndarray) -> dict[str, np.ndarray]:
    """``engine.outputs(batch)``; for a plain function of a batch (no ``outputs``), its
    probabilities alone."""
    outputs = getattr(engine, "outputs", None)
    return outputs(batch) if outputs is not None else {"probabilities": engine(batch)}


def unknown_threshold_for(b: bundles.Bundle, option=None, engine=None) -> float | None:
    """The score above which a photo is called unknown: the bundle's (tlcli.json ``unknown``),
    ``option`` (``--unknown-threshold``: a number, or ``"off"``: infinity, so none is, the score
    still given), or None for a bundle without a detector. Raises ``UsageError`` for a number
    given to a bundle without one, ``BundleError`` when ``engine`` (opened) cannot score it."""
    option = check_unknown_threshold(option)
    recorded = b.meta.unknown
    if recorded is None:
        if option not in (None, UNKNOWN_OFF):
            raise UsageError(f"--unknown-threshold {option:g}: the model {b.path} has no unknown detector (trained "
                             "by an older tlcli, or on too few images); leave the option out, or retrain it")
        return None
    if option == UNKNOWN_OFF:
        return float("inf")
    if engine is not None and not getattr(engine, "scores_unknown", True):
        raise BundleError(f"{getattr(engine, 'path', b.path)}: gives no unknown score (exported before it was "
                          f"added); re-export it with 'tlcli export --tflite --force --model {b.path}', or pass "
                          "--engine tf, or --unknown-threshold off")
    return float(recorded["threshold"]) if option is None else option


def ranked(row: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The ``k`` best of one image's probabilities as {"label", "probability"}, best first (ties in
    label order)."""
    order = np.argsort(-row, kind="stable")[:k]
    return [{"label": labels[i], "probability": float(row[i])} for i in order]


def predict(paths: Iterable[str | os.PathLike], *, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR,
            top_k: int = PREDICT_TOP_K, engine: str = PREDICT_ENGINE,
            max_pixels: int | None = None, threshold: float | None = None,
            unknown_threshold: float | str | None = None) -> list[Prediction]:
    """Top-k predictions for files and/or folders (of a multi-label model, also the labels at or
    above their thresholds: ``threshold`` for all of them when given), each with ``unknown`` and
    ``unknown_score`` when the bundle has an unknown detector (``unknown_threshold``: None for
    the bundle's own threshold, a number >= 0, or "off"). Never raises for a bad image (see
    ``error``); raises ``BundleError`` / ``UsageError`` for a bad model or option."""
    b, eng, files = prepare(paths, model_dir=model_dir, top_k=top_k, engine=engine, max_pixels=max_pixels,
                            threshold=threshold, unknown_threshold=unknown_threshold)
    return [p for p, _ in iter_predict(files, bundle=b, engine=eng, top_k=top_k, max_pixels=max_pixels,
                                       threshold=threshold,
                                       unknown_threshold=unknown_threshold_for(b, unknown_threshold, eng))]


def prepare(paths: Iterable[str | os.PathLike], *, model_dir: str | os.PathLike, top_k: int, engine: str,
            max_pixels: int | None, threshold: float | None = None,
            unknown_threshold: float | str | None = None) -> tuple[bundles.Bundle, object, list[str]]:
    """Check the options, load the bundle and its engine, and expand folders: everything that can
    fail as a whole before the first image is classified. Returns (bundle, engine, files); the
    unknown threshold is then ``unknown_threshold_for(bundle, unknown_threshold, engine)``."""
    check_top_k(top_k)
    check_max_pixels(max_pixels)
    check_unknown_threshold(unknown_threshold)
    b = bundles.load(model_dir)
    thresholds(b, threshold)
    unknown_threshold_for(b, unknown_threshold)  # an option the bundle cannot take fails before the engine loads
    return b, open_engine(b, engine), walk.expand(paths)
