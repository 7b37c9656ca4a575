"""Pick a tf.distribute strategy for the hardware: several machines (TF_CONFIG), TPU, several
GPUs, or the default; and say when an NVIDIA GPU is here that TensorFlow does not see.

``--precision`` of fine-tuning (``resolve_precision``, ``precision_policy``): which Keras mixed-
precision policy, and on what hardware. A TF Hub SavedModel is traced for float32 only: under a
float16 policy its restored functions get float16 inputs and fail (tensorflow/hub#748, #854). So the
hub layer keeps its float32 policy and the cast happens at its boundary: images go in as float32,
its features are cast to the policy's compute dtype by the head's Dense, and the softmax and the
loss stay float32. The backbone's own arithmetic is lowered by TensorFlow's graph rewrite instead
(grappler's ``auto_mixed_precision`` on a GPU, ``auto_mixed_precision_onednn_bfloat16`` on a CPU),
which works on the traced graph. Variables stay float32, so the saved and exported models are
float32 whatever the policy was.

``auto``: mixed_float16 on a GPU of compute capability 7.0 or above, mixed_bfloat16 on a TPU,
float32 on a CPU: on this project's CPU (a Xeon without the ``amx_bf16`` or ``avx512_bf16``
flags), the bfloat16 rewrite made a MobileNetV2 fine-tuning step 1.8-2.2x slower (bench/distributed.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tlcli._tf import imported, tf
from tlcli.config import STRATEGIES, Precision
from tlcli.errors import UsageError
from tlcli.quiet import native_stderr_silenced
from tlcli.training import cluster as clusters


@dataclass
class Chosen:
    strategy: object
    name: str         # default | mirrored | tpu | multi_worker
    description: str  # what and where, for the user
    accelerator: bool = False  # GPU or TPU (else the CPU)
    cluster: clusters.Cluster | None = None  # with multi_worker: this worker's place
    hint: str | None = None  # a warning for the user: an NVIDIA GPU TensorFlow does not see (gpu_hint)

    @property
    def io_device(self) -> str | None:
        """The device that reads the backbone's files: the local host on a TPU, else the default."""
        return "/job:localhost" if self.name == "tpu" else None

    @property
    def static_shapes(self) -> bool:
        """Whether every batch must have the same shape (a TPU compiles one program per shape)."""
        return self.name == "tpu"

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU while NVIDIA's driver is loaded


