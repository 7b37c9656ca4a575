"""Feature vectors of the frozen backbone, computed once and cached on disk.

``compute_views`` is the feature step of the recipe: the plain (and mirror) views of a list of
images, through the cache; ``extract`` computes one view with TensorFlow, ``extract_litert`` with
the backbone converted for LiteRT (``litert_backbone``), which serves every frozen view on a CPU.

Entries are keyed by the backbone (handle, or local path + file times), the image size, the
decoder version and each file's content hash, so re-runs, new head settings and renamed files
reuse them, and an edited image gets a new entry. LiteRT's entries are kept apart from
TensorFlow's (``-litert`` keys), so one fit never mixes the two engines' features.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcli import images
from tlcli.errors import DatasetError, ImageError, TlcliError
from tlcli.progress import Advance, Callback, End, Start, Warn, silent
from tlcli.store import FeatureStore, StoredRows

DECODER_VERSION = 2  # bump whenever decoding or preprocessing changes
# A view larger than this is read from the feature store's mapped shards instead of held in RAM
# (100,000 vectors of 1,280 floats; hymenoptera's are 2 MB).
VIEWS_IN_MEMORY_BYTES = 512 << 20


ENGINE_SUFFIX = {"tf": "", "litert": "-litert"}  # the cache key's suffix of each engine's features


def cache_key(spec, image_size: int) -> str:
    """The feature cache's key of a backbone (``backbone.BackboneSpec``) at ``image_size``, as
    ``train``, ``audit`` and the cached LiteRT conversion use it; ``compute_views`` adds each
    view's and engine's suffix."""
    return f"{spec.cache_key()}-{image_size}"


def view_key(cache_key: str, engine: str, *, mirror: bool = False) -> str:
    """The store key of one view's features from ``engine`` ("tf" or "litert"): ``cache_key``
    (``cache_key()``), ``-mirror`` for the mirror view, and the engine's suffix."""
    return f"{cache_key}{'-mirror' if mirror else ''}{ENGINE_SUFFIX[engine]}"


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

    def gather(self, samples, found: list) -> np.ndarray | StoredRows:
        """The features [n, d] of ``samples`` once every one is stored, ``found[i]`` the vector
        of ``samples[i]`` (stored under its digest): one float32 array in memory when that is at
        most ``VIEWS_IN_MEMORY_BYTES``, else the store's rows of their digests (``StoredRows``,
        mapped from the shards, not loaded). In memory too when some could not be written, if the
        extraction kept them (``in_memory``); else one TlcliError line."""
        if not self.in_memory(len(found)):
            try:
                return self.rows([s.digest for s in samples])
            except KeyError:  # not written (a full or read-only disk)
                if any(f is None for f in found):  # fresh vectors were not kept (``in_memory``)
                    raise TlcliError(f"{self.dir}: the feature store could not be written (disk full or read-only?) "
                                     f"and the features of {len(found)} images are too many to hold in memory "
                                     "instead; free space there, or give --cache-dir on a writable disk") from None
        return np.stack(found).astype(np.float32)

    def in_memory(self, n: int) -> bool:
        """Whether the features of ``n`` images are gathered in memory (at most
        ``VIEWS_IN_MEMORY_BYTES``); beyond that an extraction keeps no fresh vector, only the
        store does, so its memory does not grow with ``n``."""
        return n * (self.dim or 0) * 4 <= VIEWS_IN_MEMORY_BYTES


class NoCache:
    """For features that must not be cached (a backbone being fine-tuned)."""

    dim = None

    def get(self, digest: str):
        return None

    def put(self, digest: str, vec) -> None:
        pass

    def flush(self) -> None:
        pass

    def gather(self, samples, found: list) -> np.ndarray:
        return np.stack(found).astype(np.float32)

    def in_memory(self, n: int) -> bool:
        return True  # nowhere else to keep them


def _feature_dim(extractor) -> int | None:
    try:
        dim = extractor.output_shape[-1]
    except Exception:  # not built, or several outputs
        return None
    return dim if isinstance(dim, int) else None


