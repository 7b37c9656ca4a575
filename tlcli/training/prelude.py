"""What a training run starts before TensorFlow: the file check, and LiteRT's frozen features of
the images it decodes.

A cold CPU run's first seconds go to importing TensorFlow and loading the backbone, on one core
and mostly holding the GIL. The file check decodes every image meanwhile (Pillow releases the
GIL), and LiteRT's kernels, which release it too, need no TensorFlow once the backbone's
conversion is cached. So ``started`` begins the check on a thread at once and, when LiteRT is
likely to be the run's engine (``likely_litert``) and a valid conversion of this backbone is
cached, a second thread that runs each image the check keeps (``images.KeptPixels`` with a feed)
through LiteRT, putting its features into the feature store under the very keys
``features.compute_views`` reads (``features.view_key``). The extraction proper then finds them
there and runs only on what is left: images past the pixel budget, or everything when the
engine turns out to be TensorFlow. Nothing here decides the engine: ``compute_views`` still
measures parity against TensorFlow and falls back, and LiteRT's entries never serve a
TensorFlow fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import threading
from concurrent import futures

import numpy as np

from tlcli import data, features
from tlcli.config import TrainConfig, tunes
from tlcli.data import images
from tlcli.features.store import model_store
from tlcli.model import litert as litert_backbone
from tlcli.model.backbone import cache_key
from tlcli.progress import Advance, Callback, End, Start

AHEAD_BATCH = 4 * litert_backbone.RUN_BATCH  # images handed to LiteRT at a time, at most
# Device files of a GPU or TPU (NVIDIA, TPU VMs, ROCm, WSL2's GPU): with --extractor auto, their
# presence means TensorFlow will probably list an accelerator (and use itself), so nothing is
# extracted ahead.
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd", "/dev/dxg")
TPU_ENVIRONMENT = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE")


def likely_litert(requested: str) -> bool:
    """Whether ``--extractor requested`` will probably use LiteRT, judged without TensorFlow:
    ``litert``, or ``auto`` on a machine without a GPU's or TPU's device files or TPU settings.
    A guess only (``litert_backbone.engine_for`` decides, once TensorFlow is up); a wrong one
    costs the work done ahead, never a result."""
    if requested != "auto":
        return requested == "litert"
    return not (any(os.environ.get(name) for name in TPU_ENVIRONMENT)
                or any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES))


@dataclasses.dataclass
class Prelude:
    """The running file check (``splits()`` waits for it) and what it keeps: ``pixels`` (None
    unless LiteRT is likely), ``runner`` (the cached LiteRT backbone, or None: nothing is
    extracted ahead) and ``extracted``, the vectors put into the store ahead (final once
    ``finish`` has returned)."""

    scan: futures.Future
    pixels: images.KeptPixels | None
    runner: litert_backbone.LiteRTBackbone | None
    stopping: threading.Event  # set: the check gives up
    size: int  # the image size the check decodes for, and the ahead extracts at
    halted: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: the ahead stops
    extracted: int = 0
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def splits(self) -> data.Splits:
        return self.scan.result()

    def cancel(self) -> None:
        """Stop the extraction ahead (the run's engine is not LiteRT after all, or not this
        runner); what it did stays in the store. The check goes on."""
        self.halted.set()

    def finish(self) -> int:
        """Wait for the extraction ahead to drain (the check has ended) and return
        ``extracted``; raise what the thread raised."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.extracted

    def credit(self, views: features.FeatureViews, image_size: int) -> features.FeatureViews:
        """``views`` (at ``image_size``) counting the vectors extracted ahead as extracted (the
        store gave them to ``compute_views`` as cached), when they came from the same engine at
        the same size (else the ahead's entries were under another key, and none was used)."""
        if views.engine != "litert" or not self.extracted or image_size != self.size:
            return views
        moved = min(self.extracted, views.cached)
        return dataclasses.replace(views, extracted=views.extracted + moved, cached=views.cached - moved)