def nvidia_gpu() -> str | None:
    """The model name of an NVIDIA GPU of this machine, found without TensorFlow (the driver's
    /proc files, else ``nvidia-smi -L`` within 5 s), or None: none, or hidden on purpose with an
    empty ``CUDA_VISIBLE_DEVICES`` (or -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None
    try:
        for info in sorted(NVIDIA_GPUS.glob("*/information")):
            models = [line.partition(":")[2].strip() for line in info.read_text(errors="replace").splitlines()
                      if line.startswith("Model:")]
            return (models or ["NVIDIA GPU"])[0] or "NVIDIA GPU"
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        lines = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [line.partition(":")[2].partition("(UUID")[0].strip() for line in lines if line.startswith("GPU ")]
    return (gpus[0] or "NVIDIA GPU") if gpus else None


def gpu_hint(gpus) -> str | None:
    """The one-line warning for a machine whose NVIDIA GPU TensorFlow does not see (``gpus``:
    TensorFlow's GPU devices): the commonest "TensorFlow does not use my GPU" case, a TensorFlow
    without its CUDA libraries, or a GPU newer than this TensorFlow supports. None otherwise."""
    if gpus:
        return None
    name = nvidia_gpu()
    if name is None:
        return None
    return (f"{name} found, but TensorFlow does not see it: training runs on the CPU. Install TensorFlow's CUDA "
            "libraries with pip install 'tensorflow[and-cuda]'; a GPU newer than this TensorFlow supports stays "
            "unseen (tensorflow#88122)")


def _tpu():
    t = tf()
    try:
        resolver = t.distribute.cluster_resolver.TPUClusterResolver()
        t.config.experimental_connect_to_cluster(resolver)
        t.tpu.experimental.initialize_tpu_system(resolver)
    except Exception:  # no TPU here: ValueError, NotFoundError, or a network error for a remote TPU_NAME
        return None
    return t.distribute.TPUStrategy(resolver)


def wants_cluster(name: str) -> clusters.Cluster | None:
    """The cluster ``--strategy name`` trains on: TF_CONFIG's with ``multi_worker``, and with
    ``auto`` when TF_CONFIG names more than one worker; else None. Raises ``UsageError`` for
    ``multi_worker`` without TF_CONFIG, or a TF_CONFIG that is not valid."""
    if name not in ("auto", "multi_worker"):
        return None
    found = clusters.from_env()
    if name == "multi_worker" and found is None:
        raise UsageError("--strategy multi_worker: TF_CONFIG is not set; give each worker the cluster's "
                         "addresses and its own task (docs/distributed.md), or use --strategy auto")
    return found if name == "multi_worker" or (found and found.size > 1) else None


def joined() -> bool:
    """Whether this process has joined its cluster already (``choose`` returns that strategy)."""
    return _multi_worker.cache_info().currsize > 0


@functools.cache
def _multi_worker(found: clusters.Cluster) -> Chosen:
    # Created before TensorFlow starts its runtime (tf() lists the devices, which starts it):
    # collectives can only be configured at program startup. Once per process.
    t = imported()
    try:
        with native_stderr_silenced():
            s = t.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=t.distribute.cluster_resolver.TFConfigClusterResolver(),
                communication_options=t.distribute.experimental.CommunicationOptions(
                    implementation=t.distribute.experimental.CommunicationImplementation.RING))
    except RuntimeError:  # "Collective ops must be configured at program startup"
        raise UsageError("--strategy multi_worker: TensorFlow already started in this process before the "
                         "cluster was joined; call tlcli.train in a fresh process") from None
    tf()
    gpus = t.config.list_logical_devices("GPU")
    return Chosen(s, "multi_worker", f"MultiWorkerMirroredStrategy: {found.name(found.index)} of {found.size}, "
                  f"{s.num_replicas_in_sync} replicas", accelerator=bool(gpus), cluster=found, hint=gpu_hint(gpus))


def choose(name: str = "auto") -> Chosen:
    """``auto``: MultiWorkerMirroredStrategy when TF_CONFIG names more than one worker (see
    ``wants_cluster``), a TPU if TPUClusterResolver finds one, MirroredStrategy over >1 GPU, else
    the default strategy. ``mirrored`` uses all GPUs, or all logical CPU devices when there is no
    GPU. A process joins one cluster only: later calls return the same strategy."""
    if name not in STRATEGIES:
        raise UsageError(f"--strategy {name}: unknown; choose one of {', '.join(STRATEGIES)}")
    found = wants_cluster(name)
    if found is not None:
        return _multi_worker(found)
    t = tf()
    if name in ("auto", "tpu"):
        tpu = _tpu()
        if tpu is not None:
            return Chosen(tpu, "tpu", f"TPUStrategy ({tpu.num_replicas_in_sync} cores)", accelerator=True)
        if name == "tpu":
            raise UsageError(f"--strategy tpu: no TPU found by TPUClusterResolver; and TensorFlow {t.__version__}, "
                             "which tlcli needs, has no TPU runtime (tensorflow-tpu on PyPI stops at 2.20, Cloud "
                             "TPU's runtime table at 2.18); use --strategy auto")
    gpus = t.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in t.config.list_logical_devices("CPU")]
        s = t.distribute.MirroredStrategy(devices=devices)
        return Chosen(s, "mirrored", f"MirroredStrategy over {len(devices)} device(s): {', '.join(devices)}",
                      accelerator=bool(gpus), hint=gpu_hint(gpus))
    s = t.distribute.get_strategy()
    where = gpus[0].name if gpus else "CPU"
    return Chosen(s, "default", f"default strategy on {where}", accelerator=bool(gpus), hint=gpu_hint(gpus))


# ---- --precision ------------------------------------------------------------------------------
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


def resolve_precision(name: str, *, kind: str | None = None, capability: tuple[int, int] | None = None) -> str:
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
def precision_policy(name: str, *, kind: str | None = None):
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
