"""What a new user meets in the first hour: hints that say what will work, the files behind an
error listed (and in --json), and caches that survive a reboot."""

import json
from pathlib import Path

import pytest

from tests.helpers import make_colour_dataset, run_cli


def test_a_class_of_non_images_lists_its_files_and_gives_json(tmp_path, tiny_backbone):
    data = make_colour_dataset(tmp_path / "images", per_class=4)
    for f in (data / "red").iterdir():
        f.write_text("not an image")
    result = run_cli("train", data, "--backbone", tiny_backbone, "--image-size", 32, "--out", tmp_path / "m",
                     "--json", columns=80)
    assert result.exit_code == 1
    assert "no usable image in this class folder (4 unusable file(s): 4 not an image)" in result.stderr
    assert "Skipped 4 unusable file(s)" in result.stderr and "red_0.jpg" in result.stderr
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == 1 and "no usable image" in answer["error"]
    assert sorted(Path(s["path"]).name for s in answer["skipped"]) == ["red_0.jpg", "red_1.png", "red_2.jpg",
                                                                       "red_3.png"]
    assert {s["reason"] for s in answer["skipped"]} == {"not an image"}


def test_out_on_a_folder_of_other_files_does_not_suggest_force(tmp_path, colour_data, tiny_backbone):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    plain = run_cli("train", colour_data, "--backbone", tiny_backbone, "--image-size", 32, "--out", out)
    assert plain.exit_code == 1 and "pass --force" not in plain.output
    assert "--force will not replace it" in plain.output and "choose another --out" in plain.output
    assert (out / "notes.txt").read_text() == "mine"


def test_models_fetch_names_its_own_argument_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    result = run_cli("models", "fetch", "https://127.0.0.1:9/nothing/here/1")
    assert result.exit_code == 1
    assert "NAME https://127.0.0.1:9/nothing/here/1: could not fetch it" in result.output
    assert "To work offline, train with a local SavedModel directory as --backbone PATH" in result.output


def test_the_tf_hub_cache_defaults_to_a_folder_that_survives_a_reboot(tmp_path, monkeypatch):
    from tlcli import config
    from tlcli.model import hub_cache

    monkeypatch.delenv("TFHUB_CACHE_DIR", raising=False)
    monkeypatch.setenv("TLCLI_CACHE_DIR", str(tmp_path / "cache"))
    assert config.hub_cache_dir() == tmp_path / "cache" / "tfhub" == hub_cache.hub_cache_dir()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "mine"))
    assert hub_cache.hub_cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("stopped", [True, False])
def test_an_interrupted_run_says_what_a_rerun_reuses(tmp_path, stopped):
    from tlcli.training import run_state

    out = tmp_path / "model"
    if stopped:
        (run_state.partial_dir(out)).mkdir(parents=True)
        (run_state.partial_dir(out) / run_state.STATE_FILE).write_text("{}")
    said = run_state.left_behind(out)
    assert said.startswith(f"nothing was written to {out}")
    if stopped:
        assert said.endswith("run the same command with --resume to continue")
    else:
        assert "features extracted so far are in the feature cache" in said and "(without --resume)" in said


def test_audit_model_refuses_the_options_it_takes_from_the_bundle(trained_bundle):
    result = run_cli("audit", "--model", trained_bundle, "--seed", 3, "--image-size", 64, "--json")
    assert result.exit_code == 2  # an option that cannot work: a usage error
    assert json.loads(result.stdout)["error"] == (f"--model {trained_bundle}: takes --image-size, --seed from the "
                                                  "bundle; drop them, or audit without --model")


def test_predict_gives_its_error_as_json_with_json(tmp_path):
    result = run_cli("predict", tmp_path, "--model", tmp_path / "missing", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"].startswith(f"--model {tmp_path / 'missing'}: no such directory")


def test_a_likely_mislabel_is_advice_to_review_never_to_move(tmp_path):
    import io

    from rich.console import Console

    from tlcli.cli import reports
    from tlcli.insight.findings import AuditResult, Mislabel

    r = AuditResult(data_dir=str(tmp_path), val_dir=None, labels=["dress", "shorts"], near_duplicates=[],
                    likely_mislabeled=[Mislabel(str(tmp_path / "dress" / "skirt.jpg"), "dress", "shorts", 0.93)],
                    outliers=[], class_counts={"train": {"dress": 1, "shorts": 1}, "val": {}}, skipped=[],
                    thresholds={})
    buf = io.StringIO()
    console = Console(file=buf, width=120, color_system=None)
    for shown in reports.audit(r):
        console.print(shown)
    text = buf.getvalue()
    assert "review: is it shorts? (keep it if not)" in text and "move" not in text
