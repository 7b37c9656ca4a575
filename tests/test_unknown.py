"""The unknown detector (#25 item 3): a Mahalanobis score with a shared Ledoit-Wolf covariance,
its threshold from out-of-fold training scores, folded into the SavedModel's "tlcli" signature
and every export; predict, evaluate and serve show it; old bundles behave as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_cli
from tlcli.features import unknown


def _gaussian_classes(rng, n, d=30, k=3, mixing=None, means=None):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) if mixing is None else mixing
    means = rng.normal(0, 3, (k, d)) if means is None else means
    y = rng.integers(0, k, n)
    return rng.normal(size=(n, d)) @ mixing + means[y], y, mixing, means


# ---- the score and its threshold, in numpy -----------------------------------------------------

def test_the_shrinkage_is_ledoit_and_wolfs():
    from sklearn.covariance import ledoit_wolf_shrinkage

    rng = np.random.default_rng(0)
    for n, d in ((40, 120), (400, 20)):  # fewer images than features, and more
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        x -= x.mean(axis=0)
        rho, *_ = unknown.ledoit_wolf(x)
        assert rho == pytest.approx(ledoit_wolf_shrinkage(x, assume_centered=True), rel=1e-9)


def test_the_score_is_the_mahalanobis_distance_to_the_nearest_mean_per_feature():
    rng = np.random.default_rng(1)
    raw, y, *_ = _gaussian_classes(rng, 60, d=80)
    x = unknown.gaussianized(raw)  # the signed square root: every score is computed on it
    np.testing.assert_allclose(x ** 2 * np.sign(raw), raw)
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    residuals = x - means[y]
    rho, mu, s, vecs = unknown.ledoit_wolf(residuals)
    sample = residuals.T @ residuals / len(x)
    raw_new = rng.normal(size=(7, 80)) * 3
    new = unknown.gaussianized(raw_new)

    def brute(cov):
        precision = np.linalg.inv(cov)
        return np.array([min((f - m) @ precision @ (f - m) for m in means) for f in new]) / 80

    shrunk = rho * mu * np.eye(80) + (1 - rho) * sample
    np.testing.assert_allclose(unknown.fit(raw, y, 3).score(raw_new), brute(shrunk), rtol=1e-8)
    # Keeping 10 directions: the others share the mean of their variances (probabilistic PCA).
    eig = np.r_[s, np.zeros(80 - len(s))] * (1 - rho) + rho * mu
    full = np.c_[vecs, np.linalg.svd(vecs.T)[2][len(s):].T]  # completed to an orthonormal basis
    eig[10:] = eig[10:].mean()
    np.testing.assert_allclose(unknown.fit(raw, y, 3, rank=10).score(raw_new), brute(full @ np.diag(eig) @ full.T),
                               rtol=1e-8)


def test_the_threshold_calls_its_target_share_of_new_photos_unknown_and_off_domain_ones_all():
    rng = np.random.default_rng(2)
    x, y, mixing, means = _gaussian_classes(rng, 1500)
    detector, info = unknown.fit_with_threshold(x, y, 3, rank=30)
    assert info["target_rate"] == unknown.TARGET_RATE == 0.02
    assert 0.01 <= info["oof_rate"] <= 0.02 and info["folds"] == 5
    same, *_ = _gaussian_classes(rng, 5000, mixing=mixing, means=means)
    assert 0.005 <= np.mean(detector.score(same) > info["threshold"]) <= 0.035
    off = rng.uniform(-4, 4, (500, 30))  # another distribution over the same range
    assert np.mean(detector.score(off) > info["threshold"]) > 0.95
    assert unknown.fit_with_threshold(x[:9], y[:9], 3, rank=9) == (None, None)  # too few images


# ---- the bundle: its signatures, engines and commands ------------------------------------------

def _off_domain(size=32, n=6, seed=0):
    """Noise and checkerboards: nothing like the solid colours the bundle was trained on."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    board = (np.indices((size, size)).sum(axis=0) // 4 % 2).astype(np.float32)
    x[n // 2:] = board[None, :, :, None] * rng.uniform(0, 1, (n - n // 2, 1, 1, 3))
    return x


def _colour_inputs(colour_data):
    from tlcli.data import images

    return np.stack([images.load_for_model(str(p), 32) for p in sorted(colour_data.rglob("*.*"))])


def test_the_saved_model_scores_off_domain_photos_high_and_training_photos_low(trained_bundle, colour_data):
    import tensorflow as tf

    from tlcli import bundle
    from tlcli.bundle import savedmodel
    from tlcli.deploy import inference

    b = bundle.load(trained_bundle)
    threshold = b.meta.unknown["threshold"]
    assert b.meta.unknown["target_rate"] == 0.02 and "tlcli" in b.meta.signatures
    assert savedmodel.engine_signature(trained_bundle) == "tlcli"
    engine = inference.open_engine(b, "tf")
    same, off = engine.outputs(_colour_inputs(colour_data)), engine.outputs(_off_domain())
    assert np.mean(same["unknown_score"] <= threshold) >= 0.9
    assert (off["unknown_score"] > threshold).all()
    # serving_default is as it was (TF Serving's clients), and gives the same probabilities.
    loaded = tf.saved_model.load(str(trained_bundle))
    default = loaded.signatures["serving_default"]
    assert set(default.structured_outputs) == {"probabilities"}
    np.testing.assert_allclose(default(images=tf.constant(_off_domain()))["probabilities"].numpy(),
                               off["probabilities"], atol=1e-6)


def test_tflite_gives_the_saved_models_score(bundle_copy):
    import tlcli
    from tlcli import bundle
    from tlcli.deploy import inference

    result = tlcli.export_tflite(bundle_copy)
    assert result.agreement == 1.0
    b = bundle.load(bundle_copy)
    lite, ref = inference.open_engine(b, "tflite"), inference.open_engine(b, "tf")
    assert set(lite.outs) == {"probabilities", "unknown_score"}  # by the signature's names
    x = np.concatenate([_off_domain(n=4), _off_domain(n=4, seed=1) * 0.2 + 0.4])
    got, want = lite.outputs(x), ref.outputs(x)
    np.testing.assert_allclose(got["unknown_score"], want["unknown_score"], rtol=1e-3)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-5)


