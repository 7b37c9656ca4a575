"""The command line: the Typer app (``app``, built in ``commands``: parse, call the library,
render), its plumbing (``shell``) and every Rich table and progress line (``render``,
``reports``). Only this package touches Typer and Rich; the console script is ``tlcli.cli:run``.
(The module is ``commands``, not ``app``, so that ``tlcli.cli.app`` is only ever the Typer app.)"""

from tlcli.cli.commands import app, run

__all__ = ["app", "run"]
