"""The multi-label head: one sigmoid per label on the cached features, each label's threshold
chosen by cross-validation on the training photos.

A sigmoid unit is a two-class softmax whose logits are (0, z): so each label is fit by
``head.fit_head`` as a two-class problem (the label absent / present), with the same
cross-validation of the L2 strength and the epoch count, the same early stopping and the same
out-of-fold probabilities, and the sigmoid's weights are the difference of the two columns (the
two-class fit's L2 on both columns is half that strength on the difference). Each label's
temperature (``calibration.fit_temperature`` on the two columns) is folded into its weights,
and its threshold is the one that maximises F1 on the out-of-fold probabilities
(``multilabel_metrics.best_threshold``): chosen from the training photos alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from tlcli import multilabel_metrics
from tlcli.model import calibration, head


@dataclass
class MultiLabelFit(head.HeadFit):
    """``head.HeadFit`` of the sigmoid head (kernel [d, L], bias [L]; ``l2`` and ``epochs`` the
    median and largest over labels), with each label's ``thresholds`` [L], its L2 and epochs,
    and ``oof_probs`` [images, L]: each training photo's out-of-fold probabilities (NaN for a
    label whose cross-validation left the photo out), ``oof_rows`` the photos' indices."""

    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    label_l2: list = field(default_factory=list)
    label_epochs: list = field(default_factory=list)


def sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def targets(samples, num_labels: int) -> np.ndarray:
    """float32 [n, L] multi-hot labels of ``samples`` (their ``label_set()``)."""
    return multi_hot([s.label_set() for s in samples], num_labels)


multi_hot = multilabel_metrics.multi_hot


def fit_multilabel(X, Y: np.ndarray, *, groups: np.ndarray | None = None, class_weights: bool = True,
                   on_epoch=None, **options) -> tuple[MultiLabelFit, np.ndarray]:
    """Fit one sigmoid per column of ``Y`` [rows, L] (0/1) on features X [rows, d] (what
    ``head.fit_head`` takes; ``groups`` too: the views of one image). ``class_weights`` balances
    each label's present and absent photos. ``options`` are fit_head's (epochs, l2, seed, ...).
    ``on_epoch(stage, done, total, fits)`` is called once a label is fit ("cross-validation",
    labels done, L) and once at the end ("refit"). Out-of-fold probabilities are per image (the
    rows of a group share one: the mean of their logits, as the mirror-averaging model sees it).
    Returns (the fit, uncalibrated with thresholds 0.5: see ``finish``; the truth [images, L])."""
    Y = np.asarray(Y) > 0.5
    rows, L = Y.shape
    image = np.arange(rows) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    images = int(image.max()) + 1 if rows else 0
    kernel, bias = np.zeros((X.shape[1], L), np.float32), np.zeros(L, np.float32)
    oof = np.full((images, L), np.nan)
    fits = []
    for j in range(L):
        y = Y[:, j].astype(int)
        n1 = int(y.sum())
        weight = {0: rows / (2 * (rows - n1)), 1: rows / (2 * n1)} if class_weights and 0 < n1 < rows else None
        fit = head.fit_head(X, y, 2, class_weight=weight, groups=groups, **options)
        kernel[:, j], bias[j] = fit.kernel[:, 1] - fit.kernel[:, 0], fit.bias[1] - fit.bias[0]
        if len(fit.oof_rows):
            logit = np.log(np.clip(fit.oof_probs[:, 1], 1e-12, 1)) - np.log(np.clip(fit.oof_probs[:, 0], 1e-12, 1))
            sums = np.bincount(image[fit.oof_rows], logit, minlength=images)
            counts = np.bincount(image[fit.oof_rows], minlength=images)
            oof[counts > 0, j] = sigmoid(sums[counts > 0] / counts[counts > 0])
        fits.append(fit)
        if on_epoch is not None:
            on_epoch("cross-validation", j + 1, L, L)
    done = int(max(f.epochs for f in fits))
    if on_epoch is not None:
        on_epoch("refit", 1, done, 1)
    first = np.zeros(images, int)
    first[image[::-1]] = np.arange(rows)[::-1]  # a row of each image, for its labels
    l2s = [float(f.l2) for f in fits]
    return MultiLabelFit(
        kernel=kernel, bias=bias, l2=float(np.median(l2s)), epochs=done,
        cv_loss={lam: float(np.mean([f.cv_loss[lam] for f in fits if lam in f.cv_loss]))
                 for lam in head.L2_GRID if any(lam in f.cv_loss for f in fits)},
        history=_mean_history([f.history for f in fits]), oof_rows=np.arange(images),
        oof_probs=oof.astype(np.float32), thresholds=np.full(L, 0.5, np.float32), label_l2=l2s,
        label_epochs=[int(f.epochs) for f in fits]), Y[first]


