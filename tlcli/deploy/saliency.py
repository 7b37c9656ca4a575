"""Saliency: which pixels of a photo drove the model's guess, drawn as a heat map over the photo.

``hub.KerasLayer`` hides the backbone's layers, so Grad-CAM on an inner layer is not available;
the gradient does flow to the input of the bundle's SavedModel (``serving_default``: images ->
probabilities). The map is SmoothGrad: the gradient of the predicted class's log-odds
(``log p_c - log sum_{j != c} p_j``) with respect to the input image, in absolute value, summed
over the colour channels and averaged over ``SAMPLES`` copies of the image with Gaussian noise
(standard deviation ``NOISE`` of the [0, 1] range) added. The log-odds rather than the
probability: a confident probability saturates and its gradient vanishes; the log-odds' does
not (for two classes it is the difference of the logits).

The overlay shows the model's view of the photo (the central crop, at its own aspect ratio) with
the map blended over it: transparent where the map is low, purple to yellow as it rises. Only
TensorFlow computes the map (LiteRT has no gradients), imported when an ``Explainer`` is made.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter

from tlcli import bundle as bundles
from tlcli import files
from tlcli.bundle.graphcheck import SAVED_MODEL_FILE
from tlcli.config import DEFAULT_MODEL_DIR, PREDICT_ENGINE, PREDICT_TOP_K, check_max_pixels
from tlcli.data import image_files, images, walk
from tlcli.deploy import inference
from tlcli.errors import BundleError, ImageError, OutputExistsError, UsageError
from tlcli.progress import Advance, Callback, End, Start, silent

SAMPLES = 16  # noisy copies per image, each through the model and back
SAMPLE_BATCH = 8  # noisy copies per pass through the model and back (MobileNetV2 at 224: +0.7 GB at the peak)
NOISE = 0.15  # SmoothGrad's noise, as a share of the input range (its paper finds 10-20% best)
OVERLAY_SIDE = 320  # the longer side of an overlay, in pixels
_PERCENTILE = 99.0  # the map's value shown at full strength: one hot pixel does not wash out the rest
# The colours of the map, from low to high (purple, red, orange, pale yellow); alpha rises with it.
_RAMP = np.array([[0.0, 70, 20, 140], [0.4, 220, 40, 40], [0.7, 255, 160, 0], [1.0, 255, 255, 170]], np.float32)
_MAX_ALPHA = 0.7


class Explainer:
    """SmoothGrad maps of the bundle's SavedModel, through a loaded ``inference.TFEngine`` (or
    ``bundle``, loaded here). ``samples`` >= 1 noisy copies per image; ``seed`` makes the noise,
    and so every map, reproducible. Raises ``BundleError`` (as ``TFEngine``)."""

    def __init__(self, bundle: bundles.Bundle, *, engine: inference.TFEngine | None = None, samples: int = SAMPLES,
                 noise: float = NOISE, seed: int = 0):
        if samples < 1 or not noise >= 0:
            raise UsageError(f"samples {samples}, noise {noise}: need samples >= 1 and noise >= 0")
        self.bundle = bundle
        self.engine = engine if engine is not None else inference.TFEngine(bundle)
        self.samples, self.noise, self.seed = samples, noise, seed

    def saliency(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """(map, class) for one model input ``x`` (float32 [S, S, 3] in [0, 1]): the map is
        float32 [S, S], >= 0, summing to 1 (all zeros when the gradient is zero everywhere); the
        class is the index the model predicts for ``x`` itself, whose log-odds the map explains.
        The noisy copies go through the model ``SAMPLE_BATCH`` at a time, which bounds the
        memory the backward pass holds. Raises ``BundleError`` when the model fails."""
        c = int(np.argmax(self.engine(x[None])[0]))
        rng = np.random.default_rng(self.seed)
        noisy = x[None] + rng.normal(0.0, self.noise, (self.samples, *x.shape)).astype(np.float32)
        m = np.zeros(x.shape[:2], np.float64)
        for start in range(0, self.samples, SAMPLE_BATCH):
            m += self._gradient(noisy[start:start + SAMPLE_BATCH], c)
        total = float(m.sum())
        if not np.isfinite(total) or total <= 0:  # no path from the input to the output: nothing to show
            return np.zeros(x.shape[:2], np.float32), c
        return (m / total).astype(np.float32), c

    def _gradient(self, batch: np.ndarray, c: int) -> np.ndarray:
        """The sum over ``batch`` and the colour channels of |d log-odds of class ``c`` / d pixel|,
        float64 [S, S]. Raises ``BundleError``."""
        t = self.engine.t
        images = t.constant(batch)
        others = t.constant(np.arange(self.engine.classes) != c, t.float32)
        tiny = t.constant(np.finfo(np.float32).tiny)
        try:
            with t.GradientTape() as tape:
                tape.watch(images)
                probs = self.engine.fn(images=images)["probabilities"]
                inference.checked_probabilities(probs.numpy(), len(batch), self.engine.classes, self.engine.where)
                # The others' probabilities summed, not 1 - p_c, which rounds to 0 when p_c is near 1.
                log_odds = t.math.log(probs[:, c] + tiny) - t.math.log(t.reduce_sum(probs * others, axis=1) + tiny)
                target = t.reduce_sum(log_odds)
            grad = tape.gradient(target, images)
        except BundleError:
            raise
        except Exception as exc:  # a crafted graph that fails at run time, or has no gradient
            raise BundleError(f"{self.engine.where}: the model failed computing a saliency map "
                              f"({type(exc).__name__}); the bundle is damaged or crafted; retrain it") from None
        if grad is None:
            return np.zeros(batch.shape[1:3])
        return np.abs(grad.numpy()).astype(np.float64).sum(axis=(0, 3))

    def overlay_png(self, data: bytes, *, path: str = "<bytes>", max_pixels: int | None = None) -> tuple[bytes, int]:
        """(the PNG bytes of the overlay, the class explained) for one encoded image, decoded
        and preprocessed as ``tlcli predict`` does. Raises ``ImageError`` (named ``path``),
        ``BundleError``."""
        size = self.bundle.image_size
        img = images.decode(data, path=path, min_size=images.decode_size(size),
                            max_pixels=max_pixels or self.bundle.max_pixels)
        m, c = self.saliency(images.to_model_input(img, size))
        view = overlay(img.crop(images.central_box(*img.size)), m)
        buf = io.BytesIO()
        view.save(buf, "PNG")
        return buf.getvalue(), c

    def write_overlay(self, path: str | os.PathLike, out: str | os.PathLike, *,
                      max_pixels: int | None = None) -> tuple[Path, int]:
        """(``out``, the class explained): the overlay of the image file ``path``, written
        atomically to ``out``. Raises ``ImageError``, ``BundleError``, ``TlcliError`` (cannot
        write)."""
        size = self.bundle.image_size
        max_pixels = max_pixels or self.bundle.max_pixels
        data = image_files.read_bytes(path, min_size=images.decode_size(size), max_pixels=max_pixels)
        png, c = self.overlay_png(data, path=str(path), max_pixels=max_pixels)
        files.write_file(out, png)
        return Path(out), c


def can_explain(bundle: bundles.Bundle) -> bool:
    """Whether the bundle has its SavedModel, whose gradients a map needs (a bundle could keep
    only model.tflite)."""
    return (bundle.path / SAVED_MODEL_FILE).exists()


def overlay(photo: Image.Image, saliency: np.ndarray, *, side: int = OVERLAY_SIDE) -> Image.Image:
    """``photo`` (RGB) scaled so that its longer side is ``side``, with ``saliency`` (float
    [h, w], >= 0, any scale) stretched over it and blended in: alpha and colour rise with the
    map, normalised so that its ``_PERCENTILE``-th percentile is full strength."""
    w, h = photo.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(photo.convert("RGB").resize(size, Image.Resampling.BILINEAR), np.float32)
    m = np.nan_to_num(np.asarray(saliency, np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    top = np.percentile(m, _PERCENTILE) if m.size else 0.0
    v8 = np.zeros_like(m, np.uint8) if top <= 0 else np.rint(255 * np.clip(m / top, 0, 1)).astype(np.uint8)
    heat = Image.fromarray(v8, "L").resize(size, Image.Resampling.BILINEAR)
    heat = heat.filter(ImageFilter.GaussianBlur(radius=max(size) / 100))
    v = np.asarray(heat, np.float32)[..., None] / 255.0
    colour = np.stack([np.interp(v[..., 0], _RAMP[:, 0], _RAMP[:, k]) for k in (1, 2, 3)], axis=-1)
    alpha = _MAX_ALPHA * v
    return Image.fromarray(np.rint(base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8), "RGB")


def overlay_name(path: str | os.PathLike) -> str:
    """The overlay file name for the image at ``path``: its name (at most 100 bytes of it), a
    short digest of its absolute path (so two photos of the same name in different folders do
    not collide, and the same photo always gets the same name), ``.png``."""
    p = Path(os.path.abspath(path))
    digest = hashlib.blake2b(os.fsencode(str(p)), digest_size=4).hexdigest()
    stem = os.fsdecode(os.fsencode(p.name)[:100]).replace(os.sep, "_")
    return f"{stem}.{digest}.png"


def plan_overlays(paths: list[str], out_dir: str | os.PathLike, *, inputs=(), force: bool = False,
                  option: str = "--explain") -> dict[str, Path]:
    """{image path: its overlay's path in ``out_dir``}, before any work: ``out_dir`` is created
    (``UsageError`` when it cannot be, or when it is, lies inside or contains one of the image
    folders ``inputs``); ``OutputExistsError`` when an overlay is already there, unless
    ``force``."""
    out = Path(out_dir)
    files.check_apart(out, option, [("PATH", p) for p in inputs if os.path.isdir(p)])
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out}: is a file; give a folder for the overlays")
    files.make_folder(out, option)
    plan = {p: out / overlay_name(p) for p in paths}
    if not force:
        for p, target in plan.items():
            if target.exists() or target.is_symlink():
                raise OutputExistsError(f"{option} {out}: {target.name} (the overlay of {p}) exists; choose "
                                        "another folder, or pass --force to replace it")
    return plan


def write_overlays(paths: list[str], out_dir: str | os.PathLike, *, bundle: bundles.Bundle,
                   max_pixels: int | None = None, engine: inference.TFEngine | None = None,
                   progress: Callback = silent) -> dict[str, tuple[Path, str]]:
    """{path: (its overlay in ``out_dir``, the label explained)} for each image of ``paths`` that
    can still be read (one that cannot is left out), ``out_dir`` created; ``Start``, ``Advance``
    and ``End`` events of the task "saliency". ``engine``: the bundle's SavedModel already
    loaded, else it is loaded here. Raises ``BundleError``, ``TlcliError``."""
    if not paths:
        return {}
    explainer = Explainer(bundle, engine=engine)
    out = files.make_folder(Path(out_dir), str(out_dir))
    done: dict[str, tuple[Path, str]] = {}
    progress(Start("saliency", total=len(paths)))
    for i, p in enumerate(paths):
        try:
            target, c = explainer.write_overlay(p, out / overlay_name(p), max_pixels=max_pixels)
            done[p] = (target, bundle.labels[c])
        except ImageError:  # the file changed or went away since it was classified
            pass
        progress(Advance("saliency", completed=i + 1, total=len(paths)))
    progress(End("saliency", completed=len(paths), total=len(paths)))
    return done


# ---- predict --explain ------------------------------------------------------------------------

def prepare(paths, *, out_dir: str | os.PathLike, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR,
            top_k: int = PREDICT_TOP_K, engine: str = PREDICT_ENGINE, max_pixels: int | None = None,
            force: bool = False) -> tuple[Explainer, list[str], dict[str, Path], str | None]:
    """``inference.prepare`` for ``predict --explain``: (explainer, files, their overlays' paths,
    a note or None). Everything that can fail as a whole fails here, before TensorFlow loads:
    the options, the bundle, ``plan_overlays``. Saliency needs the SavedModel's gradients, so
    an exported ``engine`` (tflite, onnx, openvino) is a ``UsageError``, and auto runs the
    SavedModel (the note says so when it would have picked an exported file)."""
    inference.check_top_k(top_k)
    check_max_pixels(max_pixels)
    inference.check_engine(engine)
    b = bundles.load(model_dir)
    if engine not in ("tf", "auto"):
        runtime = {"tflite": "LiteRT", "onnx": "onnxruntime", "openvino": "OpenVINO"}.get(engine, engine)
        raise UsageError(f"--explain: saliency needs the SavedModel's gradients, which {runtime} lacks; "
                         "use --engine tf (or auto)")
    if not can_explain(b):
        raise BundleError(f"--model {b.path}: no {SAVED_MODEL_FILE}; --explain needs the bundle's SavedModel")
    found = walk.expand(paths)
    plan = plan_overlays(found, out_dir, inputs=[str(p) for p in paths], force=force)
    note = None
    chosen = inference.resolve_engine(b, engine)
    if chosen != "tf":
        note = (f"--explain: engine tf (the SavedModel), whose gradients the overlays need, in place of "
                f"{inference.formats.get(chosen).file}")
    return Explainer(b), found, plan, note


def iter_explained(paths: list[str], *, explainer: Explainer, plan: dict[str, Path], top_k: int = PREDICT_TOP_K,
                   max_pixels: int | None = None, threshold: float | None = None,
                   unknown_threshold: float | None = None) -> Iterator[tuple[inference.Prediction, np.ndarray | None]]:
    """``inference.iter_predict`` through the explainer's engine, each usable image's overlay
    written to ``plan[path]`` and named in its Prediction's ``overlay``. Raises ``BundleError``,
    ``TlcliError`` (an overlay cannot be written)."""
    for p, row in inference.iter_predict(paths, bundle=explainer.bundle, engine=explainer.engine, top_k=top_k,
                                         max_pixels=max_pixels, threshold=threshold,
                                         unknown_threshold=unknown_threshold):
        if p.error is None:
            try:
                p.overlay = str(explainer.write_overlay(p.path, plan[p.path], max_pixels=max_pixels)[0])
            except ImageError as exc:  # the file changed since it was classified
                p.predictions, p.error = [], str(exc)
                row = None
        yield p, row


def explain(paths, *, out_dir: str | os.PathLike, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR,
            top_k: int = PREDICT_TOP_K, engine: str = PREDICT_ENGINE, max_pixels: int | None = None,
            force: bool = False) -> list[inference.Prediction]:
    """``tlcli.predict`` that also writes a saliency overlay of every usable image into
    ``out_dir`` (``overlay_name``; the path in each Prediction's ``overlay``); see ``prepare``
    for what it refuses. Never raises for a bad image (see ``error``)."""
    explainer, found, plan, _ = prepare(paths, out_dir=out_dir, model_dir=model_dir, top_k=top_k, engine=engine,
                                        max_pixels=max_pixels, force=force)
    return [p for p, _ in iter_explained(found, explainer=explainer, plan=plan, top_k=top_k, max_pixels=max_pixels)]


# ---- serve's /explain -------------------------------------------------------------------------

class Explanations:
    """Overlays for a server (``serve``'s ``/explain``): ``available`` when the bundle has its
    SavedModel. The ``Explainer`` is made on the first request, through ``engine`` when the server
    runs the SavedModel already (a LiteRT server imports TensorFlow only then); maps are computed
    one at a time, each already using every core."""

    def __init__(self, bundle: bundles.Bundle, *, engine: inference.TFEngine | None = None,
                 max_pixels: int | None = None):
        import threading

        self.bundle, self.engine, self.max_pixels = bundle, engine, max_pixels
        self.available = can_explain(bundle)
        self._explainer: Explainer | None = None
        self._lock = threading.Lock()

    def overlay_png(self, data: bytes, name: str) -> tuple[bytes, int]:
        """``Explainer.overlay_png`` of one upload; raises ``ImageError`` (named ``name``), ``BundleError``."""
        with self._lock:
            if self._explainer is None:
                self._explainer = Explainer(self.bundle, engine=self.engine)
            return self._explainer.overlay_png(data, path=name, max_pixels=self.max_pixels)
