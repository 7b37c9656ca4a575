"""Training on a cluster of local workers, and fine-tuning precision, on this machine.

    .venv/bin/python bench/distributed.py [--images 120] [--batch-size 16] [--steps 3]

On MobileNetV2 (../shared) and the hymenoptera training images (the first --images of them,
copied to a temporary folder, half per class):

* sharded extraction: images/s of the frozen feature step, ``tlcli.train`` in 1 process
  (--strategy default) and on 2 local workers (TF_CONFIG on 127.0.0.1): the slowest worker's
  extraction time counts, as the cluster waits for it;
* fine-tuning: images/s of one --fine-tune epoch, 1 process against 2 workers (global batch =
  per-replica batch x 2);
* communication per step: the all-reduce of a float32 vector the size of MobileNetV2's
  trainable weights between the 2 workers (the gradient exchange of one synchronous step);
* fine-tuning step time (one whole batch, forward + backward + Adam) under float32 and
  mixed_bfloat16, each in its own process, and whether this CPU reports bfloat16 arithmetic.

Each figure is printed with its ratio to the 1-process / float32 baseline of the same run. The
physical limit of 2 workers on one machine is its cores: both share them, so no speed-up is
possible beyond cores / the cores one process already uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, REPO, require  # noqa: E402
from tests.helpers import free_ports  # noqa: E402

WORKER = r"""
import json, sys, time
import tlcli
from tlcli.progress import End, Start
marks = {}

def progress(e):
    if isinstance(e, (Start, End)) and e.task in ("extract", "fine-tune"):
        marks[f"{e.task}:{type(e).__name__}"] = time.perf_counter()
args = json.loads(sys.argv[1])
r = tlcli.train(progress=progress, **args)
print(json.dumps({"marks": marks, "extracted": r.extracted, "train": sum(r.train_counts.values()),
                  "fine_tune_epochs": r.fine_tune_epochs, "replicas": r.replicas}))
"""

COMM = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
from tlcli.training import strategy
chosen = strategy.choose("multi_worker")
s, vec = chosen.strategy, tf.ones([int(sys.argv[1])], tf.float32)

@tf.function
def step():  # one traced function, as in a training step: the all-reduce alone is timed
    return s.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", vec))

step()  # warm-up: traces it and builds the collective
began = time.perf_counter()
for _ in range(int(sys.argv[2])):
    s.experimental_local_results(step())[0].numpy()
print(json.dumps({"seconds": (time.perf_counter() - began) / int(sys.argv[2])}))
"""

