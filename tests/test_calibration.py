"""Calibrated probabilities: a temperature fitted on the head's out-of-fold predictions, folded
into the head, recorded in the bundle; calibration error, Brier score and a reliability diagram
in evaluate."""

import json

import numpy as np
import pytest

from tlcli import metrics
from tlcli.model import calibration


def _overconfident(n=2000, k=4, t_true=0.4, seed=0):
    """Labels drawn from softmax(z), reported as softmax(z / t_true): too sure when t_true < 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, k))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    shown = np.exp(z / t_true) / np.exp(z / t_true).sum(1, keepdims=True)
    return shown, y


def test_the_temperature_undoes_a_known_distortion():
    shown, y = _overconfident(t_true=0.4)
    t = calibration.fit_temperature(shown, y)
    assert 2.2 < t < 2.8  # logits reported 1 / 0.4 times too large: T about 2.5 undoes it
    before = metrics.expected_calibration_error(shown, y)
    after = metrics.expected_calibration_error(calibration.scaled(shown, t), y)
    assert before > 0.1 and after < 0.03


def test_calibrating_a_head_keeps_its_ranking_and_folds_the_temperature():
    from tlcli.model.head import HeadFit

    shown, y = _overconfident(n=400, k=3)
    fit = HeadFit(kernel=np.ones((5, 3), np.float32), bias=np.array([0.5, 0.0, -0.5], np.float32), l2=0.0, epochs=1,
                  oof_rows=np.arange(400), oof_probs=shown.astype(np.float32))
    calibrated, info = calibration.calibrate(fit, y)
    t = info["temperature"]
    np.testing.assert_allclose(calibrated.kernel * t, fit.kernel, rtol=1e-3)
    np.testing.assert_allclose(calibrated.bias * t, fit.bias, rtol=1e-3)
    assert info["oof_ece_after"] < info["oof_ece_before"] and info["images"] == 400
    few, kept = calibration.calibrate(fit, y[:5].tolist()[:0])
    assert few is fit and kept["temperature"] == 1.0


def test_metrics_report_ece_brier_and_reliability():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    r = metrics.compute(y, probs, ["a", "b"])
    assert r.brier == pytest.approx(np.mean(((probs - np.eye(2)[y]) ** 2).sum(1)))
    # Bins (10 of them): 0.9 -> right, 0.8 -> wrong, 0.6 -> right, 0.7 -> right.
    assert [row[2] for row in r.reliability] == [1, 1, 1, 1]
    assert r.ece == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)


def test_training_folds_the_temperature_and_records_it(tmp_path, colour_data, train_args):
    import tlcli
    from tlcli import bundle

    r = tlcli.train(colour_data, out=str(tmp_path / "m"), cache_dir=str(tmp_path / "c"), **train_args)
    cal = r.calibration
    assert cal["images"] > 0 and cal["temperature"] > 0
    meta = json.loads((tmp_path / "m" / "tlcli.json").read_text())
    assert meta["training"]["calibration"] == cal
    assert bundle.load(tmp_path / "m").meta.training.calibration == cal
    # The saved model's probabilities are the calibrated ones the recipe scored: predict agrees.
    preds = tlcli.predict([colour_data], model_dir=tmp_path / "m", engine="tf", top_k=1)
    assert all(p.predictions[0]["probability"] > 0.5 for p in preds)


def test_evaluate_reports_calibration_and_writes_a_reliability_diagram(trained_bundle, colour_data, tmp_path):
    from PIL import Image

    import tlcli

    ev = tlcli.evaluate(colour_data, model_dir=trained_bundle, report_dir=tmp_path / "report")
    assert 0.0 <= ev.report.ece <= 1.0 and 0.0 <= ev.report.brier <= 2.0
    assert sum(row[2] for row in ev.report.reliability) == ev.report.count
    png = Image.open(ev.files["reliability.png"])
    assert png.format == "PNG" and png.width > 300
