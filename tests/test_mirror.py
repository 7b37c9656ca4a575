"""Mirror averaging (--mirror, on by default with --fine-tune): the head learns from each image
and its left-right mirror image, and the saved model averages the features of both."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tlcli
from tests.helpers import make_colour_dataset
from tlcli.metrics import Report


def _asymmetric_images(size=32):
    """Images whose left and right halves differ, so mirroring changes what the backbone sees."""
    rng = np.random.default_rng(5)
    x = np.zeros((4, size, size, 3), np.float32)
    x[:, :, : size // 3] = rng.uniform(0, 1, (4, 1, 1, 3))
    x[:, :, size // 3:] = rng.uniform(0, 1, (4, 1, 1, 3))
    return np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)


def _probs(bundle, images):
    import tensorflow as tf

    serve = tf.saved_model.load(str(bundle)).signatures["serving_default"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


def test_mirror_bundle_scores_an_image_and_its_mirror_image_alike(tmp_path, train_args, trained_bundle):
    data = make_colour_dataset(tmp_path / "images", per_class=6)
    cache = tmp_path / "cache"
    result = tlcli.train(data, out=str(tmp_path / "m"), mirror=True, cache_dir=str(cache), **train_args)
    assert result.mirror and (result.extracted, result.cached) == (2 * 18, 0)
    meta = json.loads((tmp_path / "m" / "tlcli.json").read_text())
    assert meta["mirror_average"] is True and meta["config"]["mirror"] is True

    x = _asymmetric_images()
    mirrored = x[:, :, ::-1].copy()
    np.testing.assert_allclose(_probs(tmp_path / "m", x), _probs(tmp_path / "m", mirrored), atol=1e-6)
    # A model without mirror averaging does tell these images from their mirror images.
    assert np.abs(_probs(trained_bundle, x) - _probs(trained_bundle, mirrored)).max() > 1e-3

    # A re-run reads both views from the cache.
    again = tlcli.train(data, out=str(tmp_path / "m2"), mirror=True, cache_dir=str(cache), **train_args)
    assert (again.extracted, again.cached) == (0, 2 * 18)


def _check_recorded_metrics_match_the_saved_model(bundle, tmp_path):
    meta = json.loads((bundle / "tlcli.json").read_text())
    for path, label in json.loads((bundle / "splits.json").read_text())["val"]:
        dst = tmp_path / "val" / meta["labels"][label]
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst / Path(path).name)
    rep = tlcli.evaluate(tmp_path / "val", model_dir=bundle).report
    recorded = Report.from_dict(meta["metrics"]["val"])
    assert rep.count == recorded.count > 0
    assert rep.confusion == recorded.confusion
    assert rep.loss == pytest.approx(recorded.loss, abs=1e-4)


def test_mirror_metrics_recorded_by_training_are_those_of_the_saved_model(tmp_path, train_args):
    data = make_colour_dataset(tmp_path / "images", per_class=6)
    tlcli.train(data, out=str(tmp_path / "m"), mirror=True, **train_args)
    _check_recorded_metrics_match_the_saved_model(tmp_path / "m", tmp_path)


def test_fine_tuned_mirror_metrics_recorded_by_training_are_those_of_the_saved_model(tmp_path, train_args):
    data = make_colour_dataset(tmp_path / "images", per_class=6)
    # No holdout, so the fine-tuned weights are kept and both views are re-extracted from them.
    result = tlcli.train(data, out=str(tmp_path / "m"), fine_tune=True, fine_tune_epochs=1, holdout=0.0,
                         fine_tune_learning_rate=0.05, **train_args)
    assert result.mirror and (result.extracted, result.cached) == (18 + 2 * 18, 0)
    _check_recorded_metrics_match_the_saved_model(tmp_path / "m", tmp_path)


def test_cli_no_mirror_turns_it_off_with_fine_tune(tmp_path, tiny_backbone):
    from tests.helpers import run_cli

    data = make_colour_dataset(tmp_path / "images", per_class=6)
    res = run_cli("train", str(data), "--backbone", str(tiny_backbone), "--image-size", "32", "--epochs", "60",
                  "--batch-size", "8", "--tensorboard", "none", "--out", str(tmp_path / "m"), "--fine-tune",
                  "--fine-tune-epochs", "1", "--no-mirror", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["mirror"] is False
    assert json.loads((tmp_path / "m" / "tlcli.json").read_text())["mirror_average"] is False
