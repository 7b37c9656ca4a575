"""OpenVINO: the SavedModel's signature converted by OpenVINO's own converter into IR
(``model.xml``, the graph, and ``model.bin``, the weights), run by OpenVINO's CPU plugin without
TensorFlow. Inference precision is pinned to f32: the CPU plugin's default is bf16 on CPUs with
AVX512-BF16 or AMX, which moves probabilities by about 0.05. ``float16`` stores the weights in
half precision (compute stays f32). Labels and the bundle's fingerprint are ``rt_info`` entries
under "tlcli", named as in a .tflite (``tflite_meta``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli.bundle.schema import read_regular
from tlcli.deploy import tflite_meta
from tlcli.deploy.formats.outputs import checked_outputs, run_error
from tlcli.errors import BundleError, TlcliError
from tlcli.quiet import native_stderr_silenced

MAX_XML_BYTES = 256 << 20
MAX_BIN_BYTES = 4 << 30
RT_INFO = "tlcli"  # the rt_info section holding the metadata entries
ENTRIES = (tflite_meta.LABELS_METADATA, tflite_meta.BUNDLE_METADATA)


def looks_like(path: Path) -> bool:
    """Whether ``path`` starts like OpenVINO IR (an XML document whose root is <net>)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError:
        return False
    return head.startswith(b"<net") or (head.startswith(b"<?xml") and b"<net" in head)


def companions(path: Path) -> list[Path]:
    """The files written beside ``path`` with it: its weights, ``<stem>.bin``."""
    return [path.with_suffix(".bin")]


def _read(core, path: Path):
    """(model, weights): the IR at ``path`` read from memory (both files read as regular files,
    bounded); the caller keeps ``weights`` alive as long as the model, whose constants may use it."""
    import openvino as ov

    xml = read_regular(path, MAX_XML_BYTES)
    weights = ov.Tensor(np.frombuffer(read_regular(path.with_suffix(".bin"), MAX_BIN_BYTES), np.uint8))
    return core.read_model(xml, weights), weights


def _metadata(model) -> dict[str, bytes]:
    return {key: str(model.get_rt_info([RT_INFO, key]).astype(str)).encode("utf-8") for key in ENTRIES
            if model.has_rt_info([RT_INFO, key])}


def metadata_in(path: Path) -> dict[str, bytes]:
    """The "tlcli" ``rt_info`` entries of the IR at ``path`` (and its .bin), without TensorFlow."""
    import openvino as ov

    model, _weights = _read(ov.Core(), Path(path))
    return _metadata(model)


def convert(source: Path, b: bundles.Bundle, *, signature: str, quantize: str, io_type: str,
            calibration: np.ndarray | None, metadata: dict[str, bytes]) -> tuple[list[bytes], bool]:
    """The SavedModel at ``source`` (its ``signature``) as IR with ``metadata`` in its rt_info:
    ([xml, bin], True). Raises ``TlcliError``."""
    import openvino as ov

    from tlcli._tf import tf

    try:
        loaded = tf().saved_model.load(str(source))
        with native_stderr_silenced():
            model = ov.convert_model(loaded.signatures[signature])
        for key, value in metadata.items():
            model.set_rt_info(value.decode("utf-8"), [RT_INFO, key])
        with tempfile.TemporaryDirectory(prefix="tlcli-openvino-") as tmp:
            xml = Path(tmp) / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=quantize == "float16")
            return [xml.read_bytes(), xml.with_suffix(".bin").read_bytes()], True
    except Exception as exc:
        raise TlcliError(f"OpenVINO conversion failed for {b.path} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]})") from None


def _static(port) -> list[int]:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else -1 for d in shape]


class OpenVINOEngine:
    """``openvino/model.xml`` and its ``.bin`` (or ``path``) through OpenVINO's CPU plugin at f32,
    without TensorFlow: float32 images [N, S, S, 3] in [0, 1] -> float32 probabilities [N, C].
    Both files are read once, only if they are regular files; the model must take "images" and give
    "probabilities" (and may give "unknown_score"), found by name, with the bundle's input size,
    class count, embedded labels and fingerprint. Raises ``BundleError`` for missing, unreadable,
    crafted or mismatched files. One engine runs one batch at a time (its infer request);
    ``num_threads``: the plugin's threads (default: its own choice)."""

    name = "openvino"

    def __init__(self, bundle: bundles.Bundle, path: Path | None = None, *, num_threads: int | None = None):
        import openvino as ov

        path = Path(path) if path else bundle.path / "openvino" / "model.xml"
        for p in (path, path.with_suffix(".bin")):
            if not p.exists() and not p.is_symlink():
                raise BundleError(f"--model {bundle.path}: no {p}; run 'tlcli export --format openvino --model "
                                  f"{bundle.path}' first, or use --engine tf")
        core = ov.Core()
        try:
            with native_stderr_silenced():
                model, self._weights = _read(core, path)
            metadata = _metadata(model)
            inputs = {name: _static(port) for port in model.inputs for name in port.get_names()}
            outputs = {name: _static(port) for port in model.outputs for name in port.get_names()}
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{path}: cannot load the OpenVINO model ({' '.join(str(exc).split())[:200]}); "
                              "re-export it") from None
        if len(model.inputs) != 1 or "images" not in inputs or "probabilities" not in outputs \
                or len(inputs["images"]) != 4 or len(outputs["probabilities"]) != 2:
            raise BundleError(f"{path}: not a tlcli model (it takes {', '.join(inputs) or 'nothing'} and gives "
                              f"{', '.join(outputs) or 'nothing'}, not images [N, S, S, 3] -> probabilities "
                              f"[N, C]); re-export it with 'tlcli export --format openvino --force --model "
                              f"{bundle.path}'")
        tflite_meta.check_matches(path, bundle, tuple(inputs["images"][1:3]), outputs["probabilities"][1],
                                  metadata, "openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = num_threads
        try:
            with native_stderr_silenced():
                self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise BundleError(f"{path}: cannot compile the OpenVINO model ({' '.join(str(exc).split())[:200]}); "
                              "re-export it") from None
        self.request = self.compiled.create_infer_request()
        self.names = [n for n in ("probabilities", "unknown_score") if n in outputs]
        self.path, self.classes = path, len(bundle.labels)

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """{"probabilities": float32 [N, C]} and "unknown_score" float32 [N] when the model has it."""
        try:
            got = self.request.infer({"images": np.ascontiguousarray(batch, np.float32)})
            named = {n: np.array(got[self.compiled.output(n)]) for n in self.names}
        except Exception as exc:
            raise run_error(self.path, exc) from None
        return checked_outputs(named, len(batch), self.classes, self.path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)["probabilities"]


Engine = OpenVINOEngine
