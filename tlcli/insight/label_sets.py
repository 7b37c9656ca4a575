"""The audit of a multi-label dataset's labels: a likely *missing* or *extra* label per photo.

The multi-label head's out-of-fold probabilities (``model.multilabel``: each training photo
scored by fits that did not see it) are decided at each label's threshold, chosen as training
chooses it (the largest F1 of that label on those same probabilities: from the training photos
alone). A photo without label j that the out-of-fold fit gives j is suspected of *missing* it; a
photo with j that the fit does not give j, of carrying an *extra* j. Each photo is named once, for
its most suspicious label (score: p_j for a missing label, 1 - p_j for an extra one, so the most
confident disagreements come first), as a ``findings.Mislabel``: the given labels and the
suggested ones, joined by ";".
"""

from __future__ import annotations

import numpy as np

from tlcli.insight.findings import Mislabel
from tlcli.multilabel_metrics import best_threshold

SEPARATOR = ";"


def label_thresholds(probs: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each label's threshold [L] on out-of-fold ``probs`` [n, L] (NaN: not scored) against
    ``truth`` [n, L] (0/1): its largest F1 (``multilabel_metrics.best_threshold``)."""
    seen = ~np.isnan(probs)
    return np.array([best_threshold(probs[seen[:, j], j], truth[seen[:, j], j]) for j in range(probs.shape[1])])


def suspicious(probs: np.ndarray, truth: np.ndarray, cut: np.ndarray) -> list[tuple[int, int, str, float]]:
    """[(row, label, "missing" | "extra", score)], one per suspected photo (its most suspicious
    label, decided at ``cut``: ``label_thresholds(probs, truth)``), most suspicious first; see the
    module docstring."""
    truth = np.asarray(truth) > 0.5
    with np.errstate(invalid="ignore"):
        missing = ~truth & (probs >= cut[None, :])
        extra = truth & (probs < cut[None, :])
    score = np.where(missing, probs, np.where(extra, 1.0 - probs, -1.0))
    score = np.where(np.isnan(score), -1.0, score)
    out = []
    for row in np.nonzero((score >= 0).any(axis=1))[0]:
        j = int(np.argmax(score[row]))
        out.append((int(row), j, "missing" if missing[row, j] else "extra", float(score[row, j])))
    return sorted(out, key=lambda f: -f[3])


def label_findings(views, samples, labels: list[str], *, seed: int = 0) -> tuple[list[Mislabel], dict]:
    """(the ``Mislabel`` findings of ``samples``, the training photos, from their feature views;
    each label's threshold, for the report)."""
    from tlcli.model import multilabel

    fit, truth = multilabel.fit_views(views, samples, len(labels), seed=seed)
    probs = fit.oof_probs.astype(np.float64)
    cut = label_thresholds(probs, truth)
    flagged = []
    for row, j, kind, score in suspicious(probs, truth, cut):
        given = [labels[i] for i in np.nonzero(truth[row])[0]]
        suggested = sorted([*given, labels[j]] if kind == "missing" else [x for x in given if x != labels[j]])
        flagged.append(Mislabel(samples[row].path, SEPARATOR.join(given), SEPARATOR.join(suggested),
                                round(score, 6)))
    return flagged, {"label_threshold": {label: float(v) for label, v in zip(labels, cut)}}
