"""``--precision`` of fine-tuning: which Keras mixed-precision policy, and on what hardware.

A TF Hub SavedModel is traced for float32 only: under a float16 policy its restored functions
get float16 inputs and fail (tensorflow/hub#748, #854). So the hub layer keeps its float32
policy and the cast happens at its boundary: images go in as float32, its features are cast to
the policy's compute dtype by the head's Dense, and the softmax and the loss stay float32. The
backbone's own arithmetic is lowered by TensorFlow's graph rewrite instead (grappler's
``auto_mixed_precision`` on a GPU, ``auto_mixed_precision_onednn_bfloat16`` on a CPU), which
works on the traced graph. Variables stay float32, so the saved and exported models are
float32 whatever the policy was.

``auto``: mixed_float16 on a GPU of compute capability 7.0 or above, mixed_bfloat16 on a TPU,
float32 on a CPU: on this project's CPU (a Xeon without the ``amx_bf16`` or ``avx512_bf16``
flags), the bfloat16 rewrite made a MobileNetV2 fine-tuning step 1.8-2.2x slower (bench/distributed.py).
"""

from __future__ import annotations

import contextlib

from tlcli.config import Precision

# Grappler's rewrite of whole graphs (the hub backbone's included), by policy and device.
_REWRITE = {("mixed_float16", "GPU"): "auto_mixed_precision",
            ("mixed_bfloat16", "CPU"): "auto_mixed_precision_onednn_bfloat16"}


def device_kind() -> str:
    """``TPU``, ``GPU`` or ``CPU``: where fine-tuning runs."""
    from tlcli._tf import tf

    t = tf()
    if t.config.list_logical_devices("TPU"):
        return "TPU"
    return "GPU" if t.config.list_logical_devices("GPU") else "CPU"


def gpu_capability() -> tuple[int, int] | None:
    """The lowest compute capability among the GPUs, or None without one (or when TensorFlow
    cannot tell)."""
    from tlcli._tf import tf

    t = tf()
    found = []
    for gpu in t.config.list_physical_devices("GPU"):
        cc = t.config.experimental.get_device_details(gpu).get("compute_capability")
        if cc:
            found.append(tuple(cc))
    return min(found) if found else None


def resolve(name: str, *, kind: str | None = None, capability: tuple[int, int] | None = None) -> str:
    """The policy ``--precision name`` means here (``kind`` and ``capability`` default to this
    machine's): float32, mixed_float16 or mixed_bfloat16."""
    if name != Precision.AUTO:
        return str(name)
    kind = kind or device_kind()
    if kind == "TPU":
        return Precision.MIXED_BFLOAT16.value
    if kind == "GPU" and (capability or gpu_capability() or (0, 0)) >= (7, 0):
        return Precision.MIXED_FLOAT16.value
    return Precision.FLOAT32.value


@contextlib.contextmanager
def policy(name: str, *, kind: str | None = None):
    """Inside the block, Keras' global policy is ``name`` (a resolved one) and the matching
    graph rewrite is on; both are put back after, so the extraction and export that follow run
    in float32."""
    from tlcli._tf import keras, tf

    k, t = keras(), tf()
    rewrite = _REWRITE.get((name, kind or device_kind()))
    before, options = k.mixed_precision.global_policy(), t.config.optimizer.get_experimental_options()
    k.mixed_precision.set_global_policy(name)
    if rewrite:
        t.config.optimizer.set_experimental_options({rewrite: True})
    try:
        yield
    finally:
        k.mixed_precision.set_global_policy(before)
        if rewrite:
            t.config.optimizer.set_experimental_options({rewrite: bool(options.get(rewrite, False))})
