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

Joining comes first (``join``): tf.distribute's strategy waits until every worker has joined,
in native code during which Python can act on nothing, so the workers first meet in Python, each
answering on its own port: a peer that does not come up within ``STARTUP_SECONDS`` is a one-line
``ClusterError``, and Ctrl-C or SIGTERM meanwhile an ``Interrupted``.

TensorFlow's gRPC server listens on every network interface whatever host ``TF_CONFIG`` names
(it binds ``0.0.0.0:PORT``, which gRPC widens to ``[::]``; no option narrows it) and serves
without authentication: ``exposure`` is the warning said before joining.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from tlcli.errors import Interrupted, TlcliError, UsageError
from tlcli.interrupts import sigterm_as_interrupt

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


def _show(value) -> str:
    return json.dumps(value)[:60]


def _addresses(job: str, addresses) -> list[str]:
    """The ``host:port`` addresses of ``job``, checked. Raises ``UsageError``."""
    if not isinstance(addresses, list) or (job == "chief" and len(addresses) > 1):
        raise _fail(f'"{job}" must be a list of "host:port" strings' + (" with one entry" if job == "chief" else "")
                    + f", not {_show(addresses)}")
    for a in addresses:
        host, _, port = a.rpartition(":") if isinstance(a, str) else ("", "", "")
        if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536) \
                or not host.isprintable() or any(c.isspace() for c in host):
            raise _fail(f'{_show(a)} in "{job}" is not a "host:port" string')
    return addresses


