"""Feature vectors of the backbone, computed once and kept in the feature store.

``extract`` computes one view with TensorFlow, ``extract_litert`` with the backbone converted for
LiteRT (``model.litert``), which serves every frozen view on a CPU; ``views.compute_views``, the
feature step of the recipe, calls them for the plain (and mirror) views.

Entries are keyed by the backbone (handle, or local path + file times), the image size, the
decoder version and each file's content hash, so re-runs, new head settings and renamed files
reuse them, and an edited image gets a new entry. LiteRT's entries are kept apart from
TensorFlow's (``-litert`` keys), so one fit never mixes the two engines' features.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tlcli.data import images
from tlcli.data.image_files import UNREADABLE
from tlcli.errors import DatasetError, ImageError
from tlcli.features.store import FeatureStore, NoStore, StoredRows
from tlcli.progress import Advance, Callback, End, Start, silent


def _feature_dim(extractor) -> int | None:
    try:
        dim = extractor.output_shape[-1]
    except Exception:  # not built, or several outputs
        return None
    return dim if isinstance(dim, int) else None


def extract(samples, *, extractor, cache: FeatureStore | NoStore, image_size: int, batch_size: int,
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
    from tlcli.data.pipeline import image_dataset

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
    from tlcli.data.pipeline import padded_batches

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


def tf_features(extractor, batch: np.ndarray) -> np.ndarray:
    """``extractor`` on one batch: called directly (predict would trace a whole predict loop,
    seconds for a large backbone), or through predict under a distribution strategy, where
    restored functions cannot be called eagerly."""
    from tlcli._tf import tf

    if tf().distribute.has_strategy():
        return extractor.predict(batch, verbose=0)
    return np.asarray(extractor(batch, training=False))


def model_input(sample, size: int, max_pixels: int, pixels) -> tuple[np.ndarray | None, str]:
    """(float32 model input of ``sample``, digest of the bytes it came from): the pixels the
    file check kept when there are some, else decoded now; (None, "") for an unreadable file."""
    kept = pixels.peek(sample.digest) if pixels is not None and pixels.size == size else None
    if kept is not None:
        return images.as_model_input(kept), sample.digest
    try:
        return images.load_for_model(sample.path, size, max_pixels=max_pixels, with_digest=True)
    except ImageError:
        return None, ""


def _decoded(item: tuple[np.ndarray | None, str]) -> np.ndarray:
    """The model input of one (input or None, digest) that ``model_input`` made in a decode
    thread; ImageError for a file that could not be decoded (its features are NaN, noticed by
    ``_store``)."""
    if item[0] is None:
        raise ImageError("<decoded>", UNREADABLE)
    return item[0]


PREFETCH_BATCHES = 2  # batches decoded ahead of the one LiteRT is running


def _decoded_batches(samples, todo, *, size: int, batch_size: int, max_pixels: int, pixels):
    """Yield (indices, [(input or None, digest)]) for ``todo`` (indices into ``samples``) in
    batches, decoded by a thread per core (Pillow releases the GIL, and so does LiteRT's
    invoke) ``PREFETCH_BATCHES`` ahead, so that decoding keeps the backbone fed."""
    from tlcli.data.scanning import bounded_map
    from tlcli.model.litert import threads

    pool = ThreadPoolExecutor(threads(), thread_name_prefix="tlcli-decode")
    try:
        decoded = bounded_map(pool, lambda i: model_input(samples[i], size, max_pixels, pixels), todo,
                              (PREFETCH_BATCHES + 1) * batch_size)
        for k in range(0, len(todo), batch_size):
            batch = todo[k:k + batch_size]
            yield batch, [next(decoded) for _ in batch]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def extract_litert(samples, *, runner, cache: FeatureStore | NoStore, image_size: int, batch_size: int,
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
                x, errors = images.decode_batch(loaded, _decoded)
                vecs = images.paired(errors, None if x is None else runner(np.flip(x, axis=2) if flip else x))
                for i, (_, digest), vec in zip(batch, loaded, vecs):
                    vec = np.full(runner.feature_dim, np.nan, np.float32) if vec is None else vec
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