STEP = r"""
import json, sys, time
import numpy as np
from tlcli.model import backbone
from tlcli.model import classifier as model
from tlcli.training import strategy as precision
from tlcli._tf import keras
policy, batch, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
k = keras()
loaded = backbone.load(backbone.resolve_spec(sys.argv[1], 224), trainable=True)
head = model.build_head(loaded.feature_dim, 2, dropout=0.2, l2=0.0, seed=0)
with precision.precision_policy(policy, kind="CPU"):
    trained = model.build_classifier(loaded.layer, head if policy == "float32"
                                     else model.head_under_policy(head, policy), 224)
    trained.compile(k.optimizers.Adam(1e-5), "categorical_crossentropy")
    x = np.random.default_rng(0).random((batch, 224, 224, 3), np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(batch) % 2]
    trained.train_on_batch(x, y)  # traces and optimises the step
    began = time.perf_counter()
    for _ in range(steps):
        trained.train_on_batch(x, y)
print(json.dumps({"seconds": (time.perf_counter() - began) / steps}))
"""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU reports native bfloat16 arithmetic (``amx_bf16`` or ``avx512_bf16`` in
    /proc/cpuinfo's flags; False where there is no such file)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags |= set(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _launch(code, argv, workers: int):
    """Run ``code`` in ``workers`` processes (a TF_CONFIG cluster when more than one); their JSON."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(workers)]
    procs = []
    for i in range(workers):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode}): {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _subset(root: Path, images: int) -> Path:
    src = HYMENOPTERA / "train"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[: images // 2]:
            shutil.copy(f, root / cls.name / f.name)
    return root


def _train(data: Path, tmp: Path, name: str, workers: int, *, fine_tune: bool, batch: int):
    args = dict(data_dir=str(data), backbone=str(MOBILENET_V2), image_size=224, out=str(tmp / name / "model"),
                cache_dir=str(tmp / name / "cache"), tensorboard=None, batch_size=batch, val_split=0.0,
                fine_tune=fine_tune, fine_tune_epochs=1, holdout=0.0, mirror=False, precision="float32")
    (tmp / name).mkdir()
    runs = _launch(WORKER, [json.dumps(args)], workers)
    task = "fine-tune" if fine_tune else "extract"
    seconds = max(r["marks"][f"{task}:End"] - r["marks"][f"{task}:Start"] for r in runs)
    images = runs[0]["train"] * (runs[0]["fine_tune_epochs"] if fine_tune else 1)
    return images / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16, help="per replica")
    ap.add_argument("--steps", type=int, default=3, help="timed fine-tuning steps per precision")
    ap.add_argument("--parts", default="extract,fine-tune,comm,precision",
                    help="comma-separated: which of extract, fine-tune, comm, precision to run")
    a = ap.parse_args()
    require(HYMENOPTERA / "train", MOBILENET_V2)
    from tlcli.training import strategy as precision

    print(f"cores: {os.cpu_count()}; CPU bfloat16 flags (amx_bf16/avx512_bf16): {cpu_has_bf16()}")
    with tempfile.TemporaryDirectory(prefix="tlcli-bench-") as t:
        tmp = Path(t)
        data = _subset(tmp / "images", a.images)
        parts = set(a.parts.split(","))
        for fine_tune, what in ((False, "sharded extraction"), (True, "fine-tuning (1 epoch)")):
            if ("fine-tune" if fine_tune else "extract") not in parts:
                continue
            rate1, s1 = _train(data, tmp, f"{what[:4]}-1", 1, fine_tune=fine_tune, batch=a.batch_size)
            rate2, s2 = _train(data, tmp, f"{what[:4]}-2", 2, fine_tune=fine_tune, batch=a.batch_size)
            print(f"{what}: 1 worker {rate1:.1f} images/s ({s1:.1f} s), 2 workers {rate2:.1f} images/s "
                  f"({s2:.1f} s): x{rate2 / rate1:.2f}")
        params = 2_257_984  # MobileNetV2 100/224's trainable weights (with a 2-class head: + 2,562)
        if "comm" in parts:
            comm = _launch(COMM, [str(params), "10"], 2)
            step_ms = max(r["seconds"] for r in comm) * 1e3
            print(f"communication per step: all-reduce of {params * 4 / 1e6:.1f} MB between 2 workers: "
                  f"{step_ms:.1f} ms")
        if "precision" not in parts:
            return
        times = {}
        for policy in ("float32", "mixed_bfloat16", "float32", "mixed_bfloat16"):  # interleaved: noise hits both
            (r,) = _launch(STEP, [str(MOBILENET_V2), policy, str(a.batch_size), str(a.steps)], 1)
            times.setdefault(policy, []).append(r["seconds"])
        f32, bf16 = min(times["float32"]), min(times["mixed_bfloat16"])
        print(f"fine-tuning step (batch {a.batch_size}, 224 px): float32 {f32:.2f} s, mixed_bfloat16 {bf16:.2f} s: "
              f"bf16/f32 time x{bf16 / f32:.2f} -> --precision auto on this CPU: "
              f"{'mixed_bfloat16' if bf16 < f32 else 'float32'} "
              f""
              f"({precision.resolve_precision('auto', kind='CPU')} chosen)")


if __name__ == "__main__":
    main()
