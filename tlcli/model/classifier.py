"""The classifier: preprocessing contract + backbone + head, and the feature extractors."""

from __future__ import annotations

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


def build_classifier(backbone_layer, head, image_size: int, *, mirror: bool = False):
    """float32 [batch, size, size, 3] in [0, 1] -> probabilities. The backbone always runs in
    inference mode (BatchNorm uses its moving statistics), even while fine-tuning. With
    ``mirror`` the head sees the mean of the features of each image and of its left-right
    mirror image (the backbone runs twice)."""
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    features = _features(backbone_layer, images, mirror=mirror)
    return k.Model(images, head(features), name="classifier")


def build_extractor(backbone_layer, image_size: int, *, flip: bool = False):
    """Images -> backbone features; of their left-right mirror images when ``flip``."""
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    return k.Model(images, backbone_layer(_flip(images) if flip else images, training=False), name="extractor")


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


def _flip(images):
    return tf().reverse(images, axis=[2])  # [batch, height, width, channels]: mirror the width


def _features(backbone_layer, images, *, mirror: bool):
    features = backbone_layer(images, training=False)
    if not mirror:
        return features
    return keras().layers.Average(name="mirror_average")([features, backbone_layer(_flip(images), training=False)])
