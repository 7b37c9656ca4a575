"""tf.data input pipelines of decoded images: bounded parallel decoding, fixed-size batches for
static shapes; augmentation (``data.augment``) is applied per image inside them."""

from __future__ import annotations

import os

from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.data import images


def image_dataset(paths: list[str], size: int, *, labels: list[int] | None = None,
                  batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                  shuffle_seed: int | None = None, augment=None, augment_seed: int = 0,
                  unreadable_fill: float = 0.5, digests: bool = False):
    """tf.data of float32 [batch, size, size, 3] in [0, 1] (and int labels), decoded by the project
    decoder in parallel (within its memory budget) and prefetched. A file that became unreadable
    after the scan yields an image filled with ``unreadable_fill`` (grey) rather than crashing the
    epoch; feature extraction passes NaN so that such a file is noticed instead of cached. With
    ``digests`` each element is (images, string [batch]: ``image_files.digest`` of the bytes each
    image was decoded from, empty for an unreadable file) instead of the images. ``augment``
    (``data.augmenter``: (image, seed [2]) -> image) transforms each image before batching,
    with seeds drawn from ``augment_seed`` and new ones every epoch."""
    import numpy as np

    from tlcli._tf import tf

    t = tf()

    def load(p):
        try:
            img, digest = images.load_for_model(os.fsdecode(p), size, max_pixels=max_pixels, with_digest=True)
        except images.ImageError:
            img, digest = np.full((size, size, 3), unreadable_fill, np.float32), ""
        return (img, np.bytes_(digest)) if digests else img

    # As bytes: a file name that is not UTF-8 (held as lone surrogates) is no valid TensorFlow string.
    ds = t.data.Dataset.from_tensor_slices([os.fsencode(p) for p in paths])
    if labels is not None:
        ds = t.data.Dataset.zip((ds, t.data.Dataset.from_tensor_slices(np.asarray(labels, np.int64))))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def decode(p, *rest):
        if digests:
            img, digest = t.numpy_function(load, [p], [t.float32, t.string], stateful=False)
            digest.set_shape([])
            rest = (digest, *rest)
        else:
            img = t.numpy_function(load, [p], t.float32, stateful=False)
        img.set_shape([size, size, 3])
        return (img, *rest) if rest else img

    ds = ds.map(decode, num_parallel_calls=_decode_threads(), deterministic=True)
    if augment is not None:
        # Stateless ops on a seed pair per image: the same images whatever the parallelism.
        seeds = t.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True).batch(2)
        ds = t.data.Dataset.zip((ds, seeds)).map(
            lambda item, seed: (augment(item[0], seed), *item[1:]) if isinstance(item, tuple) else augment(item, seed),
            num_parallel_calls=_decode_threads(), deterministic=True)
    ds = ds.batch(batch_size)
    # Fixed parallelism instead of tf.data's autotuner: the decoder is one Pillow call per image
    # (nothing to tune), and with autotuning on, deleting a finished iterator could block for
    # seconds (measured: about 5 s after a feature extraction, in half the runs).
    options = t.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)

PREFETCH_BATCHES = 2


def padded_batches(flat, batch_size: int, filler: tuple):
    """``flat`` (a dataset of single elements) in batches of exactly ``batch_size`` (a TPU's
    static shapes), the last one filled up with copies of ``filler`` (tensors of ``flat``'s
    element structure) for the caller to mask or drop. Never a batch of filler alone."""
    from tlcli._tf import tf

    # batch_size - 1 fillers at most: drop_remainder then keeps exactly the batches holding an element.
    return flat.concatenate(tf().data.Dataset.from_tensors(filler).repeat(batch_size - 1)).batch(
        batch_size, drop_remainder=True)


def _decode_threads() -> int:
    """One decoder per usable core, at most 16 (each may hold a large image while decoding)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))
