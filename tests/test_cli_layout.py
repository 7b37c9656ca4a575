"""The CLI's shape: enum choices, one-sided flags, DIR metavars, help panels, flags the errors and
the README name, progress lines in a log, and ``tlcli models``."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers import run_cli as run
from tlcli.errors import DatasetError, UsageError
from tlcli.model.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_HANDLE = "https://tfhub.dev/google/no-such-model/feature_vector/1"


def help_text(*command: str) -> str:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.output


def panels(text: str) -> dict[str, list[str]]:
    """The flags of a help screen, by section title ("Data:")."""
    found, panel = {}, None
    for line in text.splitlines():
        title = re.match(r"([A-Z][\w -]*):$", line)
        if title:
            panel = title.group(1)
            found.setdefault(panel, [])
        elif panel:
            found[panel] += re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", line)
    return found


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ---- enum choices ----------------------------------------------------------------------------

@pytest.mark.parametrize("command, option, choices", [
    (["train"], "--strategy", "auto|default|mirrored|tpu"),
    (["predict"], "--engine", "auto|tf|tflite"),
    (["evaluate"], "--engine", "auto|tf|tflite"),
    (["export"], "--quantize", "none|float16|dynamic|int8"),
    (["export"], "--io-type", "float32|int8|uint8"),
])
def test_help_lists_the_choices_of_each_enum_option(command, option, choices):
    line = next(line for line in help_text(*command).splitlines() if f" {option} " in line)
    assert choices in line


@pytest.mark.parametrize("args", [
    ["train", "{data}", "--strategy", "mirorred", "--out", "{out}"],
    ["predict", "{data}", "--engine", "tlite", "--model", "{out}"],
    ["evaluate", "{data}", "--engine", "tensorflow", "--model", "{out}"],
    ["export", "--tflite", "--quantize", "int4", "--model", "{out}"],
    ["export", "--tflite", "--quantize", "int8", "--io-type", "float64", "--model", "{out}"],
])
def test_a_typo_in_a_choice_is_refused_before_any_work(args, tmp_path, colour_data, monkeypatch):
    import tlcli.training

    def must_not_run(*a, **k):
        raise AssertionError("the library was called")

    monkeypatch.setattr(tlcli.training, "train", must_not_run)
    out = tmp_path / "m"
    result = run(*[a.format(data=colour_data, out=out) for a in args])
    assert result.exit_code == 2, result.output
    option = next(a for a in reversed(args) if a.startswith("--") and a not in ("--out", "--model"))
    assert f"Invalid value for '{option}'" in result.output and "is not one of" in result.output
    assert one_line(result).startswith("error: "), "one line, like every other tlcli error"
    assert "Traceback" not in result.output
    assert not out.exists()


def test_the_library_checks_choices_with_the_same_enums():
    from tlcli.config import Engine, Strategy, TrainConfig, validate
    from tlcli.deploy.inference import check_engine

    with pytest.raises(UsageError, match="--strategy mirorred") as strategy:
        validate(TrainConfig(strategy="mirorred"))
    with pytest.raises(UsageError, match="--engine tlite") as engine:
        check_engine("tlite")
    assert all(s.value in str(strategy.value) for s in Strategy)
    assert all(e.value in str(engine.value) for e in Engine)
    validate(TrainConfig(strategy=Strategy.MIRRORED))  # an enum member is its value
    check_engine(Engine.TFLITE)


# ---- flags and metavars ----------------------------------------------------------------------

@pytest.mark.parametrize("command, flag", [("train", "--force"), ("train", "--strict"), ("train", "--resume"),
                                           ("train", "--fine-tune")])
def test_flags_that_default_to_off_have_no_negative_form(command, flag, tmp_path):
    text = help_text(command)
    assert flag in text and f"--no-{flag[2:]}" not in text
    result = run(command, tmp_path, f"--no-{flag[2:]}")
    assert result.exit_code == 2 and "No such option" in result.output, result.output


def test_folder_arguments_and_options_are_shown_as_dir():
    assert re.search(r"Usage: .*train \[OPTIONS\] \[DIR\]", help_text("train"))
    assert re.search(r"Usage: .*evaluate \[OPTIONS\] \{DIR\}", help_text("evaluate"))  # {} = required
    assert re.search(r"Usage: .*predict \[OPTIONS\] \{PATH\}\.\.\.", help_text("predict"))
    for command, options in {"train": ["--out", "--val-dir", "--cache-dir"], "predict": ["--model"],
                             "export": ["--model", "--data"], "evaluate": ["--model", "--report"]}.items():
        text = help_text(command)
        for option in options:
            assert re.search(rf"{option}\s+DIR\s", text), (command, option)


def test_train_help_is_grouped_into_panels():
    found = panels(help_text("train"))
    assert [p for p in found if p not in ("Arguments", "Options")] == [
        "Data", "Model", "Head", "Fine-tuning", "Hardware", "Output"]
    expected = {"Data": ["--val-split", "--val-dir", "--strict"], "Model": ["--backbone", "--image-size", "--mirror"],
                "Head": ["--epochs", "--l2", "--label-smoothing", "--patience"],
                "Fine-tuning": ["--fine-tune", "--holdout", "--dropout", "--fine-tune-patience"],
                "Hardware": ["--batch-size", "--strategy"], "Output": ["--out", "--force", "--resume", "--json"]}
    for panel, flags in expected.items():
        assert set(flags) <= set(found[panel]), (panel, found[panel])


def test_every_flag_an_option_check_names_is_a_train_flag():
    from tlcli import config

    named = set(re.findall(r'"(--[a-z0-9-]+)"', inspect.getsource(config.validate)))
    assert {"--dropout", "--label-smoothing", "--holdout", "--patience", "--fine-tune-patience"} <= named
    flags = {f for flags in panels(help_text("train")).values() for f in flags}
    assert named - flags == set()


@pytest.mark.parametrize("option, value", [("--holdout", "1.5"), ("--dropout", "nan"), ("--label-smoothing", "1.5"),
                                           ("--patience", "0"), ("--fine-tune-patience", "0")])
def test_the_new_train_options_are_checked_in_one_line(option, value, tmp_path, colour_data):
    result = run("train", colour_data, "--out", tmp_path / "m", option, value)
    assert result.exit_code == 2
    assert one_line(result).startswith(f"error: {option} {value}: must be")


def test_the_new_train_options_reach_the_config(tmp_path, colour_data, monkeypatch):
    import tlcli.training

    seen = {}

    def fake_train(*, config, progress, given=None):
        seen["config"] = config
        raise DatasetError("stop here")

    monkeypatch.setattr(tlcli.training, "train", fake_train)
    result = run("train", colour_data, "--out", tmp_path / "m", "--patience", 7, "--label-smoothing", 0.0,
                 "--holdout", 0.3, "--dropout", 0.5, "--fine-tune-patience", 4, "--strategy", "mirrored")
    assert result.exit_code == 1 and one_line(result) == "error: stop here"
    cfg = seen["config"]
    assert (cfg.patience, cfg.label_smoothing, cfg.holdout, cfg.dropout, cfg.fine_tune_patience) == (
        7, 0.0, 0.3, 0.5, 4)
    assert cfg.strategy == "mirrored" and type(cfg.strategy) is str  # plain strings in tlcli.json


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, flags) of each ``tlcli <command> ...`` line in the README's code blocks, with
    the continuation lines of a usage block."""
    found, fenced, last = [], False, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        code = fenced or line.startswith("    ")
        m = re.match(r"\s*tlcli ([a-z]+)(?: ([a-z]+))?(.*)", line) if code else None
        if m:
            command = [m.group(1)] + ([m.group(2)] if m.group(1) == "models" and m.group(2) else [])
            last = (command, re.findall(r"--[a-z0-9][a-z0-9-]*", line))
            found.append(last)
        elif code and last and line.strip().startswith("["):
            last[1].extend(re.findall(r"--[a-z0-9][a-z0-9-]*", line))
        else:
            last = None
    return found