def _mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per epoch, the mean over labels of each logged value that the label's fit has then."""
    out = []
    for e in range(max((len(h) for h in histories), default=0)):
        rows = [h[e] for h in histories if e < len(h)]
        keys = sorted({k for r in rows for k in r if k != "epoch"})
        out.append({"epoch": e + 1, **{k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}})
    return out


def finish(fit: MultiLabelFit, truth: np.ndarray, *, calibrate: bool = True) -> tuple[MultiLabelFit, dict]:
    """(``fit`` with each label's temperature folded into its weights (``calibrate``) and each
    label's threshold chosen on the out-of-fold probabilities, what tlcli.json records of the
    calibration): ``truth`` [images, L] are the labels of the fit's images (``fit_multilabel``'s
    second value). A label with fewer than ``calibration.MIN_IMAGES`` out-of-fold photos keeps
    T = 1; one without a positive one keeps threshold 0.5."""
    truth = np.asarray(truth) > 0.5
    probs = fit.oof_probs.astype(np.float64)
    kernel, bias = fit.kernel.copy(), fit.bias.copy()
    temperatures, thresholds = [], []
    for j in range(probs.shape[1]):
        seen = ~np.isnan(probs[:, j])
        p, y = probs[seen, j], truth[seen, j].astype(int)
        t = 1.0
        if calibrate and len(y) >= calibration.MIN_IMAGES and 0 < y.sum() < len(y):
            t = calibration.fit_temperature(np.stack([1 - p, p], axis=1), y)
            p = calibration.scaled(np.stack([1 - p, p], axis=1), t)[:, 1]
            probs[seen, j] = p
            kernel[:, j], bias[j] = kernel[:, j] / t, bias[j] / t
        temperatures.append(round(float(t), 4))
        thresholds.append(multilabel_metrics.best_threshold(p, y))
    info = {"temperatures": temperatures, "images": int(len(truth)),
            "threshold_source": "max F1 per label on out-of-fold probabilities"}
    return dataclasses.replace(fit, kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                               oof_probs=probs.astype(np.float32),
                               thresholds=np.asarray(thresholds, np.float32)), info


def fit_views(views, samples, num_labels: int, **options) -> tuple[MultiLabelFit, np.ndarray]:
    """``fit_multilabel`` on the feature views of ``samples`` (their ``label_set()``), both
    views of an image one group (``head.fit_views``'s rule). Returns (fit, truth [images, L])."""
    X = views.stacked(samples)
    Y, groups = targets(samples, num_labels), None
    if len(X) != len(samples):  # the mirror rows follow
        Y, groups = np.concatenate([Y, Y]), np.tile(np.arange(len(samples)), 2)
    return fit_multilabel(X, Y, groups=groups, **options)


def predict_proba(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *,
                  mirror_features: np.ndarray | None = None) -> np.ndarray:
    """The sigmoid head in numpy: float32 [n, L] per-label probabilities (the mean of both views
    with ``mirror_features``, as the saved classifier does): ``head.predict_proba`` with a sigmoid."""
    return head.predict_proba(features, kernel, bias, mirror_features=mirror_features, activation=sigmoid)


def predict_views(views, samples, fit) -> np.ndarray:
    """The sigmoid head's probabilities [n, L] for ``samples`` from their feature views
    (``head.predict_views`` with a sigmoid)."""
    return head.predict_views(views, samples, fit, activation=sigmoid)


def above(probs: np.ndarray, labels: list[str], thresholds) -> list[dict]:
    """One image's labels at or above their thresholds, as {"label", "probability"}, most
    probable first (ties in label order)."""
    probs = np.asarray(probs)
    order = np.argsort(-probs, kind="stable")
    return [{"label": labels[i], "probability": float(probs[i])} for i in order
            if probs[i] >= float(np.asarray(thresholds)[i])]