def extract(samples, *, extractor, cache: FeatureCache | NoCache, image_size: int, batch_size: int,
            max_pixels: int, progress: Callback = silent, task: str = "extract", runner=None, flip: bool = False,
            pixels: images.KeptPixels | None = None, static: bool = False) -> tuple[np.ndarray | StoredRows, int]:
    """Features [n, d] for ``samples`` (objects with .path and .digest), running the backbone only
    on files missing from the cache (or whose entry is invalid), in one streamed tf.data pass.
    Each batch is cached as soon as it is extracted, under the digest of the bytes actually
    decoded, so an interrupted run keeps what it did. Returns (features, extracted).

    With a LiteRT ``runner`` (``litert_backbone.LiteRTBackbone``) the backbone is that instead
    of the Keras ``extractor`` (``extract_litert``: ``flip`` and ``pixels`` are its options).
    ``static``: every batch the Keras extractor sees has ``batch_size`` images (a TPU's static
    shapes), the last one padded. Fresh vectors stay in memory only while ``cache.in_memory``
    says so; otherwise the result is the store's rows.

    Raises DatasetError, naming the file, when a file became unreadable after the scan or now
    holds other bytes than the scan checked (its features would belong to another image)."""
    from tlcli.data import image_dataset

    if runner is not None:
        return extract_litert(samples, runner=runner, cache=cache, image_size=image_size, batch_size=batch_size,
                              max_pixels=max_pixels, flip=flip, pixels=pixels, progress=progress, task=task)
    if cache.dim is None:
        cache.dim = _feature_dim(extractor)
    found = [cache.get(s.digest) for s in samples]
    todo, keep = [i for i, f in enumerate(found) if f is None], cache.in_memory(len(samples))
    if todo:
        ds = image_dataset([samples[i].path for i in todo], image_size, batch_size=batch_size,
                           max_pixels=max_pixels, unreadable_fill=np.nan, digests=True)
        if static:
            ds = _static_batches(ds, batch_size)
        progress(Start(task, total=len(todo)))
        done = 0

        def store(vecs, digests):  # one batch, as soon as the backbone has run on it
            nonlocal done
            vecs = np.asarray(vecs, np.float32)
            # zip ends at todo's end: a static last batch's padding rows are dropped
            for i, vec, digest in zip(todo[done:done + len(vecs)], vecs, np.asarray(digests)):
                _store(samples[i], vec, digest.decode(), cache)
                found[i] = vec if keep else None
            done = min(len(todo), done + len(vecs))
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
    return cache.gather(samples, found), len(todo)


def _static_batches(ds, batch_size: int):
    """``ds`` ((images, digests) batches) as batches of exactly ``batch_size`` (a TPU's static
    shapes): the last one filled up with zero images of empty digest, whose outputs ``extract``
    drops (it stores only as many rows as it asked for)."""
    from tlcli._tf import tf
    from tlcli.data import padded_batches

    flat = ds.unbatch()
    images_spec, _ = flat.element_spec
    return padded_batches(flat, batch_size, (tf().zeros(images_spec.shape, images_spec.dtype), tf().constant(b"")))


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
    images, ``mirror`` [n, d] from their left-right mirror images or None. Each is a numpy array,
    or, for a view over ``VIEWS_IN_MEMORY_BYTES``, the feature store's ``StoredRows`` (mapped,
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
    ``mirror``. A ``frozen`` backbone's features go through the feature store (``FeatureCache``)
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
    from tlcli.litert_backbone import PARITY_IMAGES

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
        cache = FeatureCache(cache_dir, key) if frozen else NoCache()
        found[view], n = extract(samples, extractor=extractor, cache=cache, task=name, runner=litert,
                                 flip=flip, pixels=pixels, **common)
        extracted += n
    if pixels is not None:
        pixels.clear()  # their memory is the largest thing a cold run holds
    plain = keep.plain if keep is not None else found["plain"]
    return FeatureViews(list(samples), plain, found.get("mirror"), extracted,
                        (1 + mirror) * len(samples) - extracted, engine)


def agrees(runner, extractor, samples, *, image_size: int, max_pixels: int, pixels=None,
           progress: Callback = silent) -> bool:
    """Whether LiteRT ``runner`` and the TensorFlow ``extractor`` give the same features
    (``litert_backbone.parity_error`` within ``PARITY_TOLERANCE``) on ``samples`` (the first
    batch; unreadable files left out). Measured once per runner (kept as ``runner.parity``);
    a disagreement is one ``Warn``."""
    from tlcli import litert_backbone

    if runner.parity is None:
        batch = [x for x, _ in (_model_input(s, image_size, max_pixels, pixels) for s in samples) if x is not None]
        if not batch:
            return True  # nothing to compare on; the extraction itself reports unreadable files
        batch = np.stack(batch)
        runner.parity = litert_backbone.parity_error(_tf_features(extractor, batch), runner(batch))
        if runner.parity > litert_backbone.PARITY_TOLERANCE:
            progress(Warn(f"--extractor litert: LiteRT's features differ from TensorFlow's by {runner.parity:.2g} "
                          f"of their scale on the first images (tolerance {litert_backbone.PARITY_TOLERANCE:g}); "
                          "using TensorFlow"))
    return runner.parity <= litert_backbone.PARITY_TOLERANCE