def test_every_flag_the_readme_shows_exists_in_that_commands_help():
    commands = readme_commands()
    assert {c[0] for c, _ in commands} >= {"train", "predict", "export", "evaluate"}
    assert any("--val-dir" in flags for _, flags in commands)  # the continuation line was read
    for command, flags in commands:
        shown = {f for panel in panels(help_text(*command)).values() for f in panel}
        assert set(flags) <= shown, (command, set(flags) - shown)


def test_make_test_reports_the_slowest_tests():
    test_target = (ROOT / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    assert "pytest" in test_target and "--durations=15" in test_target


# ---- progress in a log -----------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_shows_counts_and_elapsed_time_at_a_bounded_rate():
    from tlcli.cli.render import LogProgress
    from tlcli.progress import Advance, End, Epoch, Start

    buf, clock = io.StringIO(), Clock()
    progress = LogProgress(Console(file=buf, width=120), interval=10.0, clock=clock)
    progress(Start("extract", total=245))
    for done in range(1, 246):
        clock.now = done * 0.5  # 2 images a second: 122 s in all
        progress(Advance("extract", completed=done, total=245))
    progress(End("extract", completed=245, total=245))
    progress(Start("fine-tune", total=3))
    for epoch in (1, 2, 3):
        clock.now += 61
        progress(Epoch("fine-tune", completed=epoch, total=3, logs={"loss": 0.5 / epoch, "val_accuracy": 0.9}))
    progress(End("fine-tune", completed=3, total=3))
    lines = buf.getvalue().splitlines()
    assert lines[:2] == ["extract 20/245 0:00:10 2.0/s", "extract 40/245 0:00:20 2.0/s"]  # count, total, rate
    assert len([line for line in lines if line.startswith("extract")]) == 13  # 12 timed lines and the end
    assert "extract 245/245 0:02:02 2.0/s" in lines
    assert lines[-4:] == ["fine-tune 1/3 0:01:01 61s each  loss 0.500  holdout 90.0%",
                          "fine-tune 2/3 0:02:02 61s each  loss 0.250  holdout 90.0%",
                          "fine-tune 3/3 0:03:03 61s each  loss 0.167  holdout 90.0%",
                          "fine-tune 3/3 0:03:03 61s each  loss 0.167  holdout 90.0%"]


def test_progress_is_bars_on_a_terminal_and_lines_in_a_log():
    from tlcli.cli.render import BarProgress, LogProgress, progress_display

    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True)), BarProgress)
    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=False)), LogProgress)


