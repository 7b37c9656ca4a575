"""Training on a cluster of workers (``--strategy multi_worker``): where each worker writes,
sharded feature extraction, and the end of the run.

Every worker runs the whole recipe, so that every collective (fine-tuning steps, the evaluation
of the holdout, the exchange of features) is entered by all of them in the same order. Only
the chief's ``--out`` is real: the others write into a private temporary folder that is removed
at the end (tf.distribute's rule for saving from non-chief workers), so they never touch
``--out``, its lock or its resume state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

from tlcli import features
from tlcli._tf import imported
from tlcli.config import TrainConfig
from tlcli.errors import Interrupted, UsageError
from tlcli.progress import Callback, Info, Warn, silent
from tlcli.training import cluster as clusters
from tlcli.training import run_state


@dataclass
class Node:
    """This worker of a cluster run: ``config`` is the run's config as this worker runs it
    (a non-chief's ``out`` is inside ``scratch``), ``out`` the chief's ``--out``."""

    cluster: clusters.Cluster
    config: TrainConfig
    out: str
    scratch: Path | None = None


def join(cfg: TrainConfig, progress: Callback = silent) -> tuple[TrainConfig, Node | None]:
    """Join the cluster ``cfg.strategy`` asks for (``strategy.wants_cluster``), creating the
    strategy now, before anything starts TensorFlow's runtime, within ``cluster.STARTUP_SECONDS``
    (``cluster.join``: ``ClusterError`` for a worker that does not come up, ``Interrupted`` on
    Ctrl-C or SIGTERM meanwhile). Says so first, and warns that TensorFlow's server of this worker
    listens on every network interface (``cluster.exposure``). Returns (the config this worker
    runs, the node), or (``cfg``, None) on one machine. A non-chief worker
    gets a private ``out`` (and no TensorBoard log); with ``--resume`` it starts from a copy of
    the chief's resume state, so ``--out`` must be on a folder every worker sees (``UsageError``,
    one line naming ``--out``, when the chief's state is not there)."""
    from tlcli.training import strategy

    found = strategy.wants_cluster(cfg.strategy)
    if found is None:
        return cfg, None
    if not strategy.joined():  # a later run of this process trains on the cluster it joined
        progress(Info(f"cluster: {found.name(found.index)} of {found.size}, joining; every worker named in "
                      f"TF_CONFIG must start within {clusters.STARTUP_SECONDS:.0f} s"))
        progress(Warn(clusters.exposure(found)))
        imported()  # first, so that the workers' wait for each other does not include it
        clusters.join(found, functools.partial(strategy.choose, cfg.strategy))
    strategy.choose(cfg.strategy)
    if found.is_chief:
        return cfg, Node(found, cfg, cfg.out)
    chief_partial = run_state.partial_dir(cfg.out)
    if cfg.resume and not (chief_partial / run_state.STATE_FILE).is_file():
        raise UsageError(f"--resume: no interrupted run to continue for --out {cfg.out} ({found.name(found.index)} "
                         "continues from the chief's progress beside it, so --out must be on a folder every worker "
                         "sees); run without --resume")
    scratch = Path(tempfile.mkdtemp(prefix=f"tlcli-worker{found.index}-"))
    mine = cfg.replace(out=str(scratch / "model"), tensorboard=None)
    if cfg.resume:  # the chief writes its progress only after every worker has joined: the copy is whole
        shutil.copytree(chief_partial, run_state.partial_dir(mine.out))
    return mine, Node(found, mine, cfg.out, scratch)


@contextlib.contextmanager
def session(node: Node | None):
    """The cluster around one run of the recipe: inside, the cluster's ``Watch`` (a dead worker
    stops the others) after a barrier that checks every worker started alike. Yields
    ``finish(result)``, which the recipe calls on its TrainResult: a last collective that tells
    every worker the others' extraction counts (and keeps the cluster together until all are
    done), returning the result as this worker reports it. Without a cluster ``finish`` returns
    the result as it is."""
    if node is None:
        yield lambda result: result
        return
    from tlcli.training import strategy

    try:
        with clusters.Watch(node.cluster, seen=range(node.cluster.size)):  # all of them joined
            chosen = strategy.choose(node.config.strategy)
            _same_start(chosen.strategy, node)
            yield functools.partial(_finish, chosen, node)
    except Interrupted:
        if node.cluster.is_chief:
            raise
        # Its own folder is a private one, about to go: what counts is what the chief left beside --out.
        raise Interrupted(f"interrupted: {node.cluster.name(node.cluster.index)} writes nothing into --out; "
                          f"{run_state.left_behind(node.out)}") from None
    finally:
        if node.scratch is not None:
            shutil.rmtree(node.scratch, ignore_errors=True)


def _finish(chosen, node: Node, result):
    counts = clusters.gather_counts(chosen.strategy, node.cluster, [result.extracted])
    return dataclasses.replace(
        result, model_dir=result.model_dir if node.cluster.is_chief else None, worker=node.cluster.index,
        extracted_by_worker=[row[0] for row in counts])


def _same_start(strategy, node: Node) -> None:
    """A barrier before the recipe that also checks that every worker was started with
    ``--resume``, or none: a worker that starts over while another continues would run other
    steps than it, and the collectives would pair the wrong ones. Raises ``UsageError`` naming them."""
    started = [row[0] for row in clusters.gather_counts(strategy, node.cluster, [int(node.config.resume)])]
    if len(set(started)) > 1:
        with_, without = ([node.cluster.name(i) for i, f in enumerate(started) if f == flag] for flag in (1, 0))
        raise UsageError(f"--resume: {', '.join(with_)} started with --resume and {', '.join(without)} without; "
                         "start every worker with the same command (all with --resume to continue the chief's "
                         "run, or none)")


def views_step(chosen):
    """The feature step for ``chosen`` (``strategy.Chosen``): ``features.compute_views``, or
    ``sharded_views`` on a cluster."""
    return features.compute_views if chosen.cluster is None else functools.partial(sharded_views, chosen)


def sharded_views(chosen, samples, *, keep: features.FeatureViews | None = None, **options) -> features.FeatureViews:
    """``features.compute_views`` over a cluster: this worker computes the views of its share of
    ``samples`` (``Cluster.share``) through its cache, then the workers exchange their rows by
    all-reduce, so every worker holds the views of all ``samples``. ``extracted`` and ``cached``
    count this worker's share only."""
    c, s = chosen.cluster, chosen.strategy
    share = c.share(samples)
    kept = None
    if keep is not None:
        rows = keep.rows(share)
        kept = features.FeatureViews(share, keep.plain[rows], None, 0, len(share))
    # On a thread of its own, outside the strategy's scope (scopes are per thread): there Keras'
    # predict runs on this worker alone, where in the scope it would split the batches across
    # the cluster and gather them again.
    with futures.ThreadPoolExecutor(1, thread_name_prefix="tlcli-extract") as pool:
        mine = pool.submit(features.compute_views, share, keep=kept, **options).result()
    n = len(samples)
    plain = keep.plain if keep is not None else clusters.exchange_rows(s, c, n, mine.plain)
    mirror = None if mine.mirror is None else clusters.exchange_rows(s, c, n, mine.mirror)
    # Each worker checked LiteRT's parity on its own share: the views are LiteRT's only if every
    # worker's were (a mixed set is recorded as "mixed", and the parity warning names the worker).
    on_litert = clusters.gather_counts(s, c, [int(mine.engine == "litert")])
    engine = mine.engine if len({row[0] for row in on_litert}) == 1 else "mixed"
    return features.FeatureViews(list(samples), plain, mirror, mine.extracted, mine.cached, engine)
