"""TF Serving's REST protocol, as ``tlcli serve`` speaks it: the status, the metadata (signature
defs of the bundle's ``serving_default`` and ``serving_bytes``) and the predict request in its row
(``instances`` -> ``predictions``) and columnar (``inputs`` -> ``outputs``) forms, answered in
TF Serving's own shapes and error texts, so that a client written for one works against the other.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

from tlcli import bundle as bundles
from tlcli.errors import ImageError

BATCH = 32  # encoded images decoded and classified at a time, as in tlcli predict
VERSION = "1"  # TF Serving numbers versions; a bundle is one model, served as version 1


class ClientError(Exception):
    """A refused request: the HTTP ``status`` and the one-line ``message`` of ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def signature_defs(b: bundles.Bundle) -> dict:
    """The bundle's two signatures (serving.serving_module) as TF Serving's metadata lists them."""
    s, n = b.image_size, len(b.labels)

    def info(name: str, dtype: str, dims: list[int]) -> dict:
        return {"dtype": dtype, "name": name, "tensor_shape": {
            "dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}}

    predict = "tensorflow/serving/predict"
    return {
        "serving_default": {
            "inputs": {"images": info("serving_default_images:0", "DT_FLOAT", [-1, s, s, 3])},
            "outputs": {"probabilities": info("StatefulPartitionedCall:0", "DT_FLOAT", [-1, n])},
            "method_name": predict},
        "serving_bytes": {
            "inputs": {"image_bytes": info("serving_bytes_image_bytes:0", "DT_STRING", [-1])},
            "outputs": {"labels": info("StatefulPartitionedCall_1:0", "DT_STRING", [-1, n]),
                        "probabilities": info("StatefulPartitionedCall_1:1", "DT_FLOAT", [-1, n])},
            "method_name": predict},
    }


def _as_bytes(value, where: str) -> bytes:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise ClientError(400, f"{where}: Unable to base64 decode") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ClientError(400, f'{where}: expected an encoded image as {{"b64": "..."}}, got {type(value).__name__}')


def _batch_of(req: dict, input_name: str, is_bytes: bool) -> tuple[list, str]:
    """The list of per-image values of a row or columnar request, and how to name item i."""
    if "instances" in req:
        rows = req["instances"]
        if not isinstance(rows, list) or not rows:
            raise ClientError(400, "instances: expected a non-empty list, one item per image")
        named = [isinstance(r, dict) and not (is_bytes and set(r) == {"b64"}) for r in rows]
        if any(named):
            bad = [i for i, r in enumerate(rows) if not (isinstance(r, dict) and set(r) == {input_name})]
            if bad:
                raise ClientError(400, f"instances[{bad[0]}]: expected the one input '{input_name}' of this signature")
            rows = [r[input_name] for r in rows]
        return rows, "instances[{}]"
    cols = req["inputs"]
    if isinstance(cols, dict) and not (is_bytes and set(cols) == {"b64"}):
        if set(cols) != {input_name}:
            raise ClientError(400, f"inputs: expected the one input '{input_name}' of this signature, got "
                                   f"{', '.join(map(repr, sorted(cols))) or 'none'}")
        cols = cols[input_name]
    if not isinstance(cols, list) or not cols:
        raise ClientError(400, f"inputs: '{input_name}' must be a non-empty list, one item per image")
    return cols, f"inputs.{input_name}[{{}}]"


def _float_images(values: list, size: int) -> np.ndarray:
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range numbers become inf: refused below
            x = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise ClientError(400, f"input images: expected numbers in nested lists of shape [-1,{size},{size},3]") \
            from None
    if x.shape[1:] != (size, size, 3):
        raise ClientError(400, f"input images: expected shape [-1,{size},{size},3], got "
                               f"[{','.join(map(str, x.shape))}]")
    if not np.all(np.isfinite(x)):
        raise ClientError(400, "input images: values must be finite numbers (RGB in [0, 1])")
    return x


def _decoded(model, values: list, where: str, start: int) -> np.ndarray:
    """The model inputs of ``values[start:start + BATCH]`` (encoded files); raises ``ClientError``."""
    try:
        return np.stack([model.decode(_as_bytes(v, where.format(i)), where.format(i))
                         for i, v in enumerate(values[start:start + BATCH], start)])
    except ImageError as exc:
        raise ClientError(400, str(exc)) from None


def rest_predict(model, body: bytes) -> dict:
    """A TF Serving predict request (JSON ``body``) to ``model`` (a ``server.ServedModel``) -> its
    answer, shaped as TF Serving shapes it:
    row requests get ``{"predictions": ...}``, columnar ones ``{"outputs": ...}``; a signature with
    one output (``serving_default``) gives its values without the name. Raises ``ClientError``."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"JSON Parse error: {exc}") from None
    except RecursionError:
        raise ClientError(400, "JSON Parse error: nested too deeply; a predict request needs a few levels") from None
    if not isinstance(req, dict):
        raise ClientError(400, "JSON Value is not an object: send {\"instances\": [...]} or {\"inputs\": ...}")
    sig_name = req.get("signature_name") or "serving_default"
    if not isinstance(sig_name, str) or sig_name not in model.signatures:
        raise ClientError(400, f'Serving signature name: "{sig_name}" not found in signature def')
    if ("instances" in req) == ("inputs" in req):
        raise ClientError(400, "give exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    (input_name,) = model.signatures[sig_name]["inputs"]
    is_bytes = sig_name == "serving_bytes"
    values, where = _batch_of(req, input_name, is_bytes)
    model.check_count(len(values), where.partition("[")[0])
    if is_bytes:
        probs = np.concatenate([model.classify(_decoded(model, values, where, start))
                                for start in range(0, len(values), BATCH)])
    else:
        probs = model.classify(_float_images(values, model.bundle.image_size))
    probs = [[tf_serving_float(v) for v in row] for row in probs]
    outputs = {"probabilities": probs}
    if is_bytes:
        outputs["labels"] = [list(model.bundle.labels) for _ in probs]
    if "instances" in req:
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(len(probs))]
                if len(outputs) > 1 else probs}
    return {"outputs": outputs if len(outputs) > 1 else probs}


def tf_serving_float(v: np.float32) -> float:
    """``v`` with the digits TF Serving writes for a float32: 6 significant digits when they give
    ``v`` back, else 9 (0.93, not the 0.9300000071525574 of the float64 conversion)."""
    text = f"{v:g}"
    if np.float32(text) != v:
        text = f"{v:.9g}"
    return float(text)


def model_status() -> dict:
    return {"model_version_status": [{"version": VERSION, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


def model_metadata(model) -> dict:
    return {"model_spec": {"name": model.name, "signature_name": "", "version": VERSION},
            "metadata": {"signature_def": {"signature_def": model.signatures}}}
