"""Test-time augmentation beyond the mirror (features.tta): the central crop's views, kept only
when the head's cross-validation on the training images says they lower the loss beyond chance;
the saved model then averages the same views the head was fit on. Head-only runs never try it."""

import json
from collections import namedtuple

import numpy as np
import pytest

import tlcli
from tests.helpers import make_colour_dataset
from tests.test_mirror import _asymmetric_images, _check_recorded_metrics_match_the_saved_model
from tlcli.features import FeatureViews, tta

Sample = namedtuple("Sample", "path label")


def test_gate_keeps_the_crop_views_only_when_the_loss_drops_beyond_1_96_standard_errors():
    rng = np.random.default_rng(0)
    without = rng.uniform(0.2, 1.0, 50)
    steady = without - 0.05 + rng.normal(0, 0.01, 50)  # lower by 0.05, SE of the differences ~0.0014
    kept, se = tta.gate(without, steady)
    assert kept and se == pytest.approx(np.std(without - steady, ddof=1) / np.sqrt(50))
    noisy = without - 0.05 + rng.normal(0, 0.5, 50)  # the same mean drop, lost in the noise (SE ~0.07)
    assert not tta.gate(without, noisy)[0]
    assert not tta.gate(without, without + 0.05)[0]  # higher: never kept
    assert not tta.gate(without[:1], steady[:1])[0]  # one image cannot say
    # Just past, and just short of, 1.96 standard errors of the paired differences.
    d = np.array([1.0, -1.0] * 20) + 0.32 * 1.0
    assert d.mean() / (d.std(ddof=1) / np.sqrt(d.size)) > 1.96 and tta.gate(d + 1.0, np.ones(40))[0]
    d = np.array([1.0, -1.0] * 20) + 0.30 * 1.0
    assert d.mean() / (d.std(ddof=1) / np.sqrt(d.size)) < 1.96 and not tta.gate(d + 1.0, np.ones(40))[0]


def _views(rng, means, labels, noise: float, *, informative: bool = True):
    x = rng.normal(0, noise, (len(labels), means.shape[1]))
    return (means[labels] if informative else 0.0) + x


def test_decide_keeps_crop_views_that_help_and_drops_ones_that_do_not():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 30)
    samples = [Sample(f"img{i}.png", int(y)) for i, y in enumerate(labels)]
    means = rng.normal(0, 1.0, (3, 6))
    plain, mirror = (_views(rng, means, labels, 1.5) for _ in range(2))
    views = FeatureViews(samples, plain.astype(np.float32), mirror.astype(np.float32), 0, 180)
    options = dict(epochs=100, seed=0, l2=1e-3)

    clean = FeatureViews(samples, *(_views(rng, means, labels, 0.3).astype(np.float32) for _ in range(2)), 180, 0)
    kept = tta.decide(views, clean, samples, 3, mirror=True, **options)
    assert kept.kept and kept.with_crop < kept.without and kept.images == 90
    assert (kept.extracted, kept.cached) == (180, 0)

    junk = FeatureViews(samples, *(_views(rng, means, labels, 1.5, informative=False).astype(np.float32)
                                   for _ in range(2)), 180, 0)
    dropped = tta.decide(views, junk, samples, 3, mirror=True, **options)
    assert not dropped.kept and dropped.with_crop > dropped.without
    record = dropped.to_dict()
    assert record["views"] == ["plain", "mirror", "crop", "crop mirror"] and len(record["summary"]) <= 60

    # After fine-tuning, the holdout decides: the head fit on the other images, scored on it.
    holdout = samples[::5]
    on_holdout = tta.decide(views, clean, samples, 3, mirror=True, holdout=holdout, **options)
    assert on_holdout.kept and on_holdout.scored_on == "holdout" and on_holdout.images == len(holdout)
    assert on_holdout.describe().startswith("crop kept: holdout loss") and kept.scored_on == "CV"

    # The averaged views are the pairwise means, rows in order.
    mean = tta.averaged(views, clean)
    np.testing.assert_allclose(mean.plain, (views.plain + clean.plain) / 2, rtol=1e-6)
    np.testing.assert_allclose(mean.mirror, (views.mirror + clean.mirror) / 2, rtol=1e-6)