def test_train_progress_on_a_non_terminal_stderr_has_counts(tmp_path, colour_data, monkeypatch):
    import tlcli.training
    from tlcli.progress import End, Info, Start, counter

    def fake_train(*, config, progress, given=None):
        report = counter(progress, "scan")
        for i in range(1, 4):
            report(i, 3)
        progress(Info("features: 3 extracted"))
        progress(Start("save", total=1))
        progress(End("save", completed=1, total=1))
        raise DatasetError("stop here")

    monkeypatch.setattr(tlcli.training, "train", fake_train)
    result = run("train", colour_data, "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["scan 3/3 0:00:00", "features: 3 extracted", "save 1/1 0:00:00",
                                          "error: stop here"]


def test_quiet_progress_prints_no_task_lines_but_keeps_warnings():
    from tlcli.cli.render import LogProgress
    from tlcli.progress import End, Start, Warn

    buf = io.StringIO()
    progress = LogProgress(Console(file=buf, width=120), quiet=True)
    progress(Start("parity", total=2))
    progress(End("parity", completed=2, total=2))
    progress(Warn("careful"))
    assert buf.getvalue().splitlines() == ["warning: careful"]


# ---- tlcli models ----------------------------------------------------------------------------

def fake_cached(cache: Path, handle: str, sizes=(3000, 2000)) -> Path:
    folder = cache / hashlib.sha1(handle.encode()).hexdigest()
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"x" * sizes[0])
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(b"y" * sizes[1])
    return folder


def row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if f" {name} " in line)


