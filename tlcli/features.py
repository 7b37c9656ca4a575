"""Feature vectors of the frozen backbone, computed once and cached on disk.

``compute_views`` is the feature step of the recipe: the plain (and mirror) views of a list of
images, through the cache; ``extract`` computes one view.

Entries are keyed by the backbone (handle, or local path + file times), the image size, the
decoder version and each file's content hash, so re-runs, new head settings and renamed files
reuse them, and an edited image gets a new entry.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli.errors import DatasetError
from tlcli.progress import Advance, Callback, End, Start, silent
from tlcli.store import FeatureStore

DECODER_VERSION = 2  # bump whenever decoding or preprocessing changes


def default_cache_dir() -> Path:
    env = os.environ.get("TLCLI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlcli"


class FeatureCache(FeatureStore):
    """The feature store (``tlcli.store``) of one model key: ``root/store/<model key>-d<decoder>/``.

    ``get`` returns only a valid entry: 1-D float32 of length ``dim`` (when set; ``extract``
    sets it from the backbone), finite and at most ``MAX_FEATURE`` in magnitude; anything else
    (a damaged shard, a foreign file) reads as missing, so it is recomputed. ``put`` buffers and
    writes whole shards atomically; ``flush`` writes what is buffered. The per-image ``.npy``
    files of earlier versions (``root/features/``) are not read: they are left for the user to
    delete."""

    def __init__(self, root: str | os.PathLike | None, model_key: str, *, dim: int | None = None):
        super().__init__(Path(root or default_cache_dir()) / "store" / f"{model_key}-d{DECODER_VERSION}", dim=dim)


class NoCache:
    """For features that must not be cached (a backbone being fine-tuned)."""

    dim = None

    def get(self, digest: str):
        return None

    def put(self, digest: str, vec) -> None:
        pass

    def flush(self) -> None:
        pass


def _feature_dim(extractor) -> int | None:
    try:
        dim = extractor.output_shape[-1]
    except Exception:  # not built, or several outputs
        return None
    return dim if isinstance(dim, int) else None


def extract(samples, *, extractor, cache: FeatureCache | NoCache, image_size: int, batch_size: int,
            max_pixels: int, progress: Callback = silent, task: str = "extract") -> tuple[np.ndarray, int]:
    """Features [n, d] for ``samples`` (objects with .path and .digest), running the backbone only
    on files missing from the cache (or whose entry is invalid), in one streamed tf.data pass.
    Each batch is cached as soon as it is extracted, under the digest of the bytes actually
    decoded, so an interrupted run keeps what it did. Returns (features, extracted).

    Raises DatasetError, naming the file, when a file became unreadable after the scan or now
    holds other bytes than the scan checked (its features would belong to another image)."""
    from tlcli.data import image_dataset

    if cache.dim is None:
        cache.dim = _feature_dim(extractor)
    found = [cache.get(s.digest) for s in samples]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        ds = image_dataset([samples[i].path for i in todo], image_size, batch_size=batch_size,
                           max_pixels=max_pixels, unreadable_fill=np.nan, digests=True)
        progress(Start(task, total=len(todo)))
        done = 0

        def store(vecs, digests):  # one batch, as soon as the backbone has run on it
            nonlocal done
            vecs = np.asarray(vecs, np.float32)
            for i, vec, digest in zip(todo[done:done + len(vecs)], vecs, np.asarray(digests)):
                _store(samples[i], vec, digest.decode(), cache)
                found[i] = vec
            done += len(vecs)
            progress(Advance(task, completed=done, total=len(todo)))

        # Keras' own predict loop (the steps run in one tf.function over the dataset, spread over
        # the strategy's replicas): a Python loop of predict_on_batch was measured 20-50% slower.
        try:
            _with_digests(extractor).predict(ds, verbose=0, callbacks=[_batch_callback(store)])
        finally:  # the store buffers whole shards: what was extracted is kept, even on interrupt
            cache.flush()
        progress(End(task, total=len(todo), completed=len(todo)))
    if not samples:
        return np.zeros((0, 0), np.float32), 0
    return np.stack(found).astype(np.float32), len(todo)


def _with_digests(extractor):
    """A model running ``extractor`` on the images of (images, digests) batches whose predict
    returns (features, digests), so each batch's vectors arrive with the digests of its bytes."""
    return _digest_model_class()(extractor)


