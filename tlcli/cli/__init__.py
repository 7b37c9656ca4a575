"""The command line: the Typer app (``app``: made in ``common``, its commands in ``train_command``,
``use_commands`` and ``data_commands``, gathered by ``commands``; each parses, calls the library
and renders), its plumbing (``shell``) and every Rich table and progress line (``render``,
``reports``). Only this package touches Typer and Rich; the console script is ``tlcli.cli:run``.
(No module is named ``app``, so that ``tlcli.cli.app`` is only ever the Typer app.)"""

from tlcli.cli.commands import app, run

__all__ = ["app", "run"]
