"""Augmentation for fine-tuning on a small set, in TensorFlow ops inside the input pipeline: a
random resized crop, a left-right flip only where mirroring keeps the class (``--mirror``),
a mild colour jitter, and one TrivialAugment operation of random strength.

Every op is stateless, driven by a per-image seed pair, so an epoch's augmentation depends only
on the seed (and images may be augmented in parallel). Input and output: float32
[size, size, 3] in [0, 1].
"""

from __future__ import annotations

import functools
import math

# The crop keeps at least this share of the image's area (most of the subject: a small set has
# no second photo of it), at an aspect ratio in CROP_RATIO.
CROP_AREA = (1 / 3, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Colour jitter: brightness shift, contrast and saturation factors, hue shift (of the circle).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.1, (0.8, 1.2), (0.8, 1.2), 0.02
# TrivialAugment's operations and their largest strengths (RandAugment's ranges): one op a
# photo, its strength uniform in [0, max].
ROTATE_DEGREES, SHEAR, FACTOR = 30.0, 0.3, 0.9  # factor ops: 1 +- FACTOR
TRIVIAL_OPS = ("identity", "rotate", "shear_x", "shear_y", "brightness", "contrast", "saturation", "sharpness",
               "solarize", "posterize", "autocontrast")


def augmenter(*, mirror: bool, trivial: bool = True, size: int | None = None):
    """The per-image augmentation ``(image, seed) -> image``: ``seed`` an int64 [2] tensor.
    ``mirror``: flip left-right half the time (False where mirroring changes the class);
    ``trivial``: add one TrivialAugment op; ``size``: the side of the images it returns (None: the
    input's): the crop is taken from the image as decoded and resized to it, so training below the
    features' size keeps the detail of the larger image (FixRes)."""
    from tlcli._tf import tf

    t = tf()

    def apply(image, seed):
        seeds = t.random.experimental.stateless_split(t.cast(seed, t.int64), num=6)
        x = random_resized_crop(image, seeds[0], size=size)
        if mirror:
            x = t.image.stateless_random_flip_left_right(x, seeds[1])
        x = colour_jitter(x, seeds[2])
        if trivial:
            x = trivial_augment(x, seeds[3])
        return t.clip_by_value(x, 0.0, 1.0)

    return apply


def crop_box(shape, seed):
    """(begin, size) of a random box in an image of ``shape`` [h, w, c]: ``CROP_AREA`` of its area
    at a ``CROP_RATIO`` aspect ratio (TensorFlow's sampler: the ratio, then the height, each
    uniform; ``training.plan.crop_zoom`` models what that does to objects' size)."""
    from tlcli._tf import tf

    t = tf()
    begin, size, _ = t.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=t.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=CROP_RATIO, area_range=CROP_AREA, max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, size


def random_resized_crop(image, seed, *, size: int | None = None):
    """A random crop of ``CROP_AREA`` of the area at a ``CROP_RATIO`` aspect ratio, resized back
    to the image's size, or to ``size`` x ``size``."""
    from tlcli._tf import tf

    t = tf()
    shape = t.shape(image)
    begin, extent = crop_box(shape, seed)
    crop = t.slice(image, begin, extent)
    out_shape = shape[:2] if size is None else (size, size)
    out = t.image.resize(crop[None], out_shape, method="bilinear", antialias=True)[0]
    return t.ensure_shape(out, image.shape if size is None else (size, size, image.shape[-1]))


def colour_jitter(image, seed):
    """Brightness, contrast, saturation and hue, each a small random amount."""
    from tlcli._tf import tf

    t = tf()
    s = t.random.experimental.stateless_split(seed, num=4)
    x = t.image.stateless_random_brightness(image, BRIGHTNESS, s[0])
    x = t.image.stateless_random_contrast(x, *CONTRAST, s[1])
    x = t.image.stateless_random_saturation(t.clip_by_value(x, 0.0, 1.0), *SATURATION, s[2])
    return t.image.stateless_random_hue(x, HUE, s[3])


def trivial_augment(image, seed):
    """One of ``TRIVIAL_OPS`` chosen uniformly, at a strength uniform in [0, 1] of its largest."""
    from tlcli._tf import tf

    t = tf()
    s = t.random.experimental.stateless_split(seed, num=3)
    which = t.random.stateless_uniform([], s[0], 0, len(TRIVIAL_OPS), dtype=t.int32)
    strength = t.random.stateless_uniform([], s[1])
    sign = t.where(t.random.stateless_uniform([], s[2]) < 0.5, -1.0, 1.0)
    x = t.clip_by_value(image, 0.0, 1.0)
    branches = [functools.partial(_OPS[name], x, strength, sign) for name in TRIVIAL_OPS]
    return t.ensure_shape(t.switch_case(which, branches), image.shape)


def _affine(image, matrix):
    """``image`` resampled through the 3x3 output->input ``matrix`` about its centre, edges reflected."""
    from tlcli._tf import tf

    t = tf()
    h, w = t.cast(t.shape(image)[0], t.float32), t.cast(t.shape(image)[1], t.float32)
    centre = t.convert_to_tensor([[1.0, 0.0, w / 2], [0.0, 1.0, h / 2], [0.0, 0.0, 1.0]])
    back = t.convert_to_tensor([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
    m = centre @ matrix @ back
    transform = t.reshape(m, [-1])[:8] / m[2, 2]
    return t.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=t.shape(image)[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")[0]


def _rotate(x, strength, sign):
    from tlcli._tf import tf

    t = tf()
    a = sign * strength * ROTATE_DEGREES * math.pi / 180
    c, s = t.cos(a), t.sin(a)
    return _affine(x, t.stack([t.stack([c, -s, 0.0]), t.stack([s, c, 0.0]), t.constant([0.0, 0.0, 1.0])]))


def _shear(axis: int):
    def op(x, strength, sign):
        from tlcli._tf import tf

        t = tf()
        k = sign * strength * SHEAR
        rows = [[1.0, k, 0.0], [0.0, 1.0, 0.0]] if axis == 0 else [[1.0, 0.0, 0.0], [k, 1.0, 0.0]]
        return _affine(x, t.stack([t.stack(r) for r in rows] + [t.constant([0.0, 0.0, 1.0])]))
    return op


def _blend(a, b, factor):
    """``b`` + ``factor`` * (``a`` - ``b``): 0 gives ``b``, 1 gives ``a``, above 1 pushes past it."""
    return b + factor * (a - b)


def _factor(strength, sign):
    return 1.0 + sign * strength * FACTOR


def _brightness(x, strength, sign):
    return _blend(x, x * 0.0, _factor(strength, sign))


def _contrast(x, strength, sign):
    from tlcli._tf import tf

    mean = tf().reduce_mean(tf().image.rgb_to_grayscale(x))
    return _blend(x, x * 0.0 + mean, _factor(strength, sign))


def _saturation(x, strength, sign):
    from tlcli._tf import tf

    return _blend(x, tf().image.grayscale_to_rgb(tf().image.rgb_to_grayscale(x)), _factor(strength, sign))


def _sharpness(x, strength, sign):
    from tlcli._tf import tf

    t = tf()
    kernel = t.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = t.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = t.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "SAME")[0]
    return _blend(x, smooth, _factor(strength, sign))


def _solarize(x, strength, sign):
    from tlcli._tf import tf

    threshold = 1.0 - strength  # strength 0: nothing inverted
    return tf().where(x >= threshold, 1.0 - x, x)


def _posterize(x, strength, sign):
    from tlcli._tf import tf

    t = tf()
    bits = 8.0 - t.round(strength * 4.0)  # 8 (unchanged) down to 4 bits a channel
    levels = t.pow(2.0, bits)
    return t.floor(x * (levels - 1) + 0.5) / (levels - 1)


def _autocontrast(x, strength, sign):
    from tlcli._tf import tf

    t = tf()
    lo, hi = t.reduce_min(x, axis=[0, 1]), t.reduce_max(x, axis=[0, 1])
    scale = t.where(hi > lo, 1.0 / t.maximum(hi - lo, 1e-6), 1.0)
    return t.where(hi > lo, (x - lo) * scale, x)


_OPS = {"identity": lambda x, strength, sign: x, "rotate": _rotate, "shear_x": _shear(0), "shear_y": _shear(1),
        "brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "sharpness": _sharpness,
        "solarize": _solarize, "posterize": _posterize, "autocontrast": _autocontrast}
