"""The cluster a run belongs to: ``TF_CONFIG``, this worker's share of the images, collective
barriers through the strategy, and a watch on the other workers.

``TF_CONFIG`` is tf.distribute's own variable: ``{"cluster": {"chief": ["host:port"], "worker":
["host:port", ...]}, "task": {"type": "worker", "index": 0}}``. Workers are numbered chief
first, then the ``worker`` job in order; worker 0 is the chief (the ``chief`` task if there is
one, else ``worker`` 0, as tf.distribute decides).

A dead worker is noticed by ``Watch``: every second it opens a TCP connection to each peer's
gRPC port from ``TF_CONFIG``. When a peer that was up refuses or times out ``FAILURES`` times
in a row (or never comes up within ``STARTUP_SECONDS``), collectives are aborted so the main
thread's blocked step fails, and the run ends with ``ClusterError`` naming that worker. A
process that still has not ended ``GRACE_SECONDS`` later is ended by the watch itself (exit 1,
the same line on stderr): nothing waits forever on a worker that is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from tlcli.errors import TlcliError, UsageError

JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains with
INTERVAL_SECONDS = 1.0
FAILURES = 3
STARTUP_SECONDS = 120.0
GRACE_SECONDS = 15.0
_CHUNK_FLOATS = 8 << 20  # 32 MB of float32 per all-reduce when exchanging features


class ClusterError(TlcliError):
    """A worker of the cluster stopped, or the cluster cannot be formed."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in the cluster. ``workers`` are the ``host:port`` addresses, chief first."""

    workers: tuple[str, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def name(self, i: int) -> str:
        return f"worker {i} ({self.workers[i]}{', the chief' if i == 0 else ''})"

    def share(self, items: list) -> list:
        """This worker's share of ``items``: every ``size``-th one from position ``index``. The
        shares of all workers are disjoint, cover ``items`` and differ in length by at most one."""
        return list(items[self.index::self.size])

    def positions(self, n: int) -> np.ndarray:
        """Positions in a list of ``n`` items of this worker's ``share``."""
        return np.arange(self.index, n, self.size)


def _fail(why: str) -> UsageError:
    return UsageError(f"TF_CONFIG: {why}; see docs/distributed.md for its format")


def from_env(environ=None) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes, or None when it is unset or empty. Raises
    ``UsageError`` (one line naming TF_CONFIG) for JSON that is not a valid chief/worker cluster."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise _fail(f"not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise _fail('needs a "cluster" object')
    jobs, task = spec["cluster"], spec.get("task")
    other = sorted(set(jobs) - set(JOBS))
    if other:
        raise _fail(f"job {other[0]!r} is not supported (multi_worker uses only {' and '.join(JOBS)})")
    workers = []
    for job in JOBS:
        addresses = jobs.get(job, [])
        if not isinstance(addresses, list) or (job == "chief" and len(addresses) > 1):
            raise _fail(f'"{job}" must be a list of "host:port"' + (" with one entry" if job == "chief" else ""))
        for a in addresses:
            host, _, port = str(a).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _fail(f"{a!r} in {job!r} is not host:port")
        workers += [str(a) for a in addresses]
    if not workers:
        raise _fail("the cluster names no chief or worker")
    if not isinstance(task, dict) or task.get("type") not in JOBS or not isinstance(task.get("index"), int):
        raise _fail('needs "task": {"type": "chief" or "worker", "index": N}')
    kind, i = task["type"], task["index"]
    if not 0 <= i < len(jobs.get(kind, [])):
        raise _fail(f"task {kind} {i} is not in the cluster's {kind!r} list")
    return Cluster(tuple(workers), i + (len(jobs.get("chief", [])) if kind == "worker" else 0))


def all_sum(strategy, values: np.ndarray, *, timeout_seconds: float | None = None) -> np.ndarray:
    """The element-wise sum over the workers of float32 ``values`` (each worker passes its own,
    of the same shape): a collective all-reduce through ``strategy``, so it is also a barrier.
    Only one replica per worker contributes."""
    from tlcli._tf import tf

    t = tf()
    options = t.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    local = np.asarray(values, np.float32)
    zero = np.zeros_like(local)

    def step():
        ctx = t.distribute.get_replica_context()
        mine = t.cond(t.equal(ctx.replica_id_in_sync_group % len(strategy.extended.worker_devices), 0),
                      lambda: t.constant(local), lambda: t.constant(zero))
        return ctx.all_reduce(t.distribute.ReduceOp.SUM, mine, options=options)

    out = strategy.run(t.function(step))
    return np.asarray(strategy.experimental_local_results(out)[0])


def gather_counts(strategy, cluster: Cluster, counts: list[int]) -> list[list[int]]:
    """Every worker's ``counts`` (one list per worker, in worker order); a barrier."""
    table = np.zeros((cluster.size, len(counts)), np.float32)
    table[cluster.index] = counts
    return all_sum(strategy, table).round().astype(int).tolist()


def exchange_rows(strategy, cluster: Cluster, n: int, mine: np.ndarray) -> np.ndarray:
    """The [n, d] float32 matrix whose rows ``cluster.positions(n)`` each worker computed
    (``mine``, in that order): an all-reduce of the zero-filled matrix, in chunks of rows."""
    # A worker with an empty share has no width of its own; every other has the backbone's.
    d = max(row[0] for row in gather_counts(strategy, cluster, [mine.shape[1] if mine.ndim == 2 else 0]))
    full = np.zeros((n, d), np.float32)
    if d:
        full[cluster.positions(n)] = mine
    step = max(1, _CHUNK_FLOATS // max(d, 1))
    for start in range(0, n, step):
        full[start:start + step] = all_sum(strategy, full[start:start + step])
    return full


class Watch:
    """The watch on the other workers (see the module docstring). ``dead`` is the message once
    one has stopped. Use as a context manager around the cluster's work; ``check(exc)`` turns an
    exception raised after a death into the ``ClusterError`` that names the worker."""

    def __init__(self, cluster: Cluster, *, interval: float = INTERVAL_SECONDS, failures: int = FAILURES,
                 startup: float = STARTUP_SECONDS, grace: float = GRACE_SECONDS):
        self.cluster, self.interval, self.failures = cluster, interval, failures
        self.startup, self.grace = startup, grace
        self.dead: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlcli-cluster-watch", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb):
        self._stop.set()
        self._thread.join()
        if exc is not None and self.dead:
            raise ClusterError(self.dead) from None
        return False

    def _up(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(self.interval, 1.0)):
                return True
        except OSError:
            return False

    def _run(self) -> None:
        peers = [i for i in range(self.cluster.size) if i != self.cluster.index]
        seen, missed, began = set(), dict.fromkeys(peers, 0), time.monotonic()
        while not self._stop.wait(self.interval):
            for i in peers:
                if self._up(self.cluster.workers[i]):
                    seen.add(i)
                    missed[i] = 0
                    continue
                missed[i] += 1
                if i in seen and missed[i] >= self.failures:
                    return self._died(f"{self.cluster.name(i)} stopped (no answer on its port for "
                                      f"{self.failures * self.interval:.0f} s); this worker stops too. Restart "
                                      "every worker, with --resume to continue from the chief's last epoch")
                if i not in seen and time.monotonic() - began > self.startup:
                    return self._died(f"{self.cluster.name(i)} did not come up within {self.startup:.0f} s; "
                                      "start every worker named in TF_CONFIG")

    def _died(self, message: str) -> None:
        self.dead = f"cluster: {message}"
        try:
            from tensorflow.python.eager import context  # the one way to unblock a waiting collective

            context.context().abort_collective_ops(14, self.dead)  # 14: UNAVAILABLE
        except Exception:  # TensorFlow not started yet, or collectives not configured
            pass
        if not self._stop.wait(self.grace):
            sys.stderr.write(f"tlcli: {self.dead}\n")
            sys.stderr.flush()
            os._exit(1)