def test_models_list_with_an_empty_cache_shows_every_preset_uncached(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    for p in PRESETS.values():
        line = row(result.output, p.name)
        assert f" {p.image_size} " in line and f" {p.features} " in line and " no " in line
    assert str(tmp_path / "hub") in result.output


def test_models_list_shows_a_cached_model_with_its_size(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    preset = PRESETS["mobilenet_v3_small_100_224"]
    folder = fake_cached(tmp_path, preset.handle)
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    assert "5.0 kB" in row(result.output, preset.name)
    assert " no " in row(result.output, "mobilenet_v2_100_224")

    result = run("models", "list", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert listing["cache_dir"] == str(tmp_path)
    assert [m["name"] for m in listing["models"]] == list(PRESETS)
    entry = next(m for m in listing["models"] if m["name"] == preset.name)
    assert entry == {"name": preset.name, "handle": preset.handle, "image_size": preset.image_size,
                     "features": preset.features, "cached": True, "path": str(folder), "size_bytes": 5000,
                     "licence": preset.licence, "cpu_ms": preset.cpu_ms}
    other = next(m for m in listing["models"] if m["name"] == "resnet_v2_50")
    assert other["cached"] is False and other["size_bytes"] is None


def test_models_list_does_not_import_tensorflow(tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom tlcli.cli import app\n"
            "r = CliRunner().invoke(app, ['models', 'list', '--json'])\nassert r.exit_code == 0, r.output\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"TFHUB_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_models_fetch_of_a_cached_preset_reports_it_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    preset = PRESETS["mobilenet_v1_025_224"]
    folder = fake_cached(tmp_path, preset.handle)
    result = run("models", "fetch", preset.name)
    assert result.exit_code == 0, result.output
    assert "already cached" in result.output and str(folder) in result.output
    result = run("models", "fetch", preset.handle, "--json")
    assert result.exit_code == 0, result.output
    fetched = json.loads(result.stdout)
    assert (fetched["name"], fetched["downloaded"], fetched["path"], fetched["size_bytes"]) == (
        preset.name, False, str(folder), 5000)


def test_models_fetch_offline_gives_the_one_line_error_of_train(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # offline even with a network
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    result = run("models", "fetch", OFFLINE_HANDLE)
    assert result.exit_code == 1
    line = one_line(result)
    assert line.startswith("error: ") and OFFLINE_HANDLE in line
    assert "could not fetch" in line and "TFHUB_CACHE_DIR" in line and "local SavedModel" in line
    assert not list((tmp_path / "hub").glob("*/saved_model.pb"))


def test_models_fetch_of_an_unknown_name_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    result = run("models", "fetch", "mobilenet_v9")
    assert result.exit_code == 2
    line = one_line(result)
    assert "mobilenet_v9" in line and "mobilenet_v2_100_224" in line and "tlcli models list" in line


def test_only_the_cli_and_render_modules_import_rich():
    import ast

    importers = set()
    for path in sorted((ROOT / "tlcli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "rich" or n.startswith("rich.") for n in names):
                importers.add(path.relative_to(ROOT / "tlcli").as_posix())
    assert importers == {"cli/common.py", "cli/render.py", "cli/reports.py", "cli/shell.py"}


def test_every_progress_event_names_its_kind():
    from tlcli.progress import Advance, Counts, End, Epoch, Info, Skipped, Start, Warn

    events = [Start("scan", total=3), Advance("scan", 2, 3), End("scan", 3, 3), Epoch("head", 1, 9, {"loss": 1.0}),
              Info("i"), Warn("w"), Counts({"a": 1}, {}), Skipped([{"path": "p"}])]
    assert [e.kind for e in events] == ["start", "advance", "end", "epoch", "info", "warning", "counts", "skipped"]


def test_progress_bars_render_on_a_terminal():
    from tlcli.cli.render import progress_display
    from tlcli.progress import Advance, End, Epoch, Start

    buf = io.StringIO()
    with progress_display(Console(file=buf, force_terminal=True, width=120)) as progress:
        progress(Start("extract", total=4))
        progress(Advance("extract", completed=2, total=4))
        progress(End("extract", completed=4, total=4))
        progress(Start("head", total=None))
        progress(Epoch("head", completed=5, total=5, logs={"loss": 0.25}))
        progress(End("head", completed=5, total=5))
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "extract" in shown and "4/4" in shown and "loss 0.250" in shown