@functools.cache
def _digest_model_class():
    from tlcli._tf import keras

    class WithDigests(keras().Model):
        def __init__(self, inner):
            super().__init__(name="extractor_with_digests")
            self.inner = inner

        def call(self, images, training=False):
            return self.inner(images, training=False)

        def predict_step(self, data):
            images, digests = data
            return self.inner(images, training=False), digests

    return WithDigests


def _batch_callback(store):
    """A Keras callback handing each predicted batch's outputs to ``store(vecs, digests)``."""
    from tlcli._tf import keras

    class EachBatch(keras().callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            vecs, digests = logs["outputs"]
            store(vecs, digests)

    return EachBatch()


def _store(sample, vec: np.ndarray, digest: str, cache) -> None:
    """Cache one fresh vector under the digest of the bytes it came from; raise DatasetError
    when those are not the bytes the scan checked (see ``extract``)."""
    if not digest or not np.isfinite(vec).all():  # the file could not be read any more (see image_dataset)
        raise DatasetError(f"{sample.path}: became unreadable after the file check (changed or "
                           "removed during training?); fix or remove it and run again")
    cache.put(digest, vec)  # right for these bytes, whatever the file holds now
    if digest != sample.digest:
        raise DatasetError(f"{sample.path}: changed after the file check (replaced during training?); "
                           "run again once the folder stops changing")


@dataclass
class FeatureViews:
    """The features of ``samples``, row i for ``samples[i]``: ``plain`` [n, d] float32 from the
    images, ``mirror`` [n, d] from their left-right mirror images or None. ``extracted`` counts
    the vectors that went through the backbone, ``cached`` those read from the cache or kept."""

    samples: list
    plain: np.ndarray
    mirror: np.ndarray | None
    extracted: int
    cached: int

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {s.path: i for i, s in enumerate(self.samples)}

    def rows(self, samples) -> np.ndarray:
        """Row indices of ``samples`` (a subset, by path): ``views.plain[views.rows(some)]``."""
        return np.array([self._index[s.path] for s in samples], int)

    def of(self, samples) -> tuple[np.ndarray, np.ndarray | None]:
        """(plain, mirror or None): the rows of ``samples``."""
        rows = self.rows(samples)
        return self.plain[rows], None if self.mirror is None else self.mirror[rows]


def compute_views(samples, *, extractors, cache_key: str, cache_dir, image_size: int, batch_size: int,
                  max_pixels: int, progress: Callback = silent, mirror: bool = False, frozen: bool = True,
                  keep: FeatureViews | None = None, task: str = "extract") -> FeatureViews:
    """The feature views of ``samples`` (see ``extract``). ``extractors`` is (plain, mirror): Keras
    models from images to features (``model.build_extractor``), the mirror one used only with
    ``mirror``. A ``frozen`` backbone's features go through the cache under ``root/features/``
    ``<cache_key>`` (``-mirror`` for the mirror view) in ``cache_dir`` (None: the default);
    others are never cached. ``keep``: earlier views of the same samples whose plain view still
    holds (the backbone has not changed), so only the mirror view is computed. Progress tasks
    are ``task`` and ``task (mirror)``. Raises what ``extract`` raises."""
    plain_extractor, mirror_extractor = extractors
    todo = [] if keep is not None else [("plain", plain_extractor, cache_key, task)]
    if mirror:
        todo.append(("mirror", mirror_extractor, f"{cache_key}-mirror", f"{task} (mirror)"))
    found, extracted = {}, 0
    for view, extractor, key, name in todo:
        cache = FeatureCache(cache_dir, key) if frozen else NoCache()
        found[view], n = extract(samples, extractor=extractor, cache=cache, image_size=image_size,
                                 batch_size=batch_size, max_pixels=max_pixels, progress=progress, task=name)
        extracted += n
    plain = keep.plain if keep is not None else found["plain"]
    return FeatureViews(list(samples), plain, found.get("mirror"), extracted,
                        (1 + mirror) * len(samples) - extracted)
