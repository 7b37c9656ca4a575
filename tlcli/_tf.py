"""Lazy TensorFlow import: only code paths that need TF call ``tf()``."""

import os


def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow


def keras():
    tf()
    import tf_keras

    return tf_keras


def hub():
    keras()
    import tensorflow_hub

    return tensorflow_hub