@pytest.mark.parametrize("mirror", [True, False])
def test_the_crop_classifier_predicts_what_the_head_predicts_on_the_averaged_views(tiny_backbone, mirror):
    from tlcli.model import backbone, head
    from tlcli.model import classifier as model

    loaded = backbone.load(backbone.resolve_spec(str(tiny_backbone), 32))
    keras_head = model.build_head(loaded.feature_dim, 3, dropout=0.0, l2=0.0, seed=0)
    rng = np.random.default_rng(2)
    kernel, bias = rng.normal(0, 3, (loaded.feature_dim, 3)).astype(np.float32), np.zeros(3, np.float32)
    model.load_head_weights(keras_head, kernel, bias, 0.0)
    served = model.build_classifier(loaded.layer, keras_head, 32, mirror=mirror, crop=True)

    x = _asymmetric_images()
    x[:, :3] = 1.0  # a border the crop cuts away: the crop view differs from the plain one
    feats = {(flip, crop): model.build_extractor(loaded.layer, 32, flip=flip, crop=crop).predict(x, verbose=0)
             for flip in (False, True) for crop in (False, True)}
    assert np.abs(feats[False, True] - feats[False, False]).max() > 1e-3
    plain = (feats[False, False] + feats[False, True]) / 2
    other = (feats[True, False] + feats[True, True]) / 2 if mirror else None
    expected = head.predict_proba(plain, kernel, bias, mirror_features=other)
    assert expected.max(axis=1).min() < 0.99  # not saturated: the comparison can see a difference
    np.testing.assert_allclose(served.predict(x, verbose=0), expected, atol=1e-5)
    without = model.build_classifier(loaded.layer, keras_head, 32, mirror=mirror)
    assert np.abs(without.predict(x, verbose=0) - expected).max() > 1e-3


def test_a_fine_tuned_model_with_the_crop_views_kept_serves_them_and_exports(tmp_path, train_args, monkeypatch):
    from rich.console import Console

    from tlcli.cli import render

    monkeypatch.setattr(tta, "gate", lambda *a: (True, 0.01))  # the tiny colours are as easy either way
    data = make_colour_dataset(tmp_path / "images", per_class=6)
    result = tlcli.train(data, out=str(tmp_path / "m"), fine_tune=True, fine_tune_epochs=1, holdout=0.0,
                         fine_tune_learning_rate=0.05, cache_dir=str(tmp_path / "cache"), **train_args)
    record = result.test_time_augmentation
    assert record["kept"] and record["views"] == ["plain", "mirror", "crop", "crop mirror"]
    assert record["images"] == sum(result.train_counts.values()) and record["extracted"] == 2 * 18
    assert np.isfinite([record["without"], record["with_crop"], record["se"]]).all()
    meta = json.loads((tmp_path / "m" / "tlcli.json").read_text())
    assert meta["test_time_augmentation"] == record
    # The recorded metrics, from the head on the averaged views, are the SavedModel's own.
    _check_recorded_metrics_match_the_saved_model(tmp_path / "m", tmp_path)
    exported = tlcli.export_tflite(tmp_path / "m")  # through the parity gate
    assert exported.agreement == 1.0 and exported.max_abs_diff < 1e-4

    console = Console(width=80, record=True)
    console.print(render.train_summary(result, tensorboard=None))
    assert any(record["summary"] in line for line in console.export_text().splitlines())


def test_crop_views_not_kept_are_extracted_for_the_training_images_only(tmp_path, train_args, monkeypatch):
    monkeypatch.setattr(tta, "gate", lambda *a: (False, 0.01))
    data = make_colour_dataset(tmp_path / "images", per_class=4)
    val = make_colour_dataset(tmp_path / "val", per_class=2, start=10)
    result = tlcli.train(data, val_dir=str(val), out=str(tmp_path / "m"), fine_tune=True, fine_tune_epochs=1,
                         holdout=0.0, mirror=True, cache_dir=str(tmp_path / "cache"), **train_args)
    record = result.test_time_augmentation
    n_train, n_val = sum(result.train_counts.values()), sum(result.val_counts.values())
    assert not record["kept"] and n_val > 0
    assert record["extracted"] + record["cached"] == 2 * n_train  # (crop, crop mirror) of the training images


def test_head_only_runs_never_extract_crop_views(tmp_path, train_args, monkeypatch, trained_bundle):
    from tlcli.model import classifier as model

    def refuse(images):
        raise AssertionError("a head-only run built a crop view")

    monkeypatch.setattr(model, "crop_view", refuse)
    data = make_colour_dataset(tmp_path / "images", per_class=4)
    result = tlcli.train(data, out=str(tmp_path / "m"), cache_dir=str(tmp_path / "cache"), mirror=True, **train_args)
    assert result.test_time_augmentation is None
    assert not [p for p in (tmp_path / "cache" / "store").iterdir() if tta.CROP_KEY in p.name]
    assert "test_time_augmentation" not in json.loads((trained_bundle / "tlcli.json").read_text())
