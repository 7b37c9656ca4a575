"""Silencing what native libraries (TensorFlow, LiteRT) print straight to file descriptor 2."""

import contextlib
import io
import os
import sys
import threading

_lock = threading.Lock()
_depth = 0        # blocks open now, in any thread
_saved = None     # (the real fd 2 duplicated, sys.stderr before the first block, its stand-in)


@contextlib.contextmanager
def native_stderr_silenced():
    """Discard what native code writes to file descriptor 2 inside the block.

    LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on the first
    ``allocate_tensors`` of a process, and TensorFlow's import prints absl and CUDA-probe lines
    whatever TF_CPP_MIN_LOG_LEVEL says; no setting turns them off. Errors still reach the
    caller as Python exceptions, printed after the block.

    What Python writes to ``sys.stderr`` meanwhile (another thread's progress display, a
    warning) still reaches the real stderr: ``sys.stderr`` stands in for it on a duplicate of
    the original descriptor. Blocks may overlap across threads (the file check runs while
    TensorFlow is imported): the first one in silences, the last one out restores."""
    if not _enter():
        yield
        return
    try:
        yield
    finally:
        _leave()


def _enter() -> bool:
    global _depth, _saved
    with _lock:
        if _depth:
            _depth += 1
            return True
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to silence
            return False
        stand_in = _stand_in(saved)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        _saved, _depth = (saved, sys.stderr, stand_in), 1
        if stand_in is not None:
            sys.stderr = stand_in
        return True


def _leave() -> None:
    global _depth, _saved
    with _lock:
        _depth -= 1
        if _depth:
            return
        saved, before, stand_in = _saved
        _saved = None
        if stand_in is not None:
            with contextlib.suppress(OSError, ValueError):
                stand_in.flush()
            if sys.stderr is stand_in:  # nobody replaced it meanwhile
                sys.stderr = before
        os.dup2(saved, 2)
        os.close(saved)


def _stand_in(fd: int):
    """A text stream like ``sys.stderr`` writing to ``fd`` (not closing it), or None when
    ``sys.stderr`` is not the process's fd 2 (a test's capture, a redirect): left alone then."""
    try:
        if sys.stderr.fileno() != 2:
            return None
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return open(fd, "w", encoding=getattr(sys.stderr, "encoding", None) or "utf-8",  # noqa: SIM115 (lives across the block)
                errors=getattr(sys.stderr, "errors", None) or "backslashreplace", closefd=False,
                buffering=1)
