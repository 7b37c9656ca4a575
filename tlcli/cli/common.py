"""What every command shares: the Typer app, the consoles, failing with one line, Ctrl-C, the
progress display and the options several commands take. The commands live in ``train_command``,
``use_commands`` and ``data_commands``; ``commands`` gathers them.

Exit codes: 0 success; 1 a user error (one line on stderr) or, for predict/evaluate, at least one
input file that could not be used; 2 a bad option; 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tlcli import __version__
from tlcli.cli import render, shell
from tlcli.errors import TlcliError

app = typer.Typer(help="Transfer learning from TF Hub image feature vectors: train a classifier on a folder of "
                       "photos, predict, evaluate, audit the data, export for phones, serve it, and share it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  cls=shell.OneLineUsageErrors)
models_app = typer.Typer(help="Backbone presets and the TF Hub cache, for offline machines.",
                         no_args_is_help=True, add_completion=False, cls=shell.Group)
app.add_typer(models_app, name="models")
out = Console()
err = Console(stderr=True)

def fail(exc: TlcliError, *, json_out: bool = False):
    """End the command on a library error: the files behind it (if it names some) and its one
    line on stderr; with ``json_out`` also ``{"error", "skipped"}`` on stdout, for a script."""
    skipped = getattr(exc, "skipped", None) or []
    if skipped:
        err.print(render.skipped_table(skipped))
    err.print(render.error_line(exc), highlight=False, soft_wrap=True)
    if json_out:
        render.print_json({"error": str(exc), "exit_code": exc.exit_code, "skipped": skipped})
    raise typer.Exit(exc.exit_code)


def interruptible(command):
    """Ctrl-C anywhere in a command (even inside the TensorFlow import) ends it with one line and
    exit code 130; the library has already left every bundle intact."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"tlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None):
    """tlcli: train an image classifier on a folder of photos, predict, and export for serving or phones."""
    global out, err
    # Made when a command runs, not at import, so COLUMNS, NO_COLOR and FORCE_COLOR are read then.
    out, err = Console(), Console(stderr=True)


def with_progress(fn, *args, quiet: bool = False, json_out: bool = False, **kwargs):
    """Call a library function with a progress display on stderr (bars on a terminal, timed
    lines in a log); a TlcliError becomes one line and its exit code (see ``fail``)."""
    try:
        with render.progress_display(err, quiet=quiet) as progress:
            return fn(*args, progress=progress, **kwargs)
    except TlcliError as exc:
        fail(exc, json_out=json_out)


def given(ctx: typer.Context, renamed: dict[str, str]) -> set[str]:
    """The parameters set on the command line (not left at their defaults), by library name."""
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") for name in ctx.params}
    return {renamed.get(name, name) for name, source in sources.items() if source not in ("DEFAULT", "DEFAULT_MAP")}


def opt(panel: str, help: str, *names: str, **kwargs):
    """An option shown in the help panel ``panel`` of its command's help."""
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def path_str(p: Path | None) -> str | None:
    return str(p) if p else None


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ModelDir = Annotated[Path, typer.Option(metavar="DIR", help="Model bundle directory.")]
ThresholdOption = Annotated[Optional[float], typer.Option(
    min=0.0, max=1.0, show_default=False,
    help="Multi-label models: one threshold for every label; default: each label's own, chosen by "
         "cross-validation when training.")]
