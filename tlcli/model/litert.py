"""The frozen backbone through LiteRT (XNNPACK): converted once, cached, checked against TensorFlow.

On a CPU, LiteRT's XNNPACK kernels run a MobileNet-class backbone 2-3 times faster than
TensorFlow's ``predict`` (bench/extract.py). ``engine_for`` picks the engine of a run's frozen
features (``--extractor``); ``prepare`` gives the runner: the backbone converted to a float32
.tflite (no quantization), cached once per backbone under ``<cache dir>/backbones/<key>.tflite``
with the feature cache's key (handle, or local path + file times; the image size), written
atomically (``files.write_atomic``). A cached file is used only if it is a regular file of sane
size whose indices and shapes pass ``tflite_check`` (a crafted file in a shared cache would
crash LiteRT), that loads and gives ``feature_dim`` features; anything else (truncated, damaged,
foreign, crafted) is converted again. A backbone that cannot be converted gives a
one-line ``Warn`` and None: its features come from TensorFlow.

Parity (``parity_error``): each run compares the two engines' features on its first images;
above ``PARITY_TOLERANCE`` the run falls back to TensorFlow with a warning (``features``).

Reproducibility: the thread count is fixed (the cores this process may use), and XNNPACK splits
work across threads without changing any sum's order, so the same command on the same machine
gives the same features, hence the same metrics.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from tlcli import files
from tlcli.model import tflite_check
from tlcli.progress import Callback, End, Start, Warn, silent
from tlcli.quiet import native_stderr_silenced

# Largest |TF - LiteRT| over a batch's features, relative to the batch's largest |TF feature|
# (at least 1). Float32 kernels that sum in another order differ by ~1e-5 of the scale
# (MobileNetV2: 4e-5 of 5.7); 1e-3 leaves room for deeper backbones and refuses a wrong graph.
PARITY_TOLERANCE = 1e-3
# The images of the parity batch: one LiteRT chunk (RUN_BATCH, below). A wrong conversion shows
# on any image; TensorFlow's eager pass over a 32-image batch held ~0.5 GB more at its peak.
PARITY_IMAGES = 8
MAX_TFLITE_BYTES = 2 << 30  # the flatbuffer format's own limit
MIN_TFLITE_BYTES = 16       # the header alone


def threads() -> int:
    """One LiteRT thread per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def accelerator_listed() -> bool:
    """Whether TensorFlow lists a GPU or TPU device."""
    from tlcli._tf import tf

    return any(d.device_type in ("GPU", "TPU") for d in tf().config.list_physical_devices())


def engine_for(requested: str) -> str:
    """The engine of the frozen features, "tf" or "litert", for ``--extractor`` ``requested``:
    ``auto`` is LiteRT unless TensorFlow lists a GPU or TPU (``accelerator_listed``)."""
    if requested == "auto":
        return "tf" if accelerator_listed() else "litert"
    return requested


def cached_path(cache_dir: str | os.PathLike | None, cache_key: str) -> Path:
    """Where the converted backbone of ``cache_key`` is cached (``cache_dir`` None: the default)."""
    from tlcli.config import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "backbones" / f"{cache_key}.tflite"


# The interpreter's batch: on the 2-core development CPU (MobileNetV2 at 224, 2 threads) batches
# of 1, 4, 8 and 32 ran at 235, 253, 275 and 248 images/s. Every call runs in chunks of this many,
# the last one padded, so an image's features do not depend on the batch it came in.
RUN_BATCH = 8


