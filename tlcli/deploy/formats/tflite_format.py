"""TFLite: converted by TensorFlow's TFLiteConverter (four quantization modes, see
``deploy.export``), run by LiteRT without TensorFlow. Labels and the bundle's fingerprint are
entries of the flatbuffer's metadata (``deploy.tflite_meta``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli.bundle.schema import read_regular
from tlcli.deploy import tflite_meta
from tlcli.deploy.formats.outputs import checked_outputs, run_error
from tlcli.errors import BundleError, TlcliError
from tlcli.model import tflite_check
from tlcli.quiet import native_stderr_silenced


def looks_like(path: Path) -> bool:
    """Whether ``path`` starts like a TFLite flatbuffer (file identifier "TFL3" at byte 4): an
    image or document merely renamed to .tflite is never replaced by export."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def companions(path: Path) -> list[Path]:
    """The files written beside ``path`` with it: none."""
    return []


def metadata_in(path: Path) -> dict[str, bytes]:
    """The named metadata entries of the .tflite at ``path``, read without TensorFlow."""
    return tflite_meta.read_entries(read_regular(path, tflite_meta.MAX_TFLITE_BYTES))


def convert(source: Path, b: bundles.Bundle, *, signature: str, quantize: str, io_type: str,
            calibration: np.ndarray | None, metadata: dict[str, bytes]) -> tuple[list[bytes], bool]:
    """The SavedModel at ``source`` (its ``signature``) as a .tflite, with ``metadata`` embedded
    when this TensorFlow can: ([payload], embedded). Raises ``TlcliError``."""
    from tlcli._tf import tf

    t = tf()
    try:
        converter = t.lite.TFLiteConverter.from_saved_model(str(source), signature_keys=[signature])
    except Exception as exc:
        raise TlcliError(f"--model {b.path}: the SavedModel cannot be converted ({type(exc).__name__}); "
                         "the bundle may be corrupt; retrain it") from None
    if quantize != "none":
        converter.optimizations = [t.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [t.float16]
    if quantize == "int8":
        _calibrate(t, converter, calibration, io_type)
    try:
        with native_stderr_silenced():  # the quantizer prints its settings from C++
            flat = converter.convert()
    except Exception as exc:
        raise TlcliError(f"TFLite conversion failed for {b.path} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None
    with_labels = tflite_meta.embed(flat, metadata)
    return [with_labels or flat], with_labels is not None


def _calibrate(t, converter, calibration: np.ndarray, io_type: str) -> None:
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


class TFLiteEngine:
    """``model.tflite`` (or ``path``) through LiteRT, without TensorFlow. Takes and returns what
    TFEngine does (float32 images in [0, 1] -> float32 probabilities, and the unknown score when
    the file has it); integer-I/O models (int8 / uint8) get their inputs quantized and their
    outputs dequantized with the file's own scale and zero point. It runs the file's ``tlcli``
    signature when it has one, else ``serving_default`` (or its only graph), its outputs found by
    name. The file is read once, only if it is a regular file, and checked before LiteRT opens it
    (``model.tflite_check``). Raises ``BundleError`` for a missing, unreadable, crafted or
    mismatched file: another input size or class count, other embedded labels, or another
    bundle's fingerprint. ``num_threads``: LiteRT's threads for this interpreter (default: one
    per CPU; a server running several interpreters splits them)."""

    name = "tflite"

    def __init__(self, bundle: bundles.Bundle, path: Path | None = None, *, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path) if path else bundle.tflite_path
        if not path.exists() and not path.is_symlink():
            raise BundleError(f"--model {bundle.path}: no {path.name}; run 'tlcli export --format tflite --model "
                              f"{bundle.path}' first, or use --engine tf")
        buf = read_regular(path, tflite_meta.MAX_TFLITE_BYTES)
        try:
            tflite_check.check(buf)  # before LiteRT: an index out of place crashes it (SIGSEGV)
            self.interp = Interpreter(model_content=buf, num_threads=num_threads or os.cpu_count())
            with native_stderr_silenced():
                self.interp.allocate_tensors()
            metadata = tflite_meta.read_entries(buf)
            self.runner = _runner(self.interp)
            ((self.input_name, self.inp),) = self.runner.get_input_details().items()
            self.outs = self.runner.get_output_details()
            self.scores_unknown = "unknown_score" in self.outs
            self.out = probs = self.outs["probabilities"]
        except Exception as exc:
            raise BundleError(f"{path}: cannot load the TFLite model ({' '.join(str(exc).split())[:200]}); "
                              "re-export it") from None
        tflite_meta.check_matches(path, bundle, tuple(self.inp["shape"][1:3]), int(probs["shape"][-1]), metadata)
        self.path, self.classes = path, len(bundle.labels)

    @staticmethod
    def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        if detail["dtype"] in (np.int8, np.uint8) and scale:
            info = np.iinfo(detail["dtype"])
            return np.clip(np.rint(x / scale + zero), info.min, info.max).astype(detail["dtype"])
        return x.astype(detail["dtype"])

    @staticmethod
    def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
        scale, zero = detail["quantization"]
        if detail["dtype"] in (np.int8, np.uint8) and scale:
            return (y.astype(np.float32) - zero) * np.float32(scale)
        return y.astype(np.float32)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """{"probabilities": float32 [n, classes], and "unknown_score": float32 [n] when the file has it}."""
        try:
            found = self.runner(**{self.input_name: self._quantize(batch, self.inp)})
            found = {name: self._dequantize(value, self.outs[name]) for name, value in found.items()}
        except Exception as exc:  # LiteRT's RuntimeError / ValueError for a graph that fails on this batch
            raise run_error(self.path, exc) from None
        return checked_outputs(found, len(batch), self.classes, self.path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)["probabilities"]


def _runner(interp):
    """What runs ``interp``'s model, by input and output name: LiteRT's runner of its ``tlcli``
    signature, else of ``serving_default``, else of its only signature; a file without signatures
    (not one tlcli writes) runs its graph, its first output taken as the probabilities."""
    signatures = interp.get_signature_list()
    name = next((s for s in ("tlcli", "serving_default") if s in signatures), None)
    if name is None and len(signatures) == 1:
        (name,) = signatures
    if name is not None:
        return interp.get_signature_runner(name)
    return _GraphRunner(interp)


class _GraphRunner:
    """A LiteRT signature runner's interface over a model without signatures: its first input
    ("images") and first output ("probabilities")."""

    def __init__(self, interp):
        self.interp = interp
        self.inp = interp.get_input_details()[0]
        self.out = interp.get_output_details()[0]

    def get_input_details(self) -> dict:
        return {"images": self.inp}

    def get_output_details(self) -> dict:
        return {"probabilities": self.out}

    def __call__(self, images: np.ndarray) -> dict:
        if tuple(self.interp.get_input_details()[0]["shape"]) != images.shape:
            self.interp.resize_tensor_input(self.inp["index"], list(images.shape))
            self.interp.allocate_tensors()
        self.interp.set_tensor(self.inp["index"], images)
        self.interp.invoke()
        return {"probabilities": self.interp.get_tensor(self.out["index"])}


Engine = TFLiteEngine
