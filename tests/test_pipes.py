"""A closed stdout (`tlcli ... | head`) ends a command quietly: no traceback, no second error."""

import os
import subprocess
import sys

import pytest

CLI = "import sys; from tlcli.cli import run; sys.argv[0] = 'tlcli'; run()"


def run_into_closed_pipe(*args) -> tuple[int, str]:
    """Run the CLI with a stdout whose reader has already gone; (exit code, stderr)."""
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write: every write meets a closed pipe
    err = p.stderr.read().decode()
    return p.wait(timeout=120), err


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["models", "list"]])
def test_help_into_a_closed_pipe_exits_quietly(args):
    code, err = run_into_closed_pipe(*args)
    assert code == 1 and err == ""


def test_predict_json_into_a_closed_pipe_exits_quietly(trained_bundle, colour_data):
    code, err = run_into_closed_pipe("predict", colour_data, "--model", trained_bundle, "--json", "--engine", "tf")
    assert code == 1
    assert "Traceback" not in err and "Error" not in err, err


def test_evaluate_into_a_closed_pipe_exits_quietly(trained_bundle, colour_data):
    code, err = run_into_closed_pipe("evaluate", colour_data, "--model", trained_bundle, "--engine", "tf")
    assert code == 1
    assert "Traceback" not in err and "Error" not in err, err