@contextlib.contextmanager
def started(cfg: TrainConfig, spec, *, ahead: bool = True, progress: Callback, splits: data.Splits | None = None):
    """The ``Prelude`` of a run of ``cfg`` with backbone ``spec``, stopped (the check given up,
    the extraction ahead ended and its store entries flushed) when the block is left, whatever
    the reason. ``ahead``: whether features may be extracted ahead (not on a cluster, whose
    workers each extract their own share). ``splits``: the check already done (the backbone
    choice's): nothing is checked or extracted ahead."""
    size = spec.image_size or 224
    if splits is not None:
        done = futures.Future()
        done.set_result(splits)
        yield Prelude(done, None, None, threading.Event(), size)
        return
    likely = likely_litert(cfg.extractor)
    runner = litert_backbone.cached_runner(cfg.cache_dir, cache_key(spec, size), size) \
        if likely and ahead else None
    pixels = images.KeptPixels(size, feed=runner is not None) if likely else None
    stopping, prelude = threading.Event(), None
    pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlcli-scan")
    try:
        scan = pool.submit(data.scan_splits, cfg, image_size=size, progress=progress, stopping=stopping, keep=pixels)
        if pixels is not None:
            scan.add_done_callback(lambda _: pixels.close())
        prelude = Prelude(scan, pixels, runner, stopping, size)
        if runner is not None:
            prelude._thread = threading.Thread(target=_extract_ahead, name="tlcli-ahead", daemon=True,
                                               args=(prelude, cfg, spec, progress))
            prelude._thread.start()
        yield prelude
    finally:
        stopping.set()
        if prelude is not None:
            prelude.halted.set()
        if pixels is not None:
            pixels.close()
        pool.shutdown(wait=True)  # what the check raised after a failure elsewhere is moot
        if prelude is not None and prelude._thread is not None:
            prelude._thread.join()


def _extract_ahead(prelude: Prelude, cfg: TrainConfig, spec, progress: Callback) -> None:
    """The extraction thread: every image the check keeps, through ``prelude.runner``, into the
    store (plain view, and the mirror view when the head will fit it), each view only where the
    store lacks it, until the check ends or ``halted`` is set. What it extracted is flushed to
    the store however it ends; an error is kept for ``finish``."""
    views, started = [], False
    try:
        runner, pixels, size = prelude.runner, prelude.pixels, prelude.size
        key = cache_key(spec, size)
        views.append((False, model_store(cfg.cache_dir, features.view_key(key, "litert"),
                                                   dim=runner.feature_dim)))
        if cfg.mirror and not tunes(cfg):  # a fine-tuned backbone's mirror view is extracted after it
            views.append((True, model_store(cfg.cache_dir, features.view_key(key, "litert", mirror=True),
                                                      dim=runner.feature_dim)))
        buffer = np.empty((AHEAD_BATCH, size, size, 3), np.float32)  # reused: no fresh pages per batch
        while not prelude.halted.is_set():
            digests = pixels.next_digests(AHEAD_BATCH)
            if digests is None:
                break
            kept = [(d, p) for d in digests if (p := pixels.peek(d)) is not None]
            batch = buffer[:len(kept)]
            for row, (_, p) in zip(batch, kept):
                images.as_model_input(p, out=row)
            for flip, cache in views:
                rows = [i for i, (d, _) in enumerate(kept) if cache.get(d) is None]  # not what a run before stored
                if not rows:
                    continue
                if not started:
                    started = True
                    progress(Start("extract", total=None))
                for i, vec in zip(rows, runner(np.flip(batch[rows], axis=2) if flip else batch[rows])):
                    if np.isfinite(vec).all():  # else left to the extraction proper, which names the file
                        cache.put(kept[i][0], vec)
                        prelude.extracted += 1
                progress(Advance("extract", completed=prelude.extracted))
            for digest in digests:
                pixels.drop(digest)  # done with: its room goes to the images still being checked
    except BaseException as exc:  # noqa: BLE001  (handed to finish(), in the run's thread)
        prelude._error = exc
    finally:
        try:
            for _, cache in views:
                cache.flush()
            if started:
                progress(End("extract", completed=prelude.extracted, total=prelude.extracted))
        except BaseException as exc:  # noqa: BLE001
            prelude._error = prelude._error or exc


def check_parity(cfg, chosen, loaded, splits, models, litert, early: Prelude, progress: Callback) -> None:
    """LiteRT's parity with TensorFlow (``features.agrees``, in the scope, as compute_views would
    measure it and then reuse), while the extraction ahead runs: stopped when its runner disagrees
    or is not the run's (its work would not be used: do not wait for it)."""
    with chosen.strategy.scope():
        if litert is None or litert is not early.runner or not features.agrees(
                litert, models.extractor, (splits.train + splits.val)[:litert_backbone.PARITY_IMAGES],
                image_size=loaded.image_size, max_pixels=cfg.max_pixels, pixels=early.pixels, progress=progress):
            early.cancel()