def _tf_features(extractor, batch: np.ndarray) -> np.ndarray:
    """``extractor`` on one batch: called directly (predict would trace a whole predict loop,
    seconds for a large backbone), or through predict under a distribution strategy, where
    restored functions cannot be called eagerly."""
    from tlcli._tf import tf

    if tf().distribute.has_strategy():
        return extractor.predict(batch, verbose=0)
    return np.asarray(extractor(batch, training=False))


def _model_input(sample, size: int, max_pixels: int, pixels) -> tuple[np.ndarray | None, str]:
    """(float32 model input of ``sample``, digest of the bytes it came from): the pixels the
    file check kept when there are some, else decoded now; (None, "") for an unreadable file."""
    kept = pixels.peek(sample.digest) if pixels is not None and pixels.size == size else None
    if kept is not None:
        return images.as_model_input(kept), sample.digest
    try:
        return images.load_for_model(sample.path, size, max_pixels=max_pixels, with_digest=True)
    except ImageError:
        return None, ""


PREFETCH_BATCHES = 2  # batches decoded ahead of the one LiteRT is running


def _decoded_batches(samples, todo, *, size: int, batch_size: int, max_pixels: int, pixels):
    """Yield (indices, [(input or None, digest)]) for ``todo`` (indices into ``samples``) in
    batches, decoded by a thread per core (Pillow releases the GIL, and so does LiteRT's
    invoke) ``PREFETCH_BATCHES`` ahead, so that decoding keeps the backbone fed."""
    from tlcli.data import bounded_map
    from tlcli.litert_backbone import threads

    pool = ThreadPoolExecutor(threads(), thread_name_prefix="tlcli-decode")
    try:
        decoded = bounded_map(pool, lambda i: _model_input(samples[i], size, max_pixels, pixels), todo,
                              (PREFETCH_BATCHES + 1) * batch_size)
        for k in range(0, len(todo), batch_size):
            batch = todo[k:k + batch_size]
            yield batch, [next(decoded) for _ in batch]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_litert(samples, *, runner, cache: FeatureCache | NoCache, image_size: int, batch_size: int,
                   max_pixels: int, flip: bool = False, pixels=None, progress: Callback = silent,
                   task: str = "extract") -> tuple[np.ndarray | StoredRows, int]:
    """``extract`` through a LiteRT ``runner`` (``litert_backbone.LiteRTBackbone``), of the
    images' left-right mirror images with ``flip``; ``pixels`` as in ``compute_views``. The same
    contract: (features [n, d], extracted), each batch cached as it is done under the digest of
    the bytes decoded, DatasetError for a file that became unreadable or changed."""
    if cache.dim is None:
        cache.dim = runner.feature_dim
    found = [cache.get(s.digest) for s in samples]
    todo, keep = [i for i, f in enumerate(found) if f is None], cache.in_memory(len(samples))
    if todo:
        progress(Start(task, total=len(todo)))
        done = 0
        try:
            for batch, loaded in _decoded_batches(samples, todo, size=image_size, batch_size=batch_size,
                                                  max_pixels=max_pixels, pixels=pixels):
                ok = [x for x, _ in loaded if x is not None]
                vecs = iter(runner(np.flip(np.stack(ok), axis=2) if flip else np.stack(ok)) if ok else [])
                for i, (x, digest) in zip(batch, loaded):
                    vec = next(vecs) if x is not None else np.full(runner.feature_dim, np.nan, np.float32)
                    _store(samples[i], vec, digest, cache)
                    found[i] = vec if keep else None
                done += len(batch)
                progress(Advance(task, completed=done, total=len(todo)))
        finally:  # as in ``extract``: what was extracted is kept, even on interrupt
            cache.flush()
        progress(End(task, total=len(todo), completed=len(todo)))
    if not samples:
        return np.zeros((0, 0), np.float32), 0
    return cache.gather(samples, found), len(todo)
