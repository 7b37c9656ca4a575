"""The feature views of a list of images: the plain (and mirror) view's vectors from the frozen
backbone, through the feature store, with the engine (TensorFlow or LiteRT) that produced them.

Store keys: ``backbone.cache_key`` + ``-mirror`` for the mirror view + the engine's suffix
(``-litert``), so one fit never mixes the two engines' features.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tlcli.data import images
from tlcli.features import extraction
from tlcli.features.store import NoStore, StoredRows, model_store
from tlcli.progress import Callback, Warn, silent

ENGINE_SUFFIX = {"tf": "", "litert": "-litert"}  # the cache key's suffix of each engine's features


def view_key(cache_key: str, engine: str, *, mirror: bool = False) -> str:
    """The store key of one view's features from ``engine`` ("tf" or "litert"): ``cache_key``
    (``cache_key()``), ``-mirror`` for the mirror view, and the engine's suffix."""
    return f"{cache_key}{'-mirror' if mirror else ''}{ENGINE_SUFFIX[engine]}"



@dataclass
class FeatureViews:
    """The features of ``samples``, row i for ``samples[i]``: ``plain`` [n, d] float32 from the
    images, ``mirror`` [n, d] from their left-right mirror images or None. Each is a numpy array,
    or, for a view over ``store.VIEWS_IN_MEMORY_BYTES``, the feature store's ``StoredRows`` (mapped,
    not loaded). ``extracted`` counts the vectors that went through the backbone, ``cached``
    those read from the cache or kept."""

    samples: list
    plain: np.ndarray | StoredRows
    mirror: np.ndarray | StoredRows | None
    extracted: int
    cached: int
    engine: str = "tf"  # what ran the backbone for the views computed here: "tf" or "litert"

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {s.path: i for i, s in enumerate(self.samples)}

    def rows(self, samples) -> np.ndarray:
        """Row indices of ``samples`` (a subset, by path): ``views.plain[views.rows(some)]``."""
        return np.array([self._index[s.path] for s in samples], int)

    def of(self, samples, *, lazy: bool = False) -> tuple:
        """(plain, mirror or None): the rows of ``samples``, as float32 arrays; with ``lazy``,
        a view in the store stays ``StoredRows`` (unread)."""
        rows = self.rows(samples)

        def pick(view):
            if view is None:
                return None
            return view.take(rows) if lazy and isinstance(view, StoredRows) else view[rows]

        return pick(self.plain), pick(self.mirror)

    def stacked(self, samples):
        """The rows of ``samples``' plain views followed by their mirror views' (when there are
        some) [n or 2n, d]: a float32 array, or ``StoredRows`` for views in the store (no copy)."""
        plain, mirror = self.of(samples, lazy=True)
        if mirror is None:
            return plain
        if isinstance(plain, StoredRows) and isinstance(mirror, StoredRows):
            return plain.stacked(mirror)
        return np.vstack([np.asarray(plain), np.asarray(mirror)])



