"""The command line, gathered: the Typer app of ``common`` with every command registered on it
(``train_command``, ``use_commands``, ``data_commands``), and the console script. Each command only
parses its options, calls the library and renders (``render``, ``reports``)."""

from __future__ import annotations

import sys

# Imported for their commands, in the order `tlcli --help` lists them.
# isort: off
from tlcli.cli import train_command, use_commands, data_commands  # noqa: F401
# isort: on
from tlcli.cli.common import app

__all__ = ["app", "run"]


def run() -> None:
    """The ``tlcli`` console script: the Typer app, then a fast exit.

    Once a command has finished (bundle renamed into place, files closed, output flushed), the
    interpreter's teardown of TensorFlow still takes over a second; a process that imported it
    skips that with ``os._exit``. Tests call ``app`` directly and are not affected.
    """
    try:
        app()
        code = 0
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    # Also after Ctrl-C inside the TensorFlow import, which leaves part of it loaded: the
    # interpreter's teardown of a half-imported TensorFlow can end the process by SIGINT.
    if code == 130 or any(name.partition(".")[0] == "tensorflow" for name in sys.modules):
        import os

        from tlcli._tf import remove_autograph_files

        remove_autograph_files()  # os._exit skips autograph's own atexit removal
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
