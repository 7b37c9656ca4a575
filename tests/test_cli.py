"""The command line end to end, through typer's CliRunner, on a tiny backbone and colour images."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_colour_dataset
from tests.helpers import run_cli as run
from tlcli.cli.commands import app


def test_every_command_has_help_text():
    for command in app.registered_commands:
        assert command.callback.__doc__, f"{command.callback.__name__} has no help text"
        result = run(command.name or command.callback.__name__, "--help")
        assert result.exit_code == 0
        assert command.callback.__doc__.split(".")[0][:30] in " ".join(result.output.split())


def test_help_and_version_do_not_import_tensorflow():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom tlcli.cli import app\n"
            "r = CliRunner()\n"
            "for args in (['--help'], ['--version'], ['train', '--help'], ['predict', '--help'], "
            "['export', '--help'], ['evaluate', '--help']):\n"
            "    res = r.invoke(app, args)\n    assert res.exit_code == 0, (args, res.output)\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_version_prints_package_version():
    import tlcli

    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"tlcli {tlcli.__version__}"


def test_train_predict_export_tflite_end_to_end(tmp_path, tiny_backbone, colour_data):
    out = tmp_path / "model"
    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out,
                 "--epochs", 60, "--batch-size", 8, "--learning-rate", 0.05)
    assert result.exit_code == 0, result.output
    assert "Training summary" in result.output and "val accuracy" in result.output
    assert (out / "saved_model.pb").exists()

    result = run("predict", colour_data / "red" / "red_0.jpg", colour_data / "blue" / "blue_1.png",
                 "--model", out, "--json", "--engine", "tf")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["predictions"][0]["label"] for r in rows] == ["red", "blue"]
    assert all(r["error"] is None and len(r["predictions"]) == 3 for r in rows)
    probs = [p["probability"] for p in rows[0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4

    result = run("export", "--tflite", "--model", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.tflite").exists()
    assert "top-1 agreement" in result.output and "100.0%" in result.output

    result = run("predict", colour_data / "green", "--model", out, "--engine", "tflite", "--json", "--top-k", 1)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 8
    assert {r["predictions"][0]["label"] for r in rows} == {"green"}


def test_existing_bundle_is_not_replaced_without_force(tmp_path, tiny_backbone, colour_data, trained_bundle):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(trained_bundle, out)
    before = (out / "tlcli.json").read_text()
    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out)
    assert result.exit_code == 1
    assert "--force" in result.output and str(out) in result.output
    assert "Traceback" not in result.output
    assert (out / "tlcli.json").read_text() == before

    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out,
                 "--force", "--epochs", 3, "--seed", 7)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["config"]["seed"] == 7
    assert not list(tmp_path.glob(".model.*")), "staging directories left behind"


def test_offline_handle_gives_one_line_error(tmp_path, colour_data, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty-cache"))
    # Offline even where a network exists: the real download code meets a closed proxy port.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    handle = "https://tfhub.dev/google/imagenet/mobilenet_v3_small_100_224/feature_vector/5"
    result = run("train", colour_data, "--backbone", handle, "--out", tmp_path / "m")
    assert result.exit_code == 1
    # The scan runs while TensorFlow loads, so its table may come first: the error is the one last line.
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert "Traceback" not in result.output
    assert handle in lines[-1] and "TFHUB_CACHE_DIR" in lines[-1] and "local SavedModel" in lines[-1]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["spatial", "not-images", "dict"])
def test_backbone_that_is_not_a_feature_vector_is_refused(tmp_path, colour_data, kind):
    from tests.helpers import make_tiny_backbone

    bad = make_tiny_backbone(tmp_path / kind, output_rank=4 if kind == "spatial" else 2,
                             input_rank=2 if kind == "not-images" else 4, dict_output=kind == "dict")
    result = run("train", colour_data, "--backbone", bad, "--image-size", 32, "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    expected = "not images" if kind == "not-images" else "not a feature vector"
    assert expected in result.output and str(bad) in result.output


def test_unknown_backbone_name_lists_presets(tmp_path, colour_data):
    result = run("train", colour_data, "--backbone", "mobilenet_v9", "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert "--backbone mobilenet_v9" in result.output and "mobilenet_v2_100_224" in result.output


def test_predict_with_missing_model_is_one_line(tmp_path, colour_data):
    result = run("predict", colour_data / "red" / "red_0.jpg", "--model", tmp_path / "nope")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "--model" in result.output and "nope" in result.output


def test_paths_with_brackets_are_printed_literally(tmp_path, tiny_backbone, colour_data):
    out = tmp_path / "runs [old]" / "model"
    out.parent.mkdir()
    result = run("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out,
                 "--epochs", 20, "--tensorboard", "none")
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    result = run("export", "--tflite", "--model", out)
    assert result.exit_code == 0, result.output
    assert str(out / "model.tflite") in result.output


def test_a_missing_dir_is_reported_before_the_backbone_is_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty-cache"))  # the default handle is not cached
    result = run("train", tmp_path / "nope", "--out", tmp_path / "m")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: DIR {tmp_path / 'nope'}: no such directory; give the folder that holds one subfolder of "
        "images per class"]


def test_train_summary_says_when_fine_tuning_was_undone(tmp_path, tiny_backbone):
    data = make_colour_dataset(tmp_path / "images", per_class=6)
    result = run("train", data, "--backbone", tiny_backbone, "--image-size", 32, "--out", tmp_path / "m",
                 "--epochs", 60, "--batch-size", 8, "--tensorboard", "none", "--fine-tune",
                 "--fine-tune-epochs", 1, "--fine-tune-learning-rate", 50.0)  # a step that wrecks the model
    assert result.exit_code == 0, result.output
    assert "fine-tune 1 (undone: the holdout loss never improved" in " ".join(result.output.split())


def test_a_successful_run_leaves_no_autograph_modules_in_tmpdir(tmp_path, tiny_backbone, colour_data):
    """TensorFlow's autograph writes a module into TMPDIR per converted function and removes them
    at exit, in an atexit hook that the CLI's fast exit (os._exit) skipped: dozens were left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = "import sys; from tlcli.cli import run; sys.argv[0] = 'tlcli'; run()"
    env = dict(os.environ, TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code, "train", str(colour_data), "--backbone", str(tiny_backbone),
                           "--image-size", "32", "--epochs", "40", "--batch-size", "4", "--fine-tune",
                           "--fine-tune-epochs", "1", "--tensorboard", "none", "--out", str(tmp_path / "model")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp.iterdir()) == []
