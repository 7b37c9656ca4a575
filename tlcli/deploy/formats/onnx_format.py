"""ONNX: converted by tf2onnx from the SavedModel's signature (opset ``OPSET``; tf2onnx's
``from_keras`` is broken on TensorFlow >= 2.16, so the signature is converted as a function), run
by onnxruntime on the CPU without TensorFlow. ``dynamic`` quantization is onnxruntime's dynamic
int8 quantizer (int8 weights, activations quantized on the fly). Labels and the bundle's
fingerprint are ``metadata_props`` entries of the model, named as in a .tflite (``tflite_meta``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli.bundle.schema import read_regular
from tlcli.deploy import tflite_meta
from tlcli.deploy.formats.outputs import checked_outputs, run_error
from tlcli.errors import BundleError, TlcliError
from tlcli.quiet import native_stderr_silenced

OPSET = 17
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message


def looks_like(path: Path) -> bool:
    """Whether ``path`` starts like an ONNX model (a protobuf whose first field is ir_version, tag 0x08)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def companions(path: Path) -> list[Path]:
    """The files written beside ``path`` with it: none (the weights are inside the model)."""
    return []


def metadata_in(path: Path) -> dict[str, bytes]:
    """The model's ``metadata_props``, read with onnxruntime (without TensorFlow or the onnx package)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(read_regular(path, MAX_ONNX_BYTES), opts, providers=["CPUExecutionProvider"])
    return {k: v.encode("utf-8") for k, v in session.get_modelmeta().custom_metadata_map.items()}


def convert(source: Path, b: bundles.Bundle, *, signature: str, quantize: str, io_type: str,
            calibration: np.ndarray | None, metadata: dict[str, bytes]) -> tuple[list[bytes], bool]:
    """The SavedModel at ``source`` (its ``signature``) as ONNX with ``metadata`` in its
    ``metadata_props``: ([payload], True). Raises ``TlcliError``."""
    import onnx
    import tf2onnx

    from tlcli._tf import tf

    t = tf()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        loaded = t.saved_model.load(str(source))
        fn = loaded.signatures[signature]
        spec = fn.structured_input_signature[1]["images"]
        wrapped = t.function(lambda images: fn(images=images))  # tf2onnx converts a tf.function
        with native_stderr_silenced():
            proto, _ = tf2onnx.convert.from_function(
                wrapped, input_signature=[t.TensorSpec(spec.shape, spec.dtype, name="images")], opset=OPSET)
    except Exception as exc:
        raise TlcliError(f"ONNX conversion failed for {b.path} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None
    if quantize == "dynamic":
        proto = _quantized(onnx, proto, b)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value.decode("utf-8")
    return [proto.SerializeToString()], True


def _quantized(onnx, proto, b: bundles.Bundle):
    """``proto`` with int8 weights, through onnxruntime's dynamic quantizer (which reads and writes files)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tlcli-onnx-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(proto.SerializeToString())
        logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
        try:
            with native_stderr_silenced():
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        except Exception as exc:
            raise TlcliError(f"ONNX dynamic quantization failed for {b.path} ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]})") from None
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load_model(str(dst))


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape or []]


class ONNXEngine:
    """``model.onnx`` (or ``path``) through onnxruntime's CPU provider, without TensorFlow: float32
    images [N, S, S, 3] in [0, 1] -> float32 probabilities [N, C]. The file is read once, only if it
    is a regular file; the model must take "images" and give "probabilities" (and may give
    "unknown_score"), found by name, with the bundle's input size, class count, embedded labels and
    fingerprint. Raises ``BundleError`` for a missing, unreadable, crafted or mismatched file.
    ``num_threads``: onnxruntime's intra-op threads (default: its own choice, one per core)."""

    name = "onnx"

    def __init__(self, bundle: bundles.Bundle, path: Path | None = None, *, num_threads: int | None = None):
        import onnxruntime as ort

        path = Path(path) if path else bundle.path / "model.onnx"
        if not path.exists() and not path.is_symlink():
            raise BundleError(f"--model {bundle.path}: no {path.name}; run 'tlcli export --format onnx --model "
                              f"{bundle.path}' first, or use --engine tf")
        buf = read_regular(path, MAX_ONNX_BYTES)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = num_threads
        try:
            with native_stderr_silenced():
                self.session = ort.InferenceSession(buf, opts, providers=["CPUExecutionProvider"])
            metadata = {k: v.encode("utf-8") for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        except Exception as exc:
            raise BundleError(f"{path}: cannot load the ONNX model ({' '.join(str(exc).split())[:200]}); "
                              "re-export it") from None
        inputs = {i.name: _dims(i.shape) for i in self.session.get_inputs()}
        outputs = {o.name: _dims(o.shape) for o in self.session.get_outputs()}
        if list(inputs) != ["images"] or "probabilities" not in outputs or len(inputs["images"]) != 4 \
                or len(outputs["probabilities"]) != 2:
            raise BundleError(f"{path}: not a tlcli model (it takes {', '.join(inputs) or 'nothing'} and gives "
                              f"{', '.join(outputs) or 'nothing'}, not images [N, S, S, 3] -> probabilities "
                              f"[N, C]); re-export it with 'tlcli export --format onnx --force --model {bundle.path}'")
        tflite_meta.check_matches(path, bundle, tuple(inputs["images"][1:3]), outputs["probabilities"][1],
                                  metadata, "onnx")
        self.names = [n for n in ("probabilities", "unknown_score") if n in outputs]
        self.path, self.classes = path, len(bundle.labels)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """{"probabilities": float32 [N, C]} and "unknown_score" float32 [N] when the model has it."""
        try:
            got = self.session.run(self.names, {"images": np.ascontiguousarray(batch, np.float32)})
        except Exception as exc:
            raise run_error(self.path, exc) from None
        return checked_outputs(dict(zip(self.names, got)), len(batch), self.classes, self.path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)["probabilities"]


Engine = ONNXEngine
