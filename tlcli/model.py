"""The classifier: preprocessing contract + backbone + head, and its serving signatures."""

from __future__ import annotations

from tlcli._tf import keras, tf


def build_head(feature_dim: int, num_classes: int, *, dropout: float, l2: float, seed: int):
    """Dropout + softmax Dense on [batch, feature_dim] features -> [batch, num_classes] probabilities."""
    k = keras()
    return k.Sequential([
        k.layers.InputLayer(input_shape=(feature_dim,)),
        k.layers.Dropout(dropout, seed=seed),
        k.layers.Dense(num_classes, activation="softmax",
                       kernel_initializer=k.initializers.GlorotUniform(seed=seed),
                       kernel_regularizer=k.regularizers.l2(l2) if l2 else None),
    ], name="head")


def build_classifier(backbone_layer, head, image_size: int):
    """float32 [batch, size, size, 3] in [0, 1] -> probabilities. The backbone always runs in
    inference mode (BatchNorm uses its moving statistics), even while fine-tuning."""
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    features = backbone_layer(images, training=False)
    probs = head(features)
    return k.Model(images, probs, name="classifier")


def build_extractor(backbone_layer, image_size: int):
    k = keras()
    images = k.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    return k.Model(images, backbone_layer(images, training=False), name="extractor")


def decode_image_bytes(data, image_size: int):
    """In-graph twin of the Pillow decoder for the bytes signature: JPEG/PNG/GIF/BMP bytes ->
    float32 [size, size, 3] in [0, 1] (first frame; alpha dropped; antialiased bilinear resize)."""
    t = tf()
    img = t.io.decode_image(data, channels=3, expand_animations=False, dtype=t.uint8)
    img = t.image.resize(t.cast(img, t.float32), [image_size, image_size], method="bilinear",
                         antialias=True)
    return t.clip_by_value(t.round(img) / 255.0, 0.0, 1.0)


def serving_module(classifier, image_size: int, labels: list[str]):
    """A tf.Module with two signatures:

    * ``serving_default``: ``images`` float32 [batch, size, size, 3] in [0, 1] -> ``probabilities``
    * ``serving_bytes``: ``image_bytes`` string [batch] (encoded JPEG/PNG) -> ``probabilities``,
      plus ``labels`` (string [batch, k], best first is *not* implied; index order) for convenience.
    """
    t = tf()
    module = t.Module()
    module.classifier = classifier
    module.labels = t.constant(labels)

    @t.function(input_signature=[t.TensorSpec([None, image_size, image_size, 3], t.float32, name="images")])
    def serve_images(images):
        return {"probabilities": module.classifier(images, training=False)}

    @t.function(input_signature=[t.TensorSpec([None], t.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        batch = t.map_fn(lambda b: decode_image_bytes(b, image_size), image_bytes,
                         fn_output_signature=t.TensorSpec([image_size, image_size, 3], t.float32))
        probs = module.classifier(batch, training=False)
        return {"probabilities": probs,
                "labels": t.tile(module.labels[None, :], [t.shape(probs)[0], 1])}

    module.serve_images = serve_images
    module.serve_bytes = serve_bytes
    return module, {"serving_default": serve_images, "serving_bytes": serve_bytes}
