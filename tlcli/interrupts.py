"""SIGTERM handled as Ctrl-C, for the commands that write: ``train``, ``export`` and ``audit``."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM (docker stop, a CI job cancelled, ``timeout``) stops it as
    Ctrl-C does: ``KeyboardInterrupt`` unwinds it, so its ``finally`` blocks remove what it made
    (temporary folders, locks), what it replaces stays intact, and the command exits 130. Main
    thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
