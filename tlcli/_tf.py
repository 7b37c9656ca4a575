"""Lazy TensorFlow import: only code paths that need TF call ``tf()``."""

import os
import sys
import tempfile

from tlcli.quiet import native_stderr_silenced

_started = False


def imported():
    """TensorFlow imported, its runtime not started (no device listed yet): what can only be
    configured before it starts (a cluster's collectives) still can be."""
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # tlcli's Keras is tf_keras. Without this, the import also loads Keras 3 (tf.keras's
        # default), and with it scikit-learn and SciPy when installed: 1.7 s of CPU at every start.
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        # The import prints absl / oneDNN lines that no setting hides; a real failure still
        # surfaces as the Python exception.
        with native_stderr_silenced(), _interrupt_kept():
            import tensorflow
    import tensorflow

    return tensorflow


def tf():
    """TensorFlow, its runtime started (the devices listed, quietly: the CUDA probe prints)."""
    global _started
    tensorflow = imported()
    if not _started:
        with native_stderr_silenced(), _interrupt_kept():
            tensorflow.config.list_logical_devices()
        _started = True
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow


class _interrupt_kept:
    """Ctrl-C during an import inside a compiled extension's initialisation reaches Python as
    ``ImportError: initialization failed`` (pybind11 wraps it); re-raise it as the
    KeyboardInterrupt it was, so that the command ends with exit code 130, not a traceback."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, ImportError):
            cause = exc
            while cause is not None and not isinstance(cause, KeyboardInterrupt):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise KeyboardInterrupt from None
        return False


def keras():
    with _interrupt_kept():
        tf()
        import tf_keras

    return tf_keras


def hub():
    from tlcli.config import hub_cache_dir

    if not os.environ.get("TFHUB_CACHE_DIR"):  # read by tensorflow_hub when it resolves (unset or empty)
        os.environ["TFHUB_CACHE_DIR"] = str(hub_cache_dir())
    keras()
    with _interrupt_kept():
        import tensorflow_hub

    return tensorflow_hub


AUTOGRAPH_PREFIX = "__autograph_generated_file"  # TensorFlow's autograph/pyct/loader.py


def remove_autograph_files() -> None:
    """Remove the modules TensorFlow's autograph wrote into the temporary folder for this process
    (those of its modules in ``sys.modules``): autograph removes them in an atexit hook, which a
    process that ends with ``os._exit`` (the CLI, a cluster worker the watch ends) skips."""
    tmp = os.path.realpath(tempfile.gettempdir())
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if name.startswith(AUTOGRAPH_PREFIX) else None
        if path and os.path.basename(path).startswith(AUTOGRAPH_PREFIX) \
                and os.path.dirname(os.path.realpath(path)) == tmp:
            try:
                os.remove(path)
            except OSError:
                pass
