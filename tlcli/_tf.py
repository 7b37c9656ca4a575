"""Lazy TensorFlow import: only code paths that need TF call ``tf()``."""

import os
import sys

from tlcli.quiet import native_stderr_silenced


def tf():
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # The import and the first device scan print absl / oneDNN / CUDA-probe lines that no
        # setting hides; a real failure still surfaces as the Python exception.
        with native_stderr_silenced():
            import tensorflow

            tensorflow.config.list_logical_devices()
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
