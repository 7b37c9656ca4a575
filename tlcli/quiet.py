"""Silencing what native libraries (TensorFlow, LiteRT) print straight to file descriptor 2."""

import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what native code writes to file descriptor 2 inside the block.

    LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on the first
    ``allocate_tensors`` of a process, and TensorFlow's import prints absl and CUDA-probe lines
    whatever TF_CPP_MIN_LOG_LEVEL says; no setting turns them off. Errors still reach the
    caller as Python exceptions, printed after the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