def test_predict_marks_unknown_photos_in_json_and_table(trained_bundle, colour_data, tmp_path):
    from PIL import Image

    noise = tmp_path / "noise.png"
    Image.fromarray((_off_domain(size=48, n=1)[0] * 255).astype(np.uint8)).save(noise)
    red = colour_data / "red" / "red_0.jpg"
    result = run_cli("predict", red, noise, "--model", trained_bundle, "--engine", "tf", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["unknown"] for r in rows] == [False, True]
    assert rows[0]["unknown_score"] < rows[1]["unknown_score"]
    assert rows[0]["predictions"][0]["label"] == "red"

    table = run_cli("predict", red, noise, "--model", trained_bundle, "--engine", "tf", columns=80)
    assert table.exit_code == 0 and "1 called unknown" in table.output
    lines = table.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert [line for line in lines if "unknown" in line][0].split("│")[2].strip() == "unknown"

    off = run_cli("predict", red, noise, "--model", trained_bundle, "--engine", "tf", "--json",
                  "--unknown-threshold", "off")
    assert [json.loads(line)["unknown"] for line in off.stdout.splitlines()] == [False, False]
    explained = run_cli("predict", red, noise, "--model", trained_bundle, "--json", "--explain", tmp_path / "why")
    assert [json.loads(line)["unknown"] for line in explained.stdout.splitlines()] == [False, True]
    bad = run_cli("predict", red, "--model", trained_bundle, "--unknown-threshold", "maybe")
    assert bad.exit_code == 2 and "--unknown-threshold maybe" in bad.output


def test_evaluate_counts_unknown_photos_and_scores_the_rest(trained_bundle, colour_data):
    import tlcli

    r = tlcli.evaluate(colour_data, model_dir=trained_bundle, engine="tf")
    u = r.unknown
    assert u["threshold"] == json.loads((trained_bundle / "tlcli.json").read_text())["unknown"]["threshold"]
    assert u["images"] + u["rest"] == r.report.count and u["rate"] <= 0.1
    every = tlcli.evaluate(colour_data, model_dir=trained_bundle, engine="tf", unknown_threshold=0.0).unknown
    assert (every["images"], every["accuracy_on_rest"]) == (r.report.count, None)
    assert tlcli.evaluate(colour_data, model_dir=trained_bundle, engine="tf", unknown_threshold="off").unknown is None
    shown = run_cli("evaluate", colour_data, "--model", trained_bundle, "--engine", "tf", "--unknown-threshold",
                    "0", columns=80)
    assert shown.exit_code == 0 and f"{r.report.count} of {r.report.count} (100.0%)" in shown.stdout


