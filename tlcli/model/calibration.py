"""Calibrated probabilities at no cost at inference: one temperature, fitted on the head's
out-of-fold predictions (each training image scored by a fit that did not see it, so the
training images alone decide it), and folded into the head's weights (kernel and bias divided
by it), so the SavedModel and every export give calibrated probabilities with no new op.

The head trains with label smoothing and a cross-validated L2, which both pull its probabilities
towards the uniform: the temperature undoes that where the held-out evidence says so. Ranking,
and so accuracy, is unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tlcli.metrics import expected_calibration_error

T_RANGE = (0.05, 20.0)  # searched on a log scale; beyond it the held-out data is too thin to say more
MIN_IMAGES = 20         # fewer out-of-fold images than this: keep T = 1


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    return float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in ``T_RANGE`` that minimises the mean negative log-likelihood of
    softmax(log(probs) / T) on labels ``y`` (golden-section search on log T; the loss is
    convex in 1/T). ``probs`` [n, k], rows summing to 1."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    y = np.asarray(y, np.int64)
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, y, np.exp(a)), _nll(logits, y, np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, y, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, y, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def scaled(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log(probs) / t): the probabilities a head divided by ``t`` gives."""
    z = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrate(fit, y_rows: np.ndarray):
    """(``fit`` with its kernel and bias divided by the temperature of its out-of-fold
    probabilities, what ``tlcli.json`` records of it): ``y_rows`` are the labels of
    ``fit.oof_rows``. Without enough out-of-fold images the fit is returned as it is (T = 1)."""
    probs, y = fit.oof_probs, np.asarray(y_rows, np.int64)
    if len(y) < MIN_IMAGES or probs.shape[0] != len(y):
        return fit, {"temperature": 1.0, "images": int(len(y)), "oof_ece_before": None, "oof_ece_after": None}
    t = fit_temperature(probs, y)
    info = {"temperature": round(t, 4), "images": int(len(y)),
            "oof_ece_before": round(expected_calibration_error(probs, y), 4),
            "oof_ece_after": round(expected_calibration_error(scaled(probs, t), y), 4)}
    return dataclasses.replace(fit, kernel=(fit.kernel / t).astype(np.float32),
                               bias=(fit.bias / t).astype(np.float32)), info
