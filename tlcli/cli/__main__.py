"""``python -m tlcli.cli``: the same as the ``tlcli`` command."""

from tlcli.cli.commands import run

run()