def test_serve_predict_has_the_unknown_fields_and_tf_serving_answers_do_not(trained_bundle, colour_data):
    from tests.test_serve import call, multipart, post_json, running
    from tlcli.deploy.server import make_app

    with running(make_app(trained_bundle, engine="tf", workers=1)) as base:
        body, headers = multipart([("red.jpg", (colour_data / "red" / "red_0.jpg").read_bytes())])
        status, _, answer = call(base + "/predict", "POST", body, headers)
        assert status == 200 and answer[0]["unknown"] is False and answer[0]["unknown_score"] >= 0
        status, tf_serving = post_json(base + "/v1/models/model:predict", {"instances": _off_domain(n=1).tolist()})
        assert status == 200 and list(tf_serving) == ["predictions"] and len(tf_serving["predictions"][0]) == 3


def test_a_bundle_without_a_detector_behaves_as_before(tmp_path, colour_data, train_args, monkeypatch):
    import tlcli
    from tlcli import bundle
    from tlcli.errors import BundleError, UsageError

    monkeypatch.setattr(unknown, "possible", lambda *a: False)  # as an older tlcli trained it
    r = tlcli.train(colour_data, out=str(tmp_path / "old"), cache_dir=str(tmp_path / "c"), **train_args)
    old = tmp_path / "old"
    meta = json.loads((old / "tlcli.json").read_text())
    assert r.unknown is None and "unknown" not in meta and "tlcli" not in meta["signatures"]
    preds = tlcli.predict([colour_data / "red"], model_dir=old, engine="tf")
    assert all(set(p.to_dict()) == {"path", "predictions", "error"} for p in preds)
    assert tlcli.predict([colour_data / "red"], model_dir=old, engine="tf", unknown_threshold="off")
    with pytest.raises(UsageError, match="no unknown detector"):
        tlcli.predict([colour_data / "red"], model_dir=old, unknown_threshold=1.0)
    assert tlcli.evaluate(colour_data, model_dir=old, engine="tf").unknown is None
    # tlcli.json that claims a detector its SavedModel lacks is refused.
    meta["unknown"] = {"method": unknown.METHOD, "threshold": 1.0, "target_rate": 0.02}
    (old / "tlcli.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no \"tlcli\" signature"):
        tlcli.predict([colour_data / "red"], model_dir=old, engine="tf")
    assert bundle.load(old).meta.unknown["threshold"] == 1.0


def test_fine_tuning_refits_the_detector_on_the_features_the_fine_tuned_head_sees(tmp_path, colour_data,
                                                                                  train_args, tiny_backbone):
    import tensorflow as tf

    import tlcli
    from tlcli.data import images

    out = tmp_path / "ft"
    r = tlcli.train(colour_data, out=str(out), fine_tune=True, fine_tune_epochs=1, holdout=0.0,
                    fine_tune_learning_rate=0.05, cache_dir=str(tmp_path / "c"), **train_args)
    assert r.mirror and r.unknown is not None

    def conv_weights(path, attribute):  # the bundle tracks the classifier's as .weights, the backbone as .variables
        found = {tuple(v.shape): v.numpy() for v in getattr(tf.saved_model.load(str(path)), attribute)}
        return found[(3, 3, 3, 8)], found[(8,)]

    def seen(x, weights):  # the tiny backbone (tests/helpers.py), mirror views averaged as the head sees them
        def one(x):
            conv = tf.nn.relu(tf.nn.conv2d(x * 2.0 - 1.0, weights[0], 1, "SAME") + weights[1]).numpy()
            return np.concatenate([x.mean(axis=(1, 2)), conv.mean(axis=(1, 2))], axis=1)
        return (one(x) + one(x[:, :, ::-1].copy())) / 2

    train = json.loads((out / "splits.json").read_text())["train"]
    x = np.stack([images.load_for_model(p, 32) for p, _ in train])
    y = [label for _, label in train]
    recorded = json.loads((out / "tlcli.json").read_text())["unknown"]["threshold"]
    rank = unknown.graph_rank(11, len(train))
    after, before = (unknown.fit_with_threshold(seen(x, weights), y, 3, rank=rank)[1]["threshold"]
                     for weights in (conv_weights(out, "weights"), conv_weights(tiny_backbone, "variables")))
    assert after == pytest.approx(recorded, rel=1e-3) and before != pytest.approx(recorded, rel=1e-2)
