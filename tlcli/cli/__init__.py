"""The command line: the Typer app (``app``: parse, call the library, render) and every Rich
table and progress line (``render``). Only this package touches Typer and Rich; the console
script is ``tlcli.cli:run``."""

from tlcli.cli.app import app, run

__all__ = ["app", "run"]
