"""tf.data input pipelines of decoded images: bounded parallel decoding, fixed-size batches for
static shapes, and the augmenter."""

from __future__ import annotations

import os

from tlcli.config import DEFAULT_MAX_PIXELS
from tlcli.data import images


def image_dataset(paths: list[str], size: int, *, labels: list[int] | None = None,
                  batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                  shuffle_seed: int | None = None, augment_seed: int | None = None,
                  unreadable_fill: float = 0.5, digests: bool = False):
    """tf.data of float32 [batch, size, size, 3] in [0, 1] (and int labels), decoded by the project
    decoder in parallel (within its memory budget) and prefetched. A file that became unreadable
    after the scan yields an image filled with ``unreadable_fill`` (grey) rather than crashing the
    epoch; feature extraction passes NaN so that such a file is noticed instead of cached. With
    ``digests`` each element is (images, string [batch]: ``image_files.digest`` of the bytes each
    image was decoded from, empty for an unreadable file) instead of the images."""
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
    ds = ds.batch(batch_size)
    if augment_seed is not None:
        aug = augmenter(augment_seed)
        # Sequential on purpose: the augmentation layers draw from stateful generators, and
        # parallel calls would hand the random numbers to batches in a varying order.
        ds = ds.map(lambda x, *rest: (aug(x, training=True), *rest) if rest else aug(x, training=True))
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


def augmenter(seed: int):
    """Random flip, zoom/crop, small rotation, brightness and contrast; output stays in [0, 1]."""
    from tlcli._tf import keras, tf

    L = keras().layers
    t = tf()
    layers = [
        L.RandomFlip("horizontal", seed=seed),
        L.RandomRotation(0.04, fill_mode="reflect", seed=seed + 1),
        L.RandomZoom((-0.2, 0.0), fill_mode="reflect", seed=seed + 2),
        L.RandomBrightness(0.15, value_range=(0.0, 1.0), seed=seed + 3),
        L.RandomContrast(0.15, seed=seed + 4),
    ]
    model = keras().Sequential(layers, name="augment")

    def apply(x, training=True):
        return t.clip_by_value(model(x, training=training), 0.0, 1.0)

    return apply
