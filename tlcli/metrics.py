"""Classification metrics, computed in one place for ``evaluate`` and the end of ``train``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

BLOCK_ROWS = 65536  # rows of probabilities ``compute`` reads at a time


@dataclass
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Mistake:
    path: str
    true_label: str
    predicted_label: str
    probability: float


@dataclass
class Report:
    """Metrics of predictions ``probs`` [n, k] against integer labels ``y`` [n]."""

    labels: list[str]
    count: int
    accuracy: float
    top_k: int
    top_k_accuracy: float
    loss: float
    per_class: list[ClassMetrics]
    macro: dict
    weighted: dict
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    mistakes: list[Mistake]
    # Calibration: expected calibration error (``CALIBRATION_BINS`` equal-width bins of the top
    # probability), the Brier score (mean squared error of the probability vector), and the
    # reliability rows [bin low, bin high, images, mean top probability, accuracy] of the bins
    # that hold images. (``loss`` is the negative log-likelihood.)
    ece: float = 0.0
    brier: float = 0.0
    reliability: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = dict(d)
        d["per_class"] = [ClassMetrics(**c) for c in d["per_class"]]
        d["mistakes"] = [Mistake(**m) for m in d["mistakes"]]
        return cls(**d)


def compute(y, probs, labels: list[str], *, paths: list[str] | None = None, top_k: int = 5,
            max_mistakes: int = 10) -> Report:
    """Accuracy, top-k accuracy, cross-entropy, per-class P/R/F1, confusion matrix and the most
    confident mistakes. ``y`` int [n]; ``probs`` float [n, len(labels)] (float32 or float64, not
    copied: it is read in blocks of ``BLOCK_ROWS`` rows, so a large validation set needs no more
    than the probabilities themselves)."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs)
    if probs.dtype not in (np.float32, np.float64):
        probs = probs.astype(np.float64)
    probs = probs.reshape(len(y), len(labels))
    k = len(labels)
    n = len(y)
    top_k = max(1, min(top_k, k))
    pred, p_pred = np.zeros(n, np.int64), np.zeros(n)
    hits, log_sum, brier = 0, 0.0, 0.0
    for start in range(0, n, BLOCK_ROWS):
        block, yb = probs[start:start + BLOCK_ROWS].astype(np.float64), y[start:start + BLOCK_ROWS]
        rows = np.arange(len(yb))
        pb = pred[start:start + BLOCK_ROWS] = block.argmax(axis=1)
        p_pred[start:start + BLOCK_ROWS] = block[rows, pb]
        hits += int((np.argsort(-block, axis=1)[:, :top_k] == yb[:, None]).any(axis=1).sum())
        log_sum += float(np.log(np.clip(block[rows, yb], 1e-12, 1.0)).sum())
        brier += float((block ** 2).sum() - 2 * block[rows, yb].sum() + len(yb))  # sum (p - onehot)^2
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    top_k_acc = hits / n if n else 0.0
    loss = -log_sum / n if n else 0.0
    per_class = []
    for c in range(k):
        tp = int(confusion[c, c])
        predicted = int(confusion[:, c].sum())
        support = int(confusion[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassMetrics(labels[c], precision, recall, f1, support))
    supports = np.array([c.support for c in per_class], dtype=np.float64)

    def avg(weights):
        w = weights / weights.sum() if weights.sum() else weights
        return {m: float(sum(getattr(c, m) * wi for c, wi in zip(per_class, w)))
                for m in ("precision", "recall", "f1")}

    mistakes = []
    if paths is not None:
        wrong = np.nonzero(pred != y)[0]
        order = wrong[np.argsort(-p_pred[wrong], kind="stable")][:max_mistakes]
        mistakes = [Mistake(paths[i], labels[y[i]], labels[pred[i]], float(p_pred[i])) for i in order]
    rows = reliability(p_pred, pred == y)
    return Report(labels=list(labels), count=n, accuracy=float(np.mean(pred == y)) if n else 0.0,
                  top_k=top_k, top_k_accuracy=top_k_acc, loss=loss, per_class=per_class,
                  macro=avg(np.ones(k)), weighted=avg(supports), confusion=confusion.tolist(),
                  mistakes=mistakes, ece=calibration_error(rows, n), brier=brier / n if n else 0.0,
                  reliability=rows)


CALIBRATION_BINS = 10


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> list[list]:
    """[low, high, images, mean confidence, accuracy] for each of ``bins`` equal-width bins of
    ``confidence`` (the top probability of each image) that holds an image; ``correct`` [n] bool."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append([b / bins, (b + 1) / bins, int(inside.sum()), float(confidence[inside].mean()),
                         float(correct[inside].mean())])
    return rows


def calibration_error(rows: list[list], n: int) -> float:
    """The expected calibration error of ``reliability``'s rows over ``n`` images: the mean gap
    between confidence and accuracy, each bin weighted by its images."""
    return float(sum(count * abs(conf - acc) for _, _, count, conf, acc in rows) / n) if n else 0.0


def expected_calibration_error(probs, y, bins: int = CALIBRATION_BINS) -> float:
    """ECE of probabilities ``probs`` [n, k] against integer labels ``y`` [n]."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.int64)
    if not len(y):
        return 0.0
    top = probs.argmax(axis=1)
    return calibration_error(reliability(probs.max(axis=1), top == y, bins), len(y))
