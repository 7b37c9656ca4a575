"""Silencing what native libraries (TensorFlow, LiteRT) print straight to file descriptor 2."""

import contextlib
import io
import os
import sys
import threading

_lock = threading.Lock()
_depth = 0          # blocks open now, in any thread
_before = None      # sys.stderr when the first of them opened
_real = None        # (a duplicate of the original fd 2, the text stream on it): made once, never closed


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what native code writes to file descriptor 2 inside the block.

    LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on the first
    ``allocate_tensors`` of a process, and TensorFlow's import prints absl and CUDA-probe lines
    whatever TF_CPP_MIN_LOG_LEVEL says; no setting turns them off. Errors still reach the
    caller as Python exceptions, printed after the block.

    What Python writes to ``sys.stderr`` meanwhile (another thread's progress display, a
    warning) still reaches the real stderr: ``sys.stderr`` stands in for it on a duplicate of
    the original descriptor, made once per process and never closed, so a writer that kept it
    (a logging handler made inside the block, a display thread) never writes to a closed or
    reused descriptor. Blocks may overlap across threads (the file check runs while TensorFlow
    is imported): the first one in silences, the last one out restores."""
    entered = False
    try:
        entered = _enter()
        yield
    finally:
        if entered:
            _leave()


def _enter() -> bool:
    global _depth, _before, _real
    with _lock:
        if _depth:
            _depth += 1
            return True
        try:
            sys.stderr.flush()
            if _real is None:
                fd = os.dup(2)
                _real = (fd, _stand_in(fd))
        except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to silence
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        _depth, _before = 1, sys.stderr
        try:
            if _real[1] is not None and _is_fd2(sys.stderr):
                sys.stderr = _real[1]
            os.dup2(devnull, 2)
        except BaseException:  # a Ctrl-C in the middle: leave nothing half done
            _depth, sys.stderr = 0, _before
            os.dup2(_real[0], 2)
            raise
        finally:
            os.close(devnull)
        return True


def _leave() -> None:
    global _depth, _before
    with _lock:
        _depth -= 1
        if _depth:
            return
        os.dup2(_real[0], 2)
        if sys.stderr is _real[1]:  # nobody replaced it meanwhile
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            sys.stderr = _before
        _before = None


def _is_fd2(stream) -> bool:
    """Whether ``stream`` writes to the process's fd 2 (not a test's capture or a redirect)."""
    try:
        return stream.fileno() == 2
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


def _stand_in(fd: int):
    """A text stream like ``sys.stderr`` writing to ``fd`` (not closing it), or None when
    ``sys.stderr`` is not the process's fd 2: it is left alone then."""
    if not _is_fd2(sys.stderr):
        return None
    return open(fd, "w", encoding=getattr(sys.stderr, "encoding", None) or "utf-8",  # noqa: SIM115 (lives as long as the process)
                errors=getattr(sys.stderr, "errors", None) or "backslashreplace", closefd=False,
                buffering=1)
