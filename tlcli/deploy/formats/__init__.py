"""The export formats: one registry line per format (its bundle file, the extra that installs it,
its quantization modes and the module that converts it, opens it as an engine and reads its
labels). ``export``, ``predict``, ``evaluate`` and ``serve`` find a format here by name; adding a
format is one module with ``convert``, ``Engine``, ``metadata_in`` and ``looks_like``, plus one
line in ``FORMATS``. The modules import their runtimes lazily, so this registry loads none."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tlcli.deploy.formats import onnx_format, openvino_format, tflite_format
from tlcli.errors import UsageError


@dataclass(frozen=True)
class Format:
    """``name``: the --format / --engine value; ``file``: where the bundle keeps it; ``extra``: the
    pip extra that installs it (None: tlcli's own dependencies); ``run``: the modules its engine
    imports; ``convert``: those its conversion imports besides TensorFlow; ``quantize``: its
    --quantize modes; ``module``: convert, Engine, metadata_in, looks_like, companions."""

    name: str
    file: str
    extra: str | None
    run: tuple[str, ...]
    convert: tuple[str, ...]
    quantize: tuple[str, ...]
    module: ModuleType

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix

    def path_in(self, bundle_dir: Path) -> Path:
        return Path(bundle_dir) / self.file

    def missing(self, *, to_export: bool = False) -> str | None:
        """The package of the first module this format needs (to run, or ``to_export``) that is not
        installed, or None."""
        for name in (*self.convert, *self.run) if to_export else self.run:
            package = name.split(".")[0]
            if sys.modules.get(package, True) is None:  # blocked, as a test or a sandbox may do
                return package
            try:
                if importlib.util.find_spec(name) is None:
                    return package
            except (ImportError, ValueError):
                return package
        return None

    @property
    def install(self) -> str:
        """What to run to install the modules it needs."""
        if self.extra is None:
            return "reinstall tlcli (pip install --force-reinstall tlcli)"
        return f"pip install 'tlcli[{self.extra}]'"

    def require(self, option: str, *, to_export: bool = False) -> None:
        """Raise ``UsageError`` (one line naming the extra to install) when a module is missing."""
        name = self.missing(to_export=to_export)
        if name is not None:
            raise UsageError(f"{option} {self.name}: needs the Python package {name}, which is not installed; "
                             f"{self.install}")


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("tflite", "model.tflite", None, ("ai_edge_litert.interpreter",), (), ("none", "float16", "dynamic", "int8"),
           tflite_format),
    Format("onnx", "model.onnx", "onnx", ("onnxruntime",), ("tf2onnx", "onnx", "onnxruntime"), ("none", "dynamic"),
           onnx_format),
    Format("openvino", "openvino/model.xml", "openvino", ("openvino",), ("openvino",), ("none", "float16"),
           openvino_format),
)}

# What ``--engine auto`` tries, fastest first, among the formats a bundle holds (and whose runtime
# is installed); TensorFlow when it holds none. Measured with bench/export.py on the MobileNetV2
# hymenoptera bundle (float exports, 64 images, fresh process each, 2 shared CPU cores under load;
# images/s at batch 1 / batch 32, and the SavedModel's for scale):
#   tflite 89 / 93, openvino 44 / 60, onnx 37 / 37 (tf 25 / 92).
# LiteRT's CompiledModel API ran batch 1 at 118 and batch 32 at 92, but took 1.0 s to open
# against the Interpreter's 0.07 s, so tlcli keeps the Interpreter (a predict is mostly opening).
AUTO_ORDER = ("tflite", "openvino", "onnx")


def get(name: str) -> Format:
    return FORMATS[name]


__all__ = ["AUTO_ORDER", "FORMATS", "Format", "get"]