def from_env(environ=None) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes, or None when it is unset or empty. Raises
    ``UsageError`` (one line naming TF_CONFIG) for JSON that is not a valid chief/worker cluster:
    every field tf.distribute reads is checked for its type (a JSON ``true`` is not an index)."""
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
    workers = [a for job in JOBS for a in _addresses(job, jobs.get(job, []))]
    if not workers:
        raise _fail("the cluster names no chief or worker")
    twice = next((a for i, a in enumerate(workers) if a in workers[:i]), None)
    if twice:
        raise _fail(f"{twice!r} is named twice; every worker needs an address of its own")
    for key in ("rpc_layer", "environment"):
        if key in spec and not isinstance(spec[key], str):
            raise _fail(f'"{key}" must be a string, not {_show(spec[key])}')
    if spec.get("rpc_layer", "grpc") not in ("grpc", ""):
        raise _fail(f'"rpc_layer" {_show(spec["rpc_layer"])} is not supported; leave it out (gRPC)')
    if not isinstance(task, dict) or task.get("type") not in JOBS or type(task.get("index")) is not int:
        raise _fail('needs "task": {"type": "chief" or "worker", "index": N} with N an integer, not '
                    + _show(task))
    kind, i = task["type"], task["index"]
    if not 0 <= i < len(jobs.get(kind, [])):
        raise _fail(f"task {kind} {i} is not in the cluster's {kind!r} list")
    return Cluster(tuple(workers), i + (len(jobs.get("chief", [])) if kind == "worker" else 0))


def exposure(cluster: Cluster) -> str:
    """The warning that this worker's TensorFlow server is reachable from the network (see the
    module docstring)."""
    host, _, port = cluster.workers[cluster.index].rpartition(":")
    return (f"cluster: TensorFlow serves this worker on port {port} of every network interface, not only {host} "
            "(it cannot be bound to one address), without authentication: whoever reaches the port can run "
            "TensorFlow operations in this process; train on a trusted network, or firewall the port")


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


class _Peers:
    """The probe of the other workers: ``check()``, called once per ``interval``, opens a TCP
    connection to each peer's port and returns the message for a peer that stopped (``failures``
    misses in a row after it was up) or that has not come up ``startup`` seconds after the
    first check; else None. ``seen``: peers known to be up already. With ``stops`` False, a peer
    up once is not reported as stopped (while joining, its port is handed to TensorFlow)."""

    def __init__(self, cluster: Cluster, *, interval: float, failures: int, startup: float, seen=(), after: str):
        self.cluster, self.interval, self.failures, self.startup, self.after = (
            cluster, interval, failures, startup, after)
        self.peers = [i for i in range(cluster.size) if i != cluster.index]
        self.seen, self.missed, self.began = set(seen), dict.fromkeys(self.peers, 0), time.monotonic()

    def _up(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(self.interval, 1.0)):
                return True
        except OSError:
            return False

    def check(self, *, stops: bool = True) -> str | None:
        for i in self.peers:
            if self._up(self.cluster.workers[i]):
                self.seen.add(i)
                self.missed[i] = 0
                continue
            self.missed[i] += 1
            if stops and i in self.seen and self.missed[i] >= self.failures:
                return (f"{self.cluster.name(i)} stopped (no answer on its port for {self.failures * self.interval:.0f}"
                        f" s); this worker stops too. {self.after}")
            if i not in self.seen and time.monotonic() - self.began > self.startup:
                return (f"{self.cluster.name(i)} did not come up within {self.startup:.0f} s; start every worker "
                        "named in TF_CONFIG")
        return None


_AFTER_START = "Restart every worker, with --resume to continue from the chief's last epoch"


def join(cluster: Cluster, create, *, interval: float = INTERVAL_SECONDS, startup: float | None = None):
    """``create()``, the strategy of ``cluster``, once every worker is there. tf.distribute waits
    inside ``create`` until every worker has joined, in native code that holds Python's lock:
    nothing in this process can act meanwhile, not even on SIGTERM (TensorFlow's coordination
    service takes SIGTERM over, and only notes it). So the workers meet first in Python
    (``_rendezvous``), within ``startup`` seconds (default ``STARTUP_SECONDS``): a peer that does
    not come up raises ``ClusterError``, Ctrl-C or SIGTERM ``Interrupted``, one line each. The
    native wait that follows is short; should a peer vanish in between, faulthandler ends the
    process ``startup`` seconds later (exit 1, printing where it waited). An error of ``create``
    from TensorFlow is a one-line ``ClusterError``. SIGTERM gets its previous handling back
    afterwards. Returns what ``create`` returned."""
    startup = STARTUP_SECONDS if startup is None else startup
    me = cluster.name(cluster.index)
    with sigterm_as_interrupt():  # its end also takes SIGTERM back from TensorFlow's coordination service
        try:
            _rendezvous(cluster, interval=interval, startup=startup)
            with _backstop(startup):
                return create()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while {me} was joining the cluster; nothing was written") from None
        except Exception as exc:
            if _from_tensorflow(exc):
                raise ClusterError(f"cluster: {me} could not join ({_first_line(exc)}); check TF_CONFIG's "
                                   "addresses") from None
            raise


def _rendezvous(cluster: Cluster, *, interval: float, startup: float) -> None:
    """Answer on this worker's port (a plain listener, until TensorFlow's server takes the port
    over) and wait until every peer has answered on its own (``_Peers``)."""
    listener = _listener(cluster)
    peers = _Peers(cluster, interval=interval, failures=FAILURES, startup=startup, after="")
    try:
        while True:
            why = peers.check(stops=False)  # a peer seen once may be starting TensorFlow's server now
            if why:
                raise ClusterError(f"cluster: {why}")
            if peers.seen >= set(peers.peers):
                return
            _drain(listener)
            time.sleep(interval)
    finally:
        _drain(listener)
        listener.close()


def _listener(cluster: Cluster) -> socket.socket:
    """A TCP listener on this worker's ``TF_CONFIG`` port: on its host, else on every interface
    (a name that is not an address of this machine). Raises ``ClusterError`` for a port in use."""
    host, _, port = cluster.workers[cluster.index].rpartition(":")
    host = host.strip("[]")
    for where in (host, ""):
        s = socket.socket(socket.AF_INET6 if ":" in host and where else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((where, int(port)))
            s.listen(128)
            s.setblocking(False)
            return s
        except OSError as exc:
            s.close()
            if exc.errno == errno.EADDRINUSE:
                raise ClusterError(f"cluster: port {port} of {cluster.name(cluster.index)} is in use by another "
                                   "program; end it, or give this worker another port in TF_CONFIG") from None
            failure = exc
    raise ClusterError(f"cluster: {cluster.name(cluster.index)} cannot listen on port {port} ({failure}); check "
                       "TF_CONFIG's address for it")


def _drain(listener: socket.socket) -> None:
    """Accept and reset the peers' probes (reset: no TIME_WAIT left on the port TensorFlow binds next)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # none waiting
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


