"""Pick a tf.distribute strategy for the hardware: TPU, several GPUs, or the default."""

from __future__ import annotations

from dataclasses import dataclass

from tlcli._tf import tf
from tlcli.config import STRATEGIES
from tlcli.errors import UsageError


@dataclass
class Chosen:
    strategy: object
    name: str         # default | mirrored | tpu
    description: str  # what and where, for the user
    accelerator: bool = False  # GPU or TPU (else the CPU)

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def _tpu():
    t = tf()
    try:
        resolver = t.distribute.cluster_resolver.TPUClusterResolver()
        t.config.experimental_connect_to_cluster(resolver)
        t.tpu.experimental.initialize_tpu_system(resolver)
    except Exception:  # no TPU here: ValueError, NotFoundError, or a network error for a remote TPU_NAME
        return None
    return t.distribute.TPUStrategy(resolver)


def choose(name: str = "auto") -> Chosen:
    """``auto``: a TPU if TPUClusterResolver finds one, MirroredStrategy over >1 GPU, else the
    default strategy. ``mirrored`` uses all GPUs, or all logical CPU devices when there is no GPU."""
    if name not in STRATEGIES:
        raise UsageError(f"--strategy {name}: unknown; choose one of {', '.join(STRATEGIES)}")
    t = tf()
    if name in ("auto", "tpu"):
        tpu = _tpu()
        if tpu is not None:
            return Chosen(tpu, "tpu", f"TPUStrategy ({tpu.num_replicas_in_sync} cores)", accelerator=True)
        if name == "tpu":
            raise UsageError("--strategy tpu: no TPU found by TPUClusterResolver; use --strategy auto")
    gpus = t.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in t.config.list_logical_devices("CPU")]
        s = t.distribute.MirroredStrategy(devices=devices)
        return Chosen(s, "mirrored", f"MirroredStrategy over {len(devices)} device(s): {', '.join(devices)}",
                      accelerator=bool(gpus))
    s = t.distribute.get_strategy()
    where = gpus[0].name if gpus else "CPU"
    return Chosen(s, "default", f"default strategy on {where}", accelerator=bool(gpus))
