"""What the CLI prints: names from outside are escaped, --json is standard JSON written as is,
long paths fold instead of being cut, and numeric options and head fits are finite."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli as run
from tests.helpers import solid_image

ESC_TITLE = "\x1b]0;pwned\x07"   # sets the terminal window's title
ESC_CLEAR = "\x1b[2J"            # clears the screen
RAW = ("\x1b", "\x07", "\x9b", "\u2028", "\u202e")  # none of these may reach the terminal


def assert_no_raw_controls(text: str):
    for c in RAW:
        assert c not in text, f"raw {c!r} printed: {text!r}"


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as JavaScript, Go and Rust parsers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def column(output: str, index: int) -> str:
    """The text of one column of every table row in ``output``, joined (folded cells rejoined)."""
    return "".join(line.split("│")[index].strip() for line in output.splitlines()
                   if line.startswith("│") and line.count("│") > index)


# ---- escaping --------------------------------------------------------------------------------

def test_safe_shows_control_characters_as_escapes():
    from tlcli.cli.render import safe

    text = safe(f"a{ESC_TITLE}b{ESC_CLEAR}\n\t\r\x00\x7f\x9b\u2028\u2029\u202e\u2066\udcff[bold]x[/]é")
    assert text.plain == ("a\\x1b]0;pwned\\x07b\\x1b[2J\\n\\t\\r\\x00\\x7f\\x9b\\u2028\\u2029\\u202e\\u2066"
                          "\\udcff[bold]x[/]é")
    assert not text.spans  # nothing read as markup


def test_predict_table_escapes_file_names(trained_bundle, colour_data, tmp_path):
    good = tmp_path / f"red{ESC_TITLE}{ESC_CLEAR}.jpg"
    shutil.copy(colour_data / "red" / "red_0.jpg", good)
    bad = tmp_path / f"notes\u2028{ESC_CLEAR}.jpg"
    bad.write_text("not an image")
    undecodable = tmp_path / "caf\udcff.jpg"  # the file name's bytes are not UTF-8
    shutil.copy(colour_data / "red" / "red_1.png", undecodable)
    result = run("predict", good, bad, undecodable, "--model", trained_bundle, "--engine", "tf")
    assert result.exit_code == 1
    assert_no_raw_controls(result.output)
    files = column(result.stdout, 1)
    assert "red\\x1b]0;pwned\\x07\\x1b[2J.jpg" in files
    assert "notes\\u2028\\x1b[2J.jpg" in files
    assert "caf\\udcff.jpg" in files


def test_error_line_escapes_control_characters(tmp_path, colour_data):
    model = tmp_path / f"model{ESC_CLEAR}\nsecond line"
    result = run("predict", colour_data / "red" / "red_0.jpg", "--model", model)
    assert result.exit_code == 1
    assert_no_raw_controls(result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: --model ") and "model\\x1b[2J\\nsecond line" in lines[0]


@pytest.fixture
def hostile_eval(tmp_path, colour_data):
    """An evaluation folder (no green: a warning naming the folder) whose folder and file names
    hold escape sequences: a blue image filed as red (a mistake) and a text file (skipped)."""
    root = tmp_path / f"eval{ESC_TITLE}"
    for label in ("red", "blue"):
        shutil.copytree(colour_data / label, root / label)
    solid_image((20, 40, 220)).save(root / "red" / f"blue{ESC_CLEAR}\x9b.png")
    (root / "red" / f"text{ESC_TITLE}.jpg").write_text("not an image")
    return root


def test_evaluate_escapes_names_in_every_table_warning_and_line(trained_bundle, hostile_eval, tmp_path):
    report = tmp_path / f"report{ESC_CLEAR}"
    result = run("evaluate", hostile_eval, "--model", trained_bundle, "--report", report)
    assert result.exit_code == 1  # a file was skipped
    assert_no_raw_controls(result.stdout)
    assert_no_raw_controls(result.stderr)
    flat = "".join(result.output.split())
    assert "eval\\x1b]0;pwned\\x07" in flat                          # summary and warning
    assert "\\x1b]0;pwned\\x07" in column(result.stderr, 1)           # the warning and skipped table
    assert "text\\x1b]0;pwned\\x07.jpg" in column(result.stderr, 1)  # skipped table
    assert "blue\\x1b[2J\\x9b.png" in column(result.stdout, 1)        # mistakes table
    assert f"wrote {report}".replace(ESC_CLEAR, "\\x1b[2J").replace(" ", "") in flat


# ---- --json ----------------------------------------------------------------------------------

def test_json_is_written_without_colour_codes_even_when_colour_is_forced(trained_bundle, colour_data):
    from typer.testing import CliRunner

    from tlcli.cli.commands import app

    result = CliRunner().invoke(app, ["evaluate", str(colour_data), "--model", str(trained_bundle), "--json"],
                                env={"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert strict_loads(result.stdout)["report"]["count"] == 24


def test_json_output_maps_non_finite_numbers_to_null(monkeypatch, tmp_path):
    import tlcli.insight

    class Result:
        skipped = ()

        def to_dict(self):
            return {"report": {"loss": math.nan, "accuracy": 1.0, "per_class": [{"f1": math.inf}]},
                    "label": "a\x1b[2J"}

    monkeypatch.setattr(tlcli.insight, "evaluate", lambda *a, **k: Result())
    result = run("evaluate", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout and "\x1b" not in result.stdout
    assert strict_loads(result.stdout) == {"report": {"loss": None, "accuracy": 1.0, "per_class": [{"f1": None}]},
                                           "label": "a\x1b[2J"}


def test_bundle_json_files_are_standard_json(tmp_path):
    from tlcli import files

    path = tmp_path / "x.json"
    files.write_json(path, {"a": math.nan, "b": [math.inf, -math.inf, 0.5], "c": {"d": (1, math.nan)}})
    assert strict_loads(path.read_text()) == {"a": None, "b": [None, None, 0.5], "c": {"d": [1, None]}}


# ---- long paths fold -------------------------------------------------------------------------

def test_long_paths_fold_at_80_columns_in_predict(trained_bundle, colour_data, tmp_path, monkeypatch):
    from tlcli.deploy import inference

    deep = tmp_path / "a_rather_long_folder_name_to_force_folding" / "and_another_long_folder_name_here"
    deep.mkdir(parents=True)
    good = deep / "red_image_with_a_long_file_name_0.jpg"
    shutil.copy(colour_data / "red" / "red_0.jpg", good)
    bad = deep / "a_text_file_with_a_long_name_that_is_no_image.jpg"
    bad.write_text("not an image")
    why = "unreadable (" + "this explanation goes on and on " * 8 + ")"
    real = inference.iter_predict

    def long_errors(*args, **kwargs):  # a long error message beside a long path
        for p, row in real(*args, **kwargs):
            if p.error:
                p.error = f"{p.path}: {why}"
            yield p, row

    monkeypatch.setattr(inference, "iter_predict", long_errors)
    result = run("predict", good, bad, "--model", trained_bundle, "--engine", "tf", columns=80)
    assert result.exit_code == 1
    assert "…" not in result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert column(result.stdout, 1) == str(good) + str(bad)  # every character, in order
    cells = "".join(column(result.stdout, 2).split())
    assert cells.startswith("red") and cells.endswith("".join(why.split()))


def test_long_paths_fold_at_80_columns_in_evaluate(trained_bundle, hostile_eval, tmp_path):
    deep = tmp_path / "a_rather_long_folder_name_to_force_folding" / "and_another_long_folder_name_here"
    shutil.copytree(hostile_eval, deep / "eval")
    report = deep / "report"
    result = run("evaluate", deep / "eval", "--model", trained_bundle, "--report", report, columns=80)
    assert result.exit_code == 1
    assert "…" not in result.output
    values = "".join(column(result.stdout, 2).split())
    assert f"in{deep / 'eval'}" in values  # the summary's "images" row
    mistakes = column(result.stdout, 1)  # paths relative to DIR: the long folder names do not repeat
    assert str(Path("red") / "blue\\x1b[2J\\x9b.png") in mistakes and str(deep) not in mistakes
    assert str(deep / "eval" / "red" / "text\\x1b]0;pwned\\x07.jpg") in column(result.stderr, 1)  # skipped
    assert f"wrote{report / 'mistakes.csv'}" in "".join(result.stdout.split())


# ---- finite numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--learning-rate", "inf"), ("--learning-rate", "nan"), ("--l2", "inf"), ("--l2", "nan"),
    ("--val-split", "nan"), ("--fine-tune-learning-rate", "inf"), ("--seed", "-1"), ("--seed", "99999999999"),
])
def test_bad_numeric_options_are_one_line_usage_errors(option, value, tmp_path, tiny_backbone, colour_data):
    out = tmp_path / "m"
    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out,
                 "--tensorboard", "none", option, value)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option} {value}: must be"), result.output
    assert not out.exists()


@pytest.mark.parametrize("field", ["holdout", "dropout", "label_smoothing", "val_split"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_library_refuses_non_finite_fractions(field, value, tmp_path, train_args, colour_data):
    import tlcli
    from tlcli.errors import UsageError

    with pytest.raises(UsageError, match=field.replace("_", "[-_]")):
        tlcli.train(colour_data, out=str(tmp_path / "m"), **dict(train_args, **{field: value}))


def test_largest_seed_is_accepted_by_validation():
    from tlcli.config import TrainConfig, validate

    validate(TrainConfig(seed=2**32 - 1))  # what numpy's and TensorFlow's seeding accept


def test_head_fit_that_diverges_raises_naming_the_learning_rate():
    from tlcli.errors import TlcliError
    from tlcli.model import head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    y = (X[:, 0] > 0).astype(int)
    for lr in (math.inf, 1e300):
        with pytest.raises(TlcliError, match="--learning-rate"):
            head.fit_head(X, y, 2, learning_rate=lr)
    X[3, 2] = math.nan
    with pytest.raises(TlcliError, match="features"):
        head.fit_head(X, y, 2)


def test_training_with_a_diverging_learning_rate_fails_in_one_line(tmp_path, tiny_backbone, colour_data):
    out = tmp_path / "m"
    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out,
                 "--epochs", 20, "--batch-size", 8, "--tensorboard", "none", "--learning-rate", "1e300")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --learning-rate 1e+300: the head's fit diverged")
    assert not out.exists()