@contextlib.contextmanager
def _backstop(seconds: float):
    """faulthandler's watchdog (a native thread, which needs no Python lock) ends the process
    after ``seconds`` unless the block is done, printing where it waited on the real stderr."""
    import faulthandler

    try:
        stream = os.fdopen(os.dup(2), "w")
    except OSError:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=stream)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        stream.close()


def _from_tensorflow(exc: BaseException) -> bool:
    return type(exc).__module__.partition(".")[0] == "tensorflow"


# What a collective raises when a peer is gone or the watch aborted it.
_COLLECTIVE_ERRORS = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError")


def _collective_failed(exc: BaseException | None) -> bool:
    """Whether ``exc`` is TensorFlow's error for a collective with the other workers that failed."""
    return exc is not None and _from_tensorflow(exc) and (
        type(exc).__name__ in _COLLECTIVE_ERRORS or "ollective" in str(exc)[:500])


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class Watch:
    """The watch on the other workers (see the module docstring). ``dead`` is the message once
    one has stopped. Use as a context manager around the cluster's work; on the way out, an
    exception raised after a death becomes the ``ClusterError`` that names the worker, and
    TensorFlow's error for a collective that failed a one-line ``ClusterError`` too: it waits first,
    a few intervals at most, for the watch to name the worker that stopped. ``seen``: the peers
    known to be up (those that joined): one that stops is named as stopped, not as absent."""

    def __init__(self, cluster: Cluster, *, interval: float = INTERVAL_SECONDS, failures: int = FAILURES,
                 startup: float = STARTUP_SECONDS, grace: float = GRACE_SECONDS, seen=()):
        self.cluster, self.interval, self.failures, self.grace = cluster, interval, failures, grace
        self.peers = _Peers(cluster, interval=interval, failures=failures, startup=startup, seen=seen,
                            after=_AFTER_START)
        self.dead: str | None = None
        self._stop, self._decided = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlcli-cluster-watch", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, kind, exc, tb):
        failed = _collective_failed(exc)
        if failed and self.dead is None:  # TensorFlow may notice before FAILURES probes have missed
            self._decided.wait((self.failures + 2) * max(self.interval, 1.0))
        self._stop.set()
        self._thread.join()
        if exc is not None and self.dead:
            raise ClusterError(self.dead) from None
        if failed:
            raise ClusterError(f"cluster: a collective operation with the other workers failed ({_first_line(exc)}"
                               f"); this worker stops too. {_AFTER_START}") from None
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            why = self.peers.check()
            if why:
                return self._died(why)

    def _died(self, message: str) -> None:
        self.dead = f"cluster: {message}"
        self._decided.set()
        try:
            from tensorflow.python.eager import context  # the one way to unblock a waiting collective

            context.context().abort_collective_ops(14, self.dead)  # 14: UNAVAILABLE
        except Exception:  # TensorFlow not started yet, or collectives not configured
            pass
        if not self._stop.wait(self.grace):
            from tlcli._tf import remove_autograph_files

            sys.stderr.write(f"tlcli: {self.dead}\n")
            sys.stderr.flush()
            remove_autograph_files()  # os._exit skips autograph's own atexit removal
            os._exit(1)