def compute_views(samples, *, extractors, cache_key: str, cache_dir, image_size: int, batch_size: int,
                  max_pixels: int, progress: Callback = silent, mirror: bool = False, frozen: bool = True,
                  keep: FeatureViews | None = None, task: str = "extract", litert=None,
                  pixels: images.KeptPixels | None = None, static: bool = False) -> FeatureViews:
    """The feature views of ``samples`` (see ``extract``). ``extractors`` is (plain, mirror): Keras
    models from images to features (``model.build_extractor``), the mirror one used only with
    ``mirror``. A ``frozen`` backbone's features go through the feature store (``store.model_store``)
    under ``<cache_key>`` (``-mirror`` for the mirror view) in ``cache_dir`` (None: the default);
    others are never cached. ``keep``: earlier views of the same samples whose plain view still
    holds (the backbone has not changed), so only the mirror view is computed. Progress tasks
    are ``task`` and ``task (mirror)``.

    ``litert``: the frozen backbone as a ``litert_backbone.LiteRTBackbone``; a frozen view then
    comes from it (``extract``'s ``runner``, keys ``...-litert``) once ``agrees`` has found its
    features equal to TensorFlow's on the first ``PARITY_IMAGES`` images, else from TensorFlow with a warning.
    ``pixels``: model inputs the file check kept (``images.KeptPixels``), used instead of
    decoding again and dropped once the views are computed. ``static``: see ``extract``.
    Raises what ``extract`` raises."""
    plain_extractor, mirror_extractor = extractors
    from tlcli.model.litert import PARITY_IMAGES

    if not frozen or litert is not None and not agrees(litert, plain_extractor, samples[:PARITY_IMAGES],
                                                       image_size=image_size, max_pixels=max_pixels, pixels=pixels,
                                                       progress=progress):
        litert = None
    engine = "litert" if litert is not None else "tf"
    todo = [] if keep is not None else [("plain", plain_extractor, view_key(cache_key, engine), task, False)]
    if mirror:
        todo.append(("mirror", mirror_extractor, view_key(cache_key, engine, mirror=True), f"{task} (mirror)", True))
    found, extracted = {}, 0
    common = dict(image_size=image_size, batch_size=batch_size, max_pixels=max_pixels, progress=progress,
                  static=static)
    for view, extractor, key, name, flip in todo:
        cache = model_store(cache_dir, key) if frozen else NoStore()
        found[view], n = extraction.extract(samples, extractor=extractor, cache=cache, task=name, runner=litert,
                                 flip=flip, pixels=pixels, **common)
        extracted += n
    if pixels is not None:
        pixels.clear()  # their memory is the largest thing a cold run holds
    plain = keep.plain if keep is not None else found["plain"]
    return FeatureViews(list(samples), plain, found.get("mirror"), extracted,
                        (1 + mirror) * len(samples) - extracted, engine)


def frozen_engines(loaded, spec, *, cfg, progress: Callback = silent) -> tuple:
    """(the Keras extractor of the frozen backbone ``loaded`` (``spec``'s), its LiteRT runner
    when ``cfg.extractor`` picks LiteRT, else None)."""
    from tlcli.model import classifier as model
    from tlcli.model import litert as litert_backbone

    extractor = model.build_extractor(loaded.layer, loaded.image_size)
    runner = None
    if litert_backbone.engine_for(cfg.extractor) == "litert":
        runner = litert_backbone.prepare(loaded, spec, cache_dir=cfg.cache_dir, progress=progress)
    return extractor, runner


def frozen_views(loaded, spec, samples, *, cache_key: str, cfg, progress: Callback = silent, engines=None):
    """(the plain views of ``samples`` through the frozen backbone ``loaded`` (``spec``'s), its
    Keras extractor, its LiteRT runner or None): ``compute_views`` with the engine
    ``cfg.extractor`` picks (``engines``: those ``frozen_engines`` gave, else made now) and
    ``cfg``'s cache folder, batch size and pixel limit, stored under ``cache_key``, so that the
    backbone choice and the audit find what training stored."""
    extractor, runner = engines or frozen_engines(loaded, spec, cfg=cfg, progress=progress)
    views = compute_views(samples, extractors=(extractor, None), cache_key=cache_key, cache_dir=cfg.cache_dir,
                          image_size=loaded.image_size, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels,
                          progress=progress, litert=runner)
    return views, extractor, runner



def agrees(runner, extractor, samples, *, image_size: int, max_pixels: int, pixels=None,
           progress: Callback = silent) -> bool:
    """Whether LiteRT ``runner`` and the TensorFlow ``extractor`` give the same features
    (``litert_backbone.parity_error`` within ``PARITY_TOLERANCE``) on ``samples`` (the first
    batch; unreadable files left out). Measured once per runner (kept as ``runner.parity``);
    a disagreement is one ``Warn``."""
    from tlcli.model import litert as litert_backbone

    if runner.parity is None:
        inputs = (extraction.model_input(s, image_size, max_pixels, pixels) for s in samples)
        batch = [x for x, _ in inputs if x is not None]
        if not batch:
            return True  # nothing to compare on; the extraction itself reports unreadable files
        batch = np.stack(batch)
        runner.parity = litert_backbone.parity_error(extraction.tf_features(extractor, batch), runner(batch))
        if runner.parity > litert_backbone.PARITY_TOLERANCE:
            progress(Warn(f"--extractor litert: LiteRT's features differ from TensorFlow's by {runner.parity:.2g} "
                          f"of their scale on the first images (tolerance {litert_backbone.PARITY_TOLERANCE:g}); "
                          "using TensorFlow"))
    return runner.parity <= litert_backbone.PARITY_TOLERANCE
