"""The Typer plumbing under the app: help that names values and never cuts an option, command-line
mistakes as one line (exit 2). A closed stdout (``tlcli ... | head``) Typer itself ends quietly
with exit code 1, in every version ``pyproject.toml`` allows (``tests/test_pipes.py``). Only
public Typer and Click names are used."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from tlcli.cli import render
from tlcli.errors import UsageError


class TidyHelp:
    """Help that names values, not Python types: a flag shows no value (Typer writes ``<bool>``),
    an option its value's kind (``N``, ``NUMBER``, ``TEXT``, ``PATH``; choices as they are), and
    an argument only its name (``DIR``, ``PATH``), never ``<list[Path]>``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            _tidy_metavar(param, ctx)
        return params

    def format_options(self, ctx, formatter) -> None:
        """Plain help (it wraps at any width and never cuts an option's name), one section per
        panel (``rich_help_panel``): the arguments, then train's Data, Model, ..., then the rest."""
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                name = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None)
                sections.setdefault(name or "Options", []).append(record)
        sections["Options"] = sections.pop("Options", [])  # --help (and unpanelled options) last
        for name, rows in sections.items():
            if rows:
                with formatter.section(name):
                    formatter.write_dl(rows)
        if hasattr(self, "format_commands"):  # a group: its commands after its options
            self.format_commands(ctx, formatter)

_KINDS = {"int": "N", "float": "NUMBER", "str": "TEXT", "Path": "PATH"}


def _tidy_metavar(param, ctx) -> None:
    if getattr(param, "param_type_name", "") == "argument":
        param.display_type_rich = lambda ctx: None  # the name column already says DIR or PATH
    elif param.metavar is None:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            shown = str(param.display_type(ctx) or "").strip("<>")
            param.metavar = f"<{shown}>" if "|" in shown else _KINDS.get(shown.split(" ")[0], shown.upper())


class Command(TidyHelp, typer.core.TyperCommand):
    """A command with tidy help."""


class Group(TidyHelp, typer.core.TyperGroup):
    """A group of commands with tidy help."""


class OneLineUsageErrors(Group):
    """Command-line mistakes Typer finds itself (an unknown choice, a value of the wrong type, a
    missing argument) are one line like every other tlcli error, not a boxed block, with exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            if not standalone_mode:
                raise
            code = 1
        except Exception as exc:
            if not _is_usage_error(exc) or not standalone_mode:
                raise
            code = _show_usage_error(exc)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(exc: Exception) -> bool:
    """Whether ``exc`` is one of the command-line errors Typer raises (Click's exception family,
    which Typer vendors since 0.26 without exporting its base): it has an int ``exit_code`` and a
    ``format_message()``. Only documented attributes are read, never Typer's private modules."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _show_usage_error(exc: Exception) -> int:
    if type(exc).__name__ == "NoArgsIsHelpError":  # `tlcli` or `tlcli models` alone: the help
        exc.show()
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    message = exc.format_message().replace("Value error, ", "").rstrip(".")
    Console(stderr=True).print(render.error_line(UsageError(message + where)), highlight=False, soft_wrap=True)
    return exc.exit_code