class LiteRTBackbone:
    """A converted backbone: float32 images [n, size, size, 3] in [0, 1] -> features [n, dim]
    float32, ``threads()`` threads, in chunks of ``RUN_BATCH`` images. Raises
    ``ValueError`` when ``model`` is not a .tflite of that input and output (see ``prepare``).
    Calls from several threads run one at a time (the extraction ahead, and the parity check
    beside it). ``parity``: its ``parity_error`` against TensorFlow once measured
    (``features.agrees``), else None."""

    name = "litert"

    def __init__(self, model: bytes, *, image_size: int, feature_dim: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        if not MIN_TFLITE_BYTES <= len(model) <= MAX_TFLITE_BYTES:
            raise ValueError("not a TFLite flatbuffer")
        tflite_check.check(model)  # before LiteRT: an index out of place crashes it (SIGSEGV)
        with native_stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate" and the like
            self.interp = Interpreter(model_content=model, num_threads=threads())
            self.interp.allocate_tensors()
        inp, out = self.interp.get_input_details(), self.interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ValueError(f"{len(inp)} inputs and {len(out)} outputs, not one of each")
        self.inp, self.out = inp[0]["index"], out[0]["index"]
        shape, dims = list(inp[0]["shape_signature"]), list(out[0]["shape"])
        feature_dim = feature_dim or (dims[-1] if len(dims) == 2 and dims[-1] > 0 else -1)  # None: the model's own
        if shape[1:] != [image_size, image_size, 3] or inp[0]["dtype"] != np.float32 or dims[1:] != [feature_dim]:
            raise ValueError(f"takes {shape} {inp[0]['dtype'].__name__} and gives {dims}, not "
                             f"[-1, {image_size}, {image_size}, 3] float32 -> [-1, {feature_dim}]")
        self.batch, self.image_size, self.feature_dim = int(inp[0]["shape"][0]), image_size, feature_dim
        self.parity: float | None = None
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._run(np.ascontiguousarray(batch, np.float32))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.batch != RUN_BATCH:
            self.interp.resize_tensor_input(self.inp, [RUN_BATCH, self.image_size, self.image_size, 3])
            self.interp.allocate_tensors()
            self.batch = RUN_BATCH
        out = np.empty((len(batch), self.feature_dim), np.float32)
        for start in range(0, len(batch), RUN_BATCH):
            chunk = batch[start:start + RUN_BATCH]
            n = len(chunk)
            if n < RUN_BATCH:  # padded, so every image runs in the same shape: the same features
                chunk = np.concatenate([chunk, np.zeros((RUN_BATCH - n, *chunk.shape[1:]), np.float32)])
            self.interp.set_tensor(self.inp, chunk)
            self.interp.invoke()
            out[start:start + n] = self.interp.get_tensor(self.out)[:n]  # copied: the buffer is reused
        return out


def convert(layer, image_size: int) -> bytes:
    """The .tflite of a hub ``layer`` (inference mode) for float32 [None, size, size, 3] input:
    float32, builtin ops only, no quantization. Raises what the converter raises.

    The function is frozen in memory (its variables made constants) and converted: MobileNetV2
    in 3.4 s of CPU. The converter's default first saves it as a SavedModel in a temporary
    folder and loads that back, which took 11 s for a bit-identical model (the same 65 ops, the
    same features); that path remains the fallback for a graph that cannot be frozen (not for
    one with an op LiteRT lacks, which it refuses as well)."""
    from tlcli._tf import tf

    t = tf()

    @t.function(input_signature=[t.TensorSpec([None, image_size, image_size, 3], t.float32)])
    def features(images):
        return layer(images, training=False)

    function = features.get_concrete_function()
    try:
        return _converted(t.lite.TFLiteConverter.from_concrete_functions([function], layer), frozen=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (a graph that cannot be frozen: the SavedModel path)
        if any(c.__name__ == "ConverterError" for c in type(exc).__mro__):
            raise  # LiteRT lacks an op: the other path would refuse it too, after as long again
        return _converted(t.lite.TFLiteConverter.from_concrete_functions([function], layer), frozen=False)


def _converted(converter, *, frozen: bool) -> bytes:
    converter.experimental_lower_to_saved_model = not frozen
    with native_stderr_silenced():  # MLIR prints every op it cannot convert, at length, from C++
        return converter.convert()


def prepare(loaded, spec, *, cache_dir: str | os.PathLike | None = None, runner: LiteRTBackbone | None = None,
            progress: Callback = silent) -> LiteRTBackbone | None:
    """The LiteRT runner of ``loaded`` (``backbone.load`` of ``spec``): ``runner`` (one opened
    before TensorFlow, ``cached_runner``) when it takes and gives what ``loaded`` does, else
    its cached conversion (``cached_path`` of ``cache_key``) when that is valid (see module
    docstring), else converted now and cached (a "convert" task). None, with one ``Warn``, when
    the backbone cannot be converted or run by LiteRT. Never raises for the cache (a read-only
    one just is not written)."""
    from tlcli.model.backbone import cache_key as feature_key

    size, dim = loaded.image_size, loaded.feature_dim
    if runner is not None and (runner.image_size, runner.feature_dim) == (size, dim):
        return runner
    path = cached_path(cache_dir, feature_key(spec, size))
    runner = _cached(path, size, dim)
    if runner is not None:
        return runner
    progress(Start("convert", total=1))
    try:
        model = convert(loaded.layer, size)
        runner = LiteRTBackbone(model, image_size=size, feature_dim=dim)
    except Exception as exc:  # ConverterError, or a model LiteRT refuses
        why = " ".join(str(exc).split())[:160]
        progress(Warn(f"--extractor litert: the backbone cannot be converted to LiteRT ({type(exc).__name__}"
                      f"{': ' + why if why else ''}); its features come from TensorFlow"))
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, model)
    except OSError:
        pass  # the cache is an optimisation; the next run converts again
    progress(End("convert", total=1, completed=1))
    return runner


def cached_runner(cache_dir: str | os.PathLike | None, cache_key: str, image_size: int) -> LiteRTBackbone | None:
    """The runner of the valid cached conversion of ``cache_key`` (``backbone.cache_key``) for
    ``image_size`` inputs, giving as many features as it does, or None; needs no TensorFlow."""
    return _cached(cached_path(cache_dir, cache_key), image_size, None)


def _cached(path: Path, image_size: int, feature_dim: int | None) -> LiteRTBackbone | None:
    """The runner of a valid cached conversion at ``path``, or None (missing or damaged)."""
    try:
        fd, st = files.open_regular(path)
    except OSError:  # missing, or a FIFO / folder planted there
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not MIN_TFLITE_BYTES <= st.st_size <= MAX_TFLITE_BYTES:
                return None
            model = f.read(st.st_size + 1)
        return LiteRTBackbone(model, image_size=image_size, feature_dim=feature_dim) \
            if len(model) == st.st_size else None
    except Exception:  # cut short, damaged, or for another input: convert again
        return None


def parity_error(tf_features: np.ndarray, litert_features: np.ndarray) -> float:
    """max |tf - litert| / max(1, max |tf|) over a batch [n, d]; inf for other shapes or a
    non-finite value. Compared with ``PARITY_TOLERANCE``."""
    a, b = np.asarray(tf_features, np.float64), np.asarray(litert_features, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))
