"""The classifier: preprocessing contract + backbone + head, and the feature extractors; and what
fine-tunes it (from ``layer_scales`` on).

Fine-tuning's model-level parts: its optimizer, Adam with discriminative learning rates (lower
for a backbone's early layers) on a warm-up + cosine schedule, and the weight averaging of its
checkpoints, a greedy soup kept only where the holdout agrees.

Learning rates. The early layers of a pretrained backbone hold generic features (edges,
textures) that a small set should barely move; the last ones are the most specific to the
pretraining task. The backbone's trainable variables, in the order the model lists them (its
depth order: a TF Hub layer lists them as they were created), are cut into ``GROUPS`` groups of
equal count; group g of G gets the rate ``LAYER_DECAY ** (G - 1 - g)`` times the head's. The peak
(``--fine-tune-learning-rate``, 1e-4): Adam moves a weight by about the rate each step, and a
small set gives fine-tuning only tens of steps; at 1e-5 it could barely move.

Averaging. Checkpoints of one fine-tuning run start from the same weights and stay in one basin
of the loss, so their average is itself a good model, often better than any one of them. The
soup starts from the checkpoint with the best holdout loss and adds the others in order of their
loss, each only when the holdout loss of the new average is no worse: the result is never worse
on the holdout than the best single checkpoint. The result is then kept only where it beats the
starting weights on the holdout beyond chance (``significantly_better``). BatchNorm's statistics are frozen during
fine-tuning, so every checkpoint has the same ones and the average needs no recalibration.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tlcli._tf import keras, tf


def build_head(feature_dim: int, num_classes: int, *, dropout: float, l2: float, seed: int,
               activation: str = "softmax"):
    """Dropout + Dense on [batch, feature_dim] features -> [batch, num_classes] probabilities:
    a softmax over the classes, or with ``activation="sigmoid"`` one independent probability per
    label (a multi-label model, ``model.multilabel``)."""
    k = keras()
    return k.Sequential([
        k.layers.InputLayer(input_shape=(feature_dim,)),
        k.layers.Dropout(dropout, seed=seed),
        k.layers.Dense(num_classes, activation=activation,
                       kernel_initializer=k.initializers.GlorotUniform(seed=seed),
                       kernel_regularizer=k.regularizers.l2(l2) if l2 else None),
    ], name="head")


def head_under_policy(head, policy: str):
    """A copy of ``head`` (``build_head``) whose Dropout and Dense compute in ``policy``'s dtype
    (their variables stay float32) and whose softmax (or sigmoid) runs in float32, with ``head``'s weights
    and L2 penalty: what fine-tuning trains under a mixed-precision policy."""
    k = keras()
    dropout, dense = head.layers[0], head.layers[-1]
    mixed = k.Sequential([
        k.layers.InputLayer(input_shape=(int(dense.kernel.shape[0]),)),
        k.layers.Dropout(dropout.rate, seed=dropout.seed, dtype=policy),
        k.layers.Dense(dense.units, kernel_regularizer=dense.kernel_regularizer, dtype=policy),
        k.layers.Activation(dense.get_config()["activation"], dtype="float32"),
    ], name="head")
    mixed.layers[1].set_weights(dense.get_weights())
    return mixed


def load_head_weights(head, kernel: np.ndarray, bias: np.ndarray, l2: float) -> None:
    """Put a head fit (``head.fit_head``: kernel [d, k], bias [k]) into the head's Dense layer;
    its L2 penalty, when it has one, becomes ``l2`` (fine-tuning keeps the one CV chose)."""
    dense = head.layers[-1]
    dense.set_weights([kernel, bias])
    if dense.kernel_regularizer is not None:
        dense.kernel_regularizer.l2 = np.float32(l2)


def build_classifier(backbone_layer, head, image_size: int | None, *, mirror: bool = False, crop: bool = False,
                     with_features: bool = False):
    """float32 [batch, size, size, 3] in [0, 1] -> probabilities (``image_size`` None: any size, for
    a backbone that takes any: fine-tuning below its size; never with ``crop``). The backbone always runs in
    inference mode (BatchNorm uses its moving statistics), even while fine-tuning. With
    ``mirror`` the head sees the mean of the features of each image and of its left-right
    mirror image (the backbone runs twice). With ``crop`` (test-time augmentation,
    ``features.tta``) it also sees the central crop's (``crop_view``) and, with ``mirror``, the
    crop's mirror image's: the mean of the (plain, crop) and (mirror, crop mirror) pairs' means,
    as the head's feature views average them. ``with_features``: -> [probabilities, the features
    the head sees] (what the unknown score is computed from)."""
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    features = _features(backbone_layer, images, mirror=mirror, crop=crop)
    if with_features:
        return k.Model(images, [head(features), features], name="classifier_and_features")
    return k.Model(images, head(features), name="classifier")


def build_extractor(backbone_layer, image_size: int, *, flip: bool = False, crop: bool = False):
    """Images -> backbone features; of their left-right mirror images when ``flip``, of their
    central crop (``crop_view``, then mirrored with ``flip``) when ``crop``."""
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    return k.Model(images, backbone_layer(_view(images, flip=flip, crop=crop), training=False), name="extractor")


@dataclass
class Models:
    """The Keras models of one run, sharing the backbone layer and the head:
    ``one_view`` (images -> probabilities from one view: what fine-tuning trains), ``classifier``
    (what is served: ``one_view``, or the mirror-averaging classifier), ``extractor`` and, with
    mirror averaging, ``flip_extractor`` (images -> features of their mirror images)."""

    head: object
    one_view: object
    classifier: object
    extractor: object
    flip_extractor: object | None


def build_models(backbone, num_classes: int, *, dropout: float, l2: float, seed: int, mirror: bool,
                 activation: str = "softmax") -> Models:
    """The models of a run on a loaded backbone (``backbone.load``). Build them before any other
    thread traces the backbone layer (the SavedModel export does). ``activation``: the head's
    (``build_head``)."""
    size, layer = backbone.image_size, backbone.layer
    head = build_head(backbone.feature_dim, num_classes, dropout=dropout, l2=l2, seed=seed, activation=activation)
    one_view = build_classifier(layer, head, size)
    return Models(head=head, one_view=one_view,
                  classifier=build_classifier(layer, head, size, mirror=True) if mirror else one_view,
                  extractor=build_extractor(layer, size),
                  flip_extractor=build_extractor(layer, size, flip=True) if mirror else None)


# Test-time augmentation's crop: the central 87.5% of each side (224 of 256, the evaluation crop
# of the ImageNet models most backbones come from), resized back to the input size.
CROP_FRACTION = 0.875


def crop_view(images):
    """The central ``CROP_FRACTION`` of float32 [batch, S, S, 3] images, resized back to S x S:
    a static slice and a bilinear resize without antialiasing (an enlargement: antialiasing would
    not change it), ops that TFLite, tf2onnx and OpenVINO convert."""
    size = int(images.shape[1])
    side = max(1, round(size * CROP_FRACTION))
    start = (size - side) // 2
    box = images[:, start:start + side, start:start + side, :]
    return tf().image.resize(box, [size, size], method="bilinear", antialias=False)


def _flip(images):
    return tf().reverse(images, axis=[2])  # [batch, height, width, channels]: mirror the width


def _view(images, *, flip: bool = False, crop: bool = False):
    """One test-time view of ``images``: cropped (``crop_view``), then mirrored."""
    images = crop_view(images) if crop else images
    return _flip(images) if flip else images


def _features(backbone_layer, images, *, mirror: bool, crop: bool = False):
    def mean(pair, name):
        return keras().layers.Average(name=name)([backbone_layer(_view(images, **v), training=False) for v in pair])

    if not crop:
        return mean([{}, {"flip": True}], "mirror_average") if mirror else backbone_layer(images, training=False)
    plain = mean([{}, {"crop": True}], "crop_average")
    if not mirror:
        return plain
    flipped = mean([{"flip": True}, {"flip": True, "crop": True}], "mirror_crop_average")
    return keras().layers.Average(name="mirror_average")([plain, flipped])


# ---- fine-tuning: the optimizer, its schedule and the weight averaging -------------------------
GROUPS = 4
LAYER_DECAY = 0.5  # the earliest quarter learns at 1/8 of the head's rate
# The warm-up: this share of all steps (at least one), from 0 to the peak rate.
WARMUP_SHARE = 0.1


def layer_scales(variables: list, *, groups: int = GROUPS, decay: float = LAYER_DECAY) -> list[float]:
    """The learning-rate multiplier of each of ``variables`` (in depth order): ``decay ** (groups
    - 1 - g)`` for the g-th of ``groups`` contiguous groups of equal count (the last group gets
    1.0). Fewer variables than groups: each is its own group, from the last."""
    n = len(variables)
    if n == 0:
        return []
    groups = max(1, min(groups, n))
    return [float(decay ** (groups - 1 - min(groups - 1, i * groups // n))) for i in range(n)]


def warmup_cosine(peak: float, total_steps: int, *, warmup_share: float = WARMUP_SHARE):
    """The schedule (a Keras ``LearningRateSchedule``): linear from 0 to ``peak`` over the first
    ``warmup_share`` of ``total_steps`` (at least one step), then a half cosine down to 0 at
    ``total_steps``, and 0 after. Its ``set_total(steps)`` changes the length after the training
    step is traced (the steps are variables): the time budget plans the epochs only once a few
    steps have been timed."""
    return _warmup_cosine_class()(peak, total_steps, warmup_share=warmup_share)


@functools.cache
def _warmup_cosine_class():
    k, t = keras(), tf()

    class WarmupCosine(k.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak: float, total_steps: int, *, warmup_share: float):
            super().__init__()
            self.peak, self.warmup_share = float(peak), float(warmup_share)
            self.total = t.Variable(1.0, trainable=False, dtype=t.float32, name="schedule_total")
            self.warmup = t.Variable(1.0, trainable=False, dtype=t.float32, name="schedule_warmup")
            self.set_total(total_steps)

        def set_total(self, total_steps: int) -> None:
            total = max(1, int(total_steps))
            self.total.assign(float(total))
            self.warmup.assign(float(max(1, math.ceil(self.warmup_share * total))))

        def __call__(self, step):
            step = t.cast(step, t.float32)
            warm = self.peak * t.minimum(1.0, (step + 1.0) / self.warmup)
            done = t.clip_by_value((step + 1.0 - self.warmup) / (self.total - self.warmup + 1.0), 0.0, 1.0)
            cosine = 0.5 * self.peak * (1.0 + t.cos(math.pi * done))
            return t.where(step + 1.0 <= self.warmup, warm, cosine)

        def get_config(self):
            return {"peak": self.peak, "total_steps": int(self.total.numpy()), "warmup_share": self.warmup_share}

    return WarmupCosine


def build_optimizer(learning_rate, backbone_variables: list):
    """Adam at ``learning_rate`` (a number or schedule) whose updates of ``backbone_variables``
    are scaled by ``layer_scales``; every other variable (the head) gets the full rate."""
    scales = {v.ref(): s for v, s in zip(backbone_variables, layer_scales(backbone_variables)) if s != 1.0}
    return _layerwise_adam_class()(learning_rate=learning_rate, scales=scales)


@functools.cache
def _layerwise_adam_class():
    k, t = keras(), tf()

    class LayerwiseAdam(k.optimizers.Adam):
        """Adam whose step for a variable in ``scales`` (``variable.ref()`` -> multiplier) is that
        multiple of Adam's own: the same as a per-variable learning rate, through the public
        ``update_step`` of Keras' optimizer."""

        def __init__(self, *args, scales: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._lr_scales = dict(scales or {})

        def update_step(self, gradient, variable):
            scale = self._lr_scales.get(variable.ref(), 1.0)
            if scale == 1.0:
                return super().update_step(gradient, variable)
            before = t.identity(variable)
            super().update_step(gradient, variable)
            variable.assign(before + scale * (variable - before))

    return LayerwiseAdam



# Checkpoints kept in memory for the soup (the best ones by holdout loss): a soup rarely takes
# more, and each is a full copy of the model's weights.
MAX_INGREDIENTS = 5


def keep_best(ingredients: list[tuple[float, list[np.ndarray]]], loss: float, weights: list[np.ndarray],
              *, limit: int = MAX_INGREDIENTS) -> None:
    """Add (``loss``, ``weights``) to ``ingredients`` in place, keeping only the ``limit`` of
    lowest loss (a NaN loss is never kept)."""
    if not np.isfinite(loss):
        return
    ingredients.append((float(loss), weights))
    ingredients.sort(key=lambda item: item[0])
    del ingredients[limit:]


def average(members: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The element-wise mean of several weight lists (same shapes); non-float arrays (counters)
    are taken from the first."""
    out = []
    for arrays in zip(*members):
        first = arrays[0]
        if np.issubdtype(first.dtype, np.floating):
            out.append((np.sum([a.astype(np.float64) for a in arrays], axis=0) / len(arrays)).astype(first.dtype))
        else:
            out.append(first)
    return out


def greedy_soup(ingredients: list[tuple[float, list[np.ndarray]]], evaluate: Callable[[list[np.ndarray]], float],
                *, keep_going: Callable[[], bool] = lambda: True) -> tuple[list[np.ndarray], float, list[int]]:
    """(weights, their holdout loss, the indices of ``ingredients`` averaged into them).
    ``ingredients``: (holdout loss, weights) pairs, never empty; ``evaluate(weights)`` returns
    the holdout loss of a candidate average. Tries each ingredient once, in order of loss, while
    ``keep_going()`` (the time budget); keeps it when the average's loss is no worse."""
    order = sorted(range(len(ingredients)), key=lambda i: ingredients[i][0])
    members = [order[0]]
    best_loss, best = ingredients[order[0]][0], ingredients[order[0]][1]
    for i in order[1:]:
        if not keep_going():
            break
        trial = average([ingredients[j][1] for j in members] + [ingredients[i][1]])
        loss = float(evaluate(trial))
        if loss <= best_loss:
            members.append(i)
            best_loss, best = loss, trial
    return best, best_loss, members


# Fine-tuning is kept only when the holdout's per-image losses are lower than the starting
# weights' by this many standard errors of the mean difference (paired; one-sided 97.5%): a
# holdout of a few dozen photos is noisy, and keeping a change it cannot tell from chance risks
# ending worse than the head-only model.
GATE_Z = 1.96


def significantly_better(before, after, *, z: float = GATE_Z) -> bool:
    """Whether the per-image losses ``after`` (same images, same order as ``before``) are lower
    on average than ``before`` by more than ``z`` standard errors of the paired difference."""
    d = np.asarray(before, np.float64) - np.asarray(after, np.float64)
    if d.size < 2 or not np.all(np.isfinite(d)):
        return False
    return bool(d.mean() > 0 and d.mean() > z * d.std(ddof=1) / np.sqrt(d.size))
