"""Issue #26 items 1-2: a Keras 3 SavedModel export as --backbone, and the backbone chosen among
candidates by the head's cross-validation on the training photos."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tlcli
from tests.helpers import make_keras3_backbone, make_tiny_backbone, run_cli
from tlcli.errors import BackboneError, UsageError
from tlcli.model import selection

FAST = dict(image_size=32, epochs=60, batch_size=8, tensorboard=None)


@pytest.fixture(scope="session")
def keras3_backbones(tmp_path_factory):
    """Keras 3 exports: "means" (separates the colours), "sum" (blue and red alike), "red" and
    "blue" (one channel each: each confuses two colours, both together separate all three) and
    "two" (two outputs)."""
    root = tmp_path_factory.mktemp("keras3")
    kernels = {"means": ((1, 0, 0), (0, 1, 0), (0, 0, 1)), "sum": ((1,), (1,), (1,)),
               "red": ((1,), (0,), (0,)), "blue": ((0,), (0,), (1,))}
    made = {name: make_keras3_backbone(root / name, kernel) for name, kernel in kernels.items()}
    made["two"] = make_keras3_backbone(root / "two", two_outputs=True)
    return made


def test_explicit_signature_and_output_are_used_and_bad_ones_are_one_line(tmp_path, keras3_backbones):
    from tlcli.model import backbone

    two = str(keras3_backbones["two"])
    with pytest.raises(BackboneError, match="--backbone-output"):  # two outputs: it cannot tell
        backbone.load(backbone.resolve_spec(two, 32))
    loaded = backbone.load(backbone.resolve_spec(two, 32, signature="serve", output_key="output_1"))
    assert (loaded.signature, loaded.output_key, loaded.feature_dim) == ("serve", "output_1", 3)
    for flags, option in [(dict(signature="nope"), "--backbone-signature nope"),
                          (dict(output_key="nope"), "--backbone-output nope")]:
        with pytest.raises(BackboneError) as err:
            backbone.load(backbone.resolve_spec(two, 32, **flags))
        assert str(err.value).startswith(option) and "\n" not in str(err.value)
        assert "serving_default" in str(err.value) or "output_0, output_1" in str(err.value)
    # A hub model's __call__ with a dict of outputs: --backbone-output picks one, and names them.
    hub_dict = str(make_tiny_backbone(tmp_path / "dict", dict_output=True))
    with pytest.raises(BackboneError, match="or its output with --backbone-output$"):
        backbone.load(backbone.resolve_spec(hub_dict, 32))
    assert backbone.load(backbone.resolve_spec(hub_dict, 32, output_key="pooled")).feature_dim == 11
    with pytest.raises(BackboneError, match="^--backbone-output nope: .* has no such output .it has default, pooled"):
        backbone.load(backbone.resolve_spec(hub_dict, 32, output_key="nope"))
    # The features' cache key follows the signature and output.
    keys = {backbone.cache_key(backbone.resolve_spec(two, 32, **f), 32)
            for f in [{}, dict(signature="serve"), dict(output_key="output_1")]}
    assert len(keys) == 3


def test_cli_bad_signature_flag_and_fine_tune_are_refused_in_one_line(tmp_path, keras3_backbones, colour_data):
    common = [colour_data, "--image-size", 32, "--tensorboard", "none"]
    r = run_cli("train", *common, "--backbone", keras3_backbones["means"], "--backbone-signature", "nope",
                "--out", tmp_path / "a")
    assert r.exit_code != 0 and "--backbone-signature nope" in r.output and "Traceback" not in r.output
    r = run_cli("train", *common, "--backbone", keras3_backbones["means"], "--fine-tune", "--out", tmp_path / "b")
    error = r.output.strip().splitlines()[-1]  # after the file check's progress and counts
    assert r.exit_code != 0 and error.startswith("error: --fine-tune") and error.endswith("train without --fine-tune")
    assert "Traceback" not in r.output and not (tmp_path / "b").exists()


def test_signature_flags_with_candidates_are_refused():
    with pytest.raises(UsageError, match="not with candidates"):
        tlcli.train("unused", backbone="a,b", backbone_signature="serving_default")


def test_the_choice_keeps_the_keras3_export_that_separates_the_classes_and_says_why(tmp_path, keras3_backbones,
                                                                                colour_data):
    candidates = f"{keras3_backbones['sum']},{keras3_backbones['means']}"
    r = run_cli("train", colour_data, "--backbone", candidates, "--out", tmp_path / "m", "--image-size", 32,
                "--epochs", 60, "--batch-size", 8, "--tensorboard", "none", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    choice = result["backbone_choice"]
    assert choice["winner"] == "means" and choice["reason"].startswith("means: the highest CV accuracy")
    board = {c["name"]: c for c in choice["candidates"]}
    assert set(board) == {"means", "sum", "means + sum"}
    assert board["means"]["cv_accuracy"] == 1.0 and board["sum"]["cv_accuracy"] < 0.9
    assert board["sum"]["feature_dim"] == 1 and board["means"]["ms_per_image"] > 0
    # The concatenation is no better, so it is not kept; it ranks below the winner.
    assert choice["candidates"][0]["name"] == "means" and "not kept" in choice["reason"]
    # Only the training photos were looked at: as many as the run trained on.
    assert {c["cv_images"] for c in choice["candidates"]} == {sum(result["train_counts"].values())}
    # The winner, a Keras 3 export, ran through the signature and output found in it.
    meta = json.loads((tmp_path / "m" / "tlcli.json").read_text())
    assert meta["backbone_choice"] == choice and meta["backbone"]["handle"] == str(keras3_backbones["means"])
    assert meta["backbone"]["signature"] == "serving_default" and meta["backbone"]["output_key"] == "output_0"
    assert result["val_accuracy"] == 1.0


def test_the_concatenation_is_kept_when_cross_validation_says_it_is_better(tmp_path, keras3_backbones,
                                                                            colour_data):
    out = tmp_path / "m"
    result = tlcli.train(colour_data, out=str(out), backbone=f"{keras3_backbones['red']},{keras3_backbones['blue']}",
                         **FAST)
    choice = result.backbone_choice
    assert choice["winner"] in ("red + blue", "blue + red"), choice
    assert choice["candidates"][0]["cv_accuracy"] > max(c["cv_accuracy"] for c in choice["candidates"][1:])
    assert result.val_accuracy == 1.0 and result.cached >= sum(result.train_counts.values())  # not extracted again
    meta = json.loads((out / "tlcli.json").read_text())
    assert len(meta["backbone"]["parts"]) == 2 and meta["backbone"]["feature_dim"] == 2
    exported = tlcli.export_tflite(str(out))  # the TFLite model runs both backbones
    assert exported.agreement == 1.0


def test_leaderboard_ranks_by_cv_accuracy_then_loss_and_a_tie_does_not_keep_a_concatenation():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    good = selection.Candidate("good", (y[:, None] * 3.0 + rng.normal(0, 0.3, (40, 4))).astype(np.float32), 8, 1.0)
    noise = selection.Candidate("noise", rng.normal(0, 1, (40, 4)).astype(np.float32), 8, 0.5)
    both = selection.concatenated(good, noise)
    board = selection.leaderboard([noise, good, both], y, 2)
    assert [s.name for s in board][0] == "good" and board[-1].name == "noise"
    assert board[1].is_concat and board[1].ms_per_image == 1.5
    assert selection.concatenated(good, selection.Candidate("big", good.features, 16)) is None


def test_auto_names_the_presets_in_the_tf_hub_cache_and_none_is_a_one_line_error(tmp_path, monkeypatch,
                                                                                  tiny_backbone):
    from tlcli.config import TrainConfig
    from tlcli.model import hub_cache
    from tlcli.model.presets import PRESETS
    from tlcli.training import choice

    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="--backbone auto: no preset is in the TF Hub cache"):
        choice.candidate_specs(TrainConfig(backbone="auto"))
    for name in ("mobilenet_v1_025_224", "bit_m_r50x1"):
        hub_cache.cache_path(PRESETS[name].handle).symlink_to(tiny_backbone)
    specs = choice.candidate_specs(TrainConfig(backbone="auto"))
    assert [s.preset for s in specs] == ["mobilenet_v1_025_224", "bit_m_r50x1"]
    with pytest.raises(UsageError, match="named twice"):
        choice.candidate_specs(TrainConfig(backbone=f"{tiny_backbone}, {tiny_backbone}"))
