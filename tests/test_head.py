"""The head: the numpy fit against an independent solver, out-of-fold probabilities, the forward pass."""

import numpy as np
import pytest

from tlcli.model import head


def _blobs(n=90, d=6, k=3, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (k, d))
    y = np.arange(n) % k
    return centres[y] + rng.normal(0, 1, (n, d)), y


def test_fit_head_converges_to_scikit_learns_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y = _blobs()
    l2 = 1e-2
    fit = head.fit_head(X, y, 3, l2=l2, label_smoothing=0.0, epochs=3000, fixed_epochs=True)
    # tlcli minimises mean cross-entropy + l2 * |W|^2 (bias unpenalised); scikit-learn minimises
    # C * sum cross-entropy + |W|^2 / 2: the same optimum for C = 1 / (2 n l2).
    ref = sklearn.LogisticRegression(C=1 / (2 * len(y) * l2), tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(fit.kernel, ref.coef_.T, atol=2e-4)
    np.testing.assert_allclose(head.predict_proba(X, fit.kernel, fit.bias), ref.predict_proba(X), atol=1e-4)


def test_out_of_fold_probabilities_come_from_fits_that_did_not_see_the_row():
    X, y = _blobs(n=60, seed=1)
    X[0] = X[y == 1][1] if y[0] != 1 else X[0]   # row 0 looks like class 1 ...
    y = y.copy()
    y[0] = 0                                       # ... but is labelled 0: a planted mislabel
    fit = head.fit_head(X, y, 3)
    assert sorted(fit.oof_rows.tolist()) == list(range(60))  # every row, under CV_MAX_IMAGES
    assert fit.oof_probs.shape == (60, 3)
    np.testing.assert_allclose(fit.oof_probs.sum(axis=1), 1.0, atol=1e-5)
    oof = dict(zip(fit.oof_rows.tolist(), fit.oof_probs))
    # Held out, the planted row gets little probability for its own label; the refit, which
    # trained on it, gives it more.
    refit = head.predict_proba(X[:1], fit.kernel, fit.bias)[0]
    assert oof[0][0] < 0.3
    assert oof[0][0] < refit[0]
    accuracy = np.mean([oof[i].argmax() == y[i] for i in range(1, 60)])
    assert accuracy > 0.8


def test_out_of_fold_probabilities_cover_the_sample_when_cross_validation_subsamples(monkeypatch):
    monkeypatch.setattr(head, "CV_MAX_IMAGES", 40)
    monkeypatch.setattr(head, "CV_MIN_PER_CLASS", 5)  # below each class's share (13 of its 33)
    X, y = _blobs(n=100, seed=2)
    fit = head.fit_head(X, y, 3)
    assert 30 <= len(fit.oof_rows) <= 50 and len(set(fit.oof_rows.tolist())) == len(fit.oof_rows)
    assert fit.oof_probs.shape == (len(fit.oof_rows), 3)


def test_no_out_of_fold_probabilities_without_cross_validation():
    X, y = _blobs(n=30)
    fit = head.fit_head(X, y, 3, l2=1e-3, epochs=50, fixed_epochs=True)
    assert fit.epochs == 50 and fit.oof_rows.size == 0 and fit.oof_probs.size == 0


def test_predict_proba_averages_the_mirror_views_before_the_head():
    rng = np.random.default_rng(3)
    kernel, bias = rng.normal(0, 1, (4, 3)).astype(np.float32), rng.normal(0, 1, 3).astype(np.float32)
    a, b = rng.normal(0, 1, (5, 4)), rng.normal(0, 1, (5, 4))
    both = head.predict_proba(a, kernel, bias, mirror_features=b)
    np.testing.assert_allclose(both, head.predict_proba((a + b) / 2, kernel, bias), atol=1e-6)
    assert not np.allclose(both, head.predict_proba(a, kernel, bias))
    assert head.predict_proba(np.zeros((0, 4)), kernel, bias).shape == (0, 3)


def test_cross_validation_samples_every_class_of_many_small_ones_and_keeps_their_balance():
    # 60 classes of 30 images: a uniform sample of CV_MAX_IMAGES would hold about 17 a class (and
    # some class fewer than FOLDS); the stratified one takes CV_MIN_PER_CLASS of each.
    k, rng = 60, np.random.default_rng(7)
    y = np.arange(30 * k) % k
    X = rng.normal(0, 1, (k, 6))[y] * 3 + rng.normal(0, 1, (len(y), 6))
    fit = head.fit_head(X, y, k, epochs=40)
    counts = np.bincount(y[fit.oof_rows], minlength=k)
    assert (counts == head.CV_MIN_PER_CLASS).all(), counts
    assert len(set(fit.oof_rows.tolist())) == len(fit.oof_rows) and set(fit.cv_loss) == set(head.L2_GRID)
    # One class twice as large: sampled at the same share of CV_MAX_IMAGES (not raised), so the
    # sample's balance is the data's.
    y2 = np.r_[np.zeros(1000, int), np.ones(1000, int), np.full(2000, 2)]
    X2 = rng.normal(0, 1, (3, 6))[y2] * 3 + rng.normal(0, 1, (len(y2), 6))
    counts2 = np.bincount(y2[head.fit_head(X2, y2, 3, epochs=20).oof_rows], minlength=3)
    assert counts2.tolist() == [250, 250, 500]


def test_with_many_classes_the_cross_validation_sample_shrinks_to_its_cell_budget(monkeypatch):
    # 200 classes of 12: each class's share of CV_MAX_IMAGES is 5, so CV_MIN_PER_CLASS (25, or all
    # 12) sets the sample; a budget of [2,000 rows x 20 fits x 200 classes] cells lowers it to 10
    # a class, and a tiny one to FOLDS, never fewer.
    k, rng = 200, np.random.default_rng(3)
    y = np.arange(12 * k) % k
    X = rng.normal(0, 1, (k, 6))[y] * 3 + rng.normal(0, 1, (len(y), 6))
    counts = np.bincount(y[head.fit_head(X, y, k, epochs=5).oof_rows], minlength=k)
    assert (counts == 12).all(), counts
    monkeypatch.setattr(head, "CV_MAX_CELLS", 10 * 20 * k * k)
    counts = np.bincount(y[head.fit_head(X, y, k, epochs=5).oof_rows], minlength=k)
    assert (counts == 10).all(), counts
    monkeypatch.setattr(head, "CV_MAX_CELLS", 1)
    counts = np.bincount(y[head.fit_head(X, y, k, epochs=5).oof_rows], minlength=k)
    assert (counts == head.FOLDS).all(), counts


@pytest.mark.parametrize("n", [300, 40], ids=["several blocks and a short one", "one short block"])
def test_an_epoch_in_row_blocks_gives_the_fit_of_one_block(monkeypatch, n):
    """Batched CV fits (g > 1, k > 2, held-out rows, early stopping): blocks of 7 rows against one
    block of every row give the same weights, held-out curves and training log."""
    rng = np.random.default_rng(3)
    k, g = 3, 4
    Z = rng.normal(size=(n, 9)).astype(np.float32)
    y = rng.integers(0, k, n)
    Y = head._targets(y, k, 0.1, np.float32)
    held = (np.arange(n)[None, :] % g == np.arange(g)[:, None]).astype(np.float64)
    args = dict(epochs=40, val_mask=held, patience=5)
    l2 = np.array([1e-3, 1e-2, 1e-1, 1.0])
    monkeypatch.setattr(head, "BLOCK_ROWS", 10 ** 6)
    whole = head._train(Z, Y, 1.0 - held, l2, **args)
    monkeypatch.setattr(head, "BLOCK_ROWS", 7)
    blocked = head._train(Z, Y, 1.0 - held, l2, **args)
    assert whole[0].shape == (g, 9, k) and whole[1].shape == (g, k) and whole[2].shape[1] == g
    for a, b in zip(whole[:4], blocked[:4]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(whole[4], blocked[4], rtol=1e-4)
    assert len(whole[2]) < 40 or (whole[2][-1] > whole[2].min()).any()  # early stopping was exercised
