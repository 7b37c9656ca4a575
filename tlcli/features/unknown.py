"""An honest "unknown": how unlike the training photos a photo is, and the score above which
tlcli calls it unknown, both decided by the training images alone.

The score is the squared Mahalanobis distance of the features the head sees (mirror views
averaged, as the saved classifier averages them) to the nearest class mean, with one covariance
shared by the classes (the pooled within-class scatter: a Gaussian per class with a tied
covariance, as in Lee et al., NeurIPS 2018), divided by the feature size, so that a photo like
the training photos scores about 1. The features are first taken to their signed square root
(Tukey's ladder of powers at 1/2, ``gaussianized``): a backbone's pooled ReLU activations are
non-negative and right-skewed, and a Gaussian model fits their square roots far better (the
transform few-shot learning uses before fitting Gaussians to a handful of images per class,
Yang et al., ICLR 2021). A few hundred photos in 1,280 dimensions give a singular
covariance: it is shrunk towards a multiple of the identity by Ledoit and Wolf's rule (J.
Multivariate Anal. 88, 2004), the shrinkage that minimises the expected squared error, estimated
from the data alone: no setting. Its ``MAX_RANK`` largest eigen-directions are kept; the other
directions share the mean of their variances (probabilistic PCA's rule), which is exact when the
training photos are fewer than ``MAX_RANK``, and keeps the model's extra weights to d x (r + k)
numbers at any size.

The threshold is the conformal quantile of out-of-fold scores: the training photos are split into
stratified folds, each fold's photos are scored by a detector fit on the other folds (as a new
photo is scored by the final one), and the threshold is the ceil((n + 1)(1 - TARGET_RATE))-th
smallest score. A new photo exchangeable with the training photos then scores above it with
probability at most ``TARGET_RATE``; a fold's detector sees (K - 1) / K of the photos, so its
scores run slightly higher than the final detector's, which errs towards fewer false unknowns.

The score is folded into the SavedModel as plain ops (``graph_score``: a subtraction, three
matrix products, sums and a minimum), so every engine and export computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis, shared Ledoit-Wolf covariance, nearest class mean"
# The share of photos like the training photos that may be called unknown. The aim is at most 5%
# of a model's own validation photos: on 150 of them the rate seen has a standard deviation of
# sqrt(0.02 * 0.98 / 150) = 1.1 points around 2%, so 2% keeps 5% about 2.6 of them away, while a
# lower rate would move the threshold into the thin tail of a few hundred out-of-fold scores.
TARGET_RATE = 0.02
FOLDS = 5
# Fewer training images than this: no detector. Below 1 / TARGET_RATE - 1 = 49 images the
# conformal threshold is simply the largest out-of-fold score.
MIN_IMAGES = 10
MAX_RANK = 256       # eigen-directions kept apart; the rest share one variance
MAX_IMAGES = 20_000  # a detector is fit on a random sample of at most this many training images


def gaussianized(features):
    """The signed square root of ``features`` (numpy, float64), the form every score is computed in."""
    x = np.asarray(features, np.float64)
    return np.sign(x) * np.sqrt(np.abs(x))


@dataclass
class Detector:
    """The fitted score, in the form the graph computes (``graph_score``), for ``k`` classes,
    ``d`` features and ``r`` kept directions: score(f) = min_c [alpha |e|^2 + sum_i w_i (e.u_i)^2
    + e.a_c + (w * (e U)).b_c + const_c] with e = gaussianized(f) - center, all divided by d
    already."""

    center: np.ndarray   # [d]
    linear: np.ndarray   # [d, k]: -2 alpha (mean_c - center)
    basis: np.ndarray    # [d, r]: the kept eigen-directions U
    weights: np.ndarray  # [r]: 1 / variance_i - alpha
    cross: np.ndarray    # [r, k]: -2 U.T (mean_c - center)
    alpha: float         # 1 / the variance of every other direction
    const: np.ndarray    # [k]: the squared distance of the centre to each mean
    shrinkage: float = 0.0

    def padded(self, rank: int) -> "Detector":
        """The same detector with ``rank`` kept directions (zero columns added: they weigh 0)."""
        extra = rank - self.basis.shape[1]
        if extra < 0:
            raise ValueError(f"padded: the detector keeps {self.basis.shape[1]} directions, more than {rank}")
        return Detector(self.center, self.linear, np.pad(self.basis, ((0, 0), (0, extra))),
                        np.pad(self.weights, (0, extra)), np.pad(self.cross, ((0, extra), (0, 0))), self.alpha,
                        self.const, self.shrinkage)

    def arrays(self) -> dict[str, np.ndarray]:
        """The float32 arrays the graph's variables hold, by name (``graph_score``'s ``v``)."""
        return {name: np.asarray(getattr(self, name), np.float32)
                for name in ("center", "linear", "basis", "weights", "cross", "alpha", "const")}

    def score(self, features) -> np.ndarray:
        """The score [n] of features [n, d], in float64 (the graph's formula)."""
        e = gaussianized(features) - self.center
        proj = e @ self.basis
        wp = proj * self.weights
        quad = self.alpha * np.einsum("ij,ij->i", e, e) + np.einsum("ij,ij->i", wp, proj)
        d2 = quad[:, None] + e @ self.linear + wp @ self.cross + self.const[None, :]
        return np.maximum(d2, 0.0).min(axis=1)


def graph_score(t, features, v):
    """The score of ``features`` [batch, d] in TensorFlow ops that every converter keeps (Maximum,
    Sqrt, Sub, MatMul, Mul, Square, Sum, Add, Min): float32 [batch]. ``v`` holds the variables
    named as ``Detector.arrays``."""
    f = t.cast(features, t.float32)
    e = t.sqrt(t.maximum(f, 0.0)) - t.sqrt(t.maximum(-f, 0.0)) - v.center  # gaussianized
    proj = t.matmul(e, v.basis)
    wp = proj * v.weights
    quad = v.alpha * t.reduce_sum(t.square(e), axis=1) + t.reduce_sum(wp * proj, axis=1)
    d2 = t.expand_dims(quad, 1) + t.matmul(e, v.linear) + t.matmul(wp, v.cross) + v.const
    return t.reduce_min(t.maximum(d2, 0.0), axis=1)


def graph_rank(feature_dim: int, images: int) -> int:
    """How many directions the graph keeps for ``images`` training images of ``feature_dim``
    features: known before the features are, so the graph is written while they are extracted."""
    return max(1, min(MAX_RANK, feature_dim, images, MAX_IMAGES))


def possible(y, num_classes: int) -> bool:
    """Whether training labels ``y`` allow a detector: at least ``MIN_IMAGES`` images and two of
    every class that has any (each fold's detector must know every class)."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=num_classes)
    return len(y) >= MIN_IMAGES and int(counts[counts > 0].min()) >= 2


def ledoit_wolf(residuals: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Ledoit and Wolf's shrunk covariance of centred rows ``residuals`` [n, d]:
    (shrinkage rho in [0, 1], mu = trace / d, the eigenvalues s [m] and eigen-directions V [d, m]
    of the sample covariance S = R.T R / n, m = min(n, d)); the covariance is
    rho mu I + (1 - rho) S. Computed from the thin SVD of R: the d x d matrix is never formed."""
    n, d = residuals.shape
    _, sv, vt = np.linalg.svd(residuals, full_matrices=False)
    s = sv ** 2 / n
    mu = float(s.sum()) / d
    frob = float((s ** 2).sum())  # |S|_F^2
    delta = frob - d * mu * mu  # |S - mu I|_F^2
    fourth = float((np.einsum("ij,ij->i", residuals, residuals) ** 2).sum())
    beta = max((fourth / n - frob) / n, 0.0)
    rho = 1.0 if delta <= 0 else min(beta / delta, 1.0)
    return rho, mu, s, vt.T


def fit(features: np.ndarray, y: np.ndarray, num_classes: int, *, rank: int = MAX_RANK) -> Detector:
    """The detector of features [n, d] with labels ``y`` [n] in [0, num_classes), keeping at most
    ``rank`` directions. A class with no rows is never the nearest."""
    x = gaussianized(features)
    y = np.asarray(y, np.int64)
    n, d = x.shape
    counts = np.bincount(y, minlength=num_classes)
    means = np.zeros((num_classes, d))
    np.add.at(means, y, x)
    means /= np.maximum(counts, 1)[:, None]
    center = x.mean(axis=0)
    rho, mu, s, vecs = ledoit_wolf(x - means[y])
    floor = 1e-9 * max(mu, float(np.mean(x * x)), 1e-30)  # identical rows: a tiny variance, not zero
    variances = np.maximum(rho * mu + (1 - rho) * s, floor)
    r = min(rank, d, len(s))
    rest = d - r
    alpha = 0.0 if rest == 0 else 1.0 / max(rho * mu + (1 - rho) * float(s[r:].sum()) / rest, floor)
    basis, weights = vecs[:, :r], 1.0 / variances[:r] - alpha
    m = means - center
    proj = m @ basis
    const = alpha * np.einsum("ij,ij->i", m, m) + np.einsum("ij,ij->i", proj * weights, proj)
    const[counts == 0] = 1e30  # float32 holds it: that class is never the minimum
    return Detector(center, -2 * alpha * m.T / d, basis, weights / d, -2 * proj.T, alpha / d, const / d, rho)


def conformal_threshold(scores: np.ndarray, rate: float) -> float:
    """The ceil((n + 1)(1 - rate))-th smallest of ``scores`` (the largest when that is past n)."""
    ordered = np.sort(np.asarray(scores, np.float64))
    i = min(int(np.ceil((len(ordered) + 1) * (1 - rate))), len(ordered)) - 1
    return float(ordered[max(i, 0)])


def fit_with_threshold(features: np.ndarray, y, num_classes: int, *, rank: int, seed: int = 0,
                       rate: float = TARGET_RATE) -> tuple[Detector, dict] | tuple[None, None]:
    """(the detector of every row, what ``tlcli.json`` records of it under ``"unknown"``), or
    (None, None) when ``possible`` says no. Folds: stratified, min(FOLDS, the smallest class)."""
    from tlcli.model.head import stratified_folds

    y = np.asarray(y, np.int64)
    if not possible(y, num_classes):
        return None, None
    counts = np.bincount(y, minlength=num_classes)
    folds = min(FOLDS, int(counts[counts > 0].min()))
    fold = stratified_folds(y, folds, seed)
    oof = np.zeros(len(y))
    for f in range(folds):
        held = fold == f
        oof[held] = fit(features[~held], y[~held], num_classes, rank=rank).score(features[held])
    threshold = conformal_threshold(oof, rate)
    detector = fit(features, y, num_classes, rank=rank)
    info = {"method": METHOD, "threshold": threshold, "target_rate": rate,
            "oof_rate": round(float((oof > threshold).mean()), 4), "images": int(len(y)),
            "folds": folds, "shrinkage": round(detector.shrinkage, 4),
            "oof_median": round(float(np.median(oof)), 4)}
    return detector.padded(rank), info


def fit_views(views, samples, num_classes: int, *, rank: int, seed: int = 0):
    """``fit_with_threshold`` on the features the head sees of ``samples`` (objects with
    ``.label``; ``views``: ``features.FeatureViews``): the plain view, or the mean of the plain
    and mirror views. Above ``MAX_IMAGES`` samples, a random sample of that many."""
    samples = list(samples)
    if len(samples) > MAX_IMAGES:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), MAX_IMAGES, replace=False))
        samples = [samples[i] for i in keep]
    plain, mirror = views.of(samples)
    x = np.asarray(plain, np.float32)
    if mirror is not None:
        x = (x + np.asarray(mirror, np.float32)) / 2
    return fit_with_threshold(x, [s.label for s in samples], num_classes, rank=rank, seed=seed)
