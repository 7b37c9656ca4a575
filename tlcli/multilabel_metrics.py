"""Multi-label metrics, computed in one place for ``evaluate``, the end of ``train`` and the
choice of each label's threshold: a photo may carry any number of labels, the model gives one
independent probability per label, and a label is predicted when its probability reaches the
label's threshold."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def multi_hot(label_sets, num_labels: int) -> np.ndarray:
    """float32 [n, num_labels]: 1 where a photo carries the label (``label_sets``: n sequences of
    label indices)."""
    out = np.zeros((len(label_sets), num_labels), np.float32)
    for i, labels in enumerate(label_sets):
        out[i, list(labels)] = 1.0
    return out


def best_threshold(probs: np.ndarray, truth: np.ndarray, *, default: float = 0.5) -> float:
    """The threshold on one label's probabilities ``probs`` [n] that maximises F1 against
    ``truth`` [n] (0/1), predicting the label when probability >= threshold: halfway between the
    lowest probability predicted and the highest one not predicted (so that it does not sit on a
    training photo). ``default`` when the label has no positive photo (F1 is undefined then)."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth) > 0.5
    positives = int(truth.sum())
    if not positives or not len(probs):
        return default
    p, last, tp, predicted = _ranked_counts(probs, truth)
    f1 = 2 * tp / (predicted + positives)
    at = int(np.argmax(f1))
    cut = np.nonzero(last)[0][at]
    below = p[cut + 1] if cut + 1 < len(p) else 0.0
    return float((p[cut] + below) / 2)


def average_precision(probs: np.ndarray, truth: np.ndarray) -> float | None:
    """The area under one label's precision-recall curve as the mean of the precision at each
    distinct probability, weighted by the recall it adds (photos with equal probabilities are
    ranked together). None when the label has no positive photo."""
    curve = pr_curve(probs, truth)
    return None if curve is None else curve_area(*curve)


def curve_area(precision: np.ndarray, recall: np.ndarray) -> float:
    """The area under a precision-recall curve (``pr_curve``'s): each point's precision weighted
    by the recall it adds."""
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve(probs: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(precision, recall) at each distinct probability of one label, highest first; None when the
    label has no positive photo."""
    probs, truth = np.asarray(probs, np.float64), np.asarray(truth) > 0.5
    positives = int(truth.sum())
    if not positives:
        return None
    _, _, tp, predicted = _ranked_counts(probs, truth)
    return tp / predicted, tp / positives


def _ranked_counts(probs: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(``probs`` sorted highest first; where each run of equal probabilities ends (a cut may
    only fall between distinct probabilities); the true positives and the photos predicted at
    each such cut) of one label's float64 ``probs`` [n] against boolean ``truth`` [n]."""
    order = np.argsort(-probs, kind="stable")
    p, t = probs[order], truth[order]
    last = np.r_[p[1:] != p[:-1], True]
    return p, last, np.cumsum(t)[last], np.arange(1, len(p) + 1)[last]


@dataclass
class LabelMetrics:
    label: str
    positives: int
    threshold: float
    precision: float
    recall: float
    f1: float
    average_precision: float | None


@dataclass
class MultiLabelReport:
    """Metrics of probabilities [n, L] against multi-hot truth [n, L] at per-label thresholds.
    ``accuracy`` is the subset accuracy (every label of a photo right), ``loss`` the mean binary
    cross-entropy per label; ``mean_average_precision`` is over labels with a positive photo."""

    labels: list[str]
    count: int
    accuracy: float
    loss: float
    micro_f1: float
    macro_f1: float
    mean_average_precision: float | None
    per_label: list[LabelMetrics]
    task: str = "multi_label"
    # The photos whose predicted labels differ from their labels, most confident first (with paths).
    mistakes: list[dict] = field(default_factory=list)

    @property
    def subset_accuracy(self) -> float:
        return self.accuracy

    def to_dict(self) -> dict:
        return asdict(self)


def _f1(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0


def compute(truth: np.ndarray, probs: np.ndarray, labels: list[str], thresholds, *,
            paths: list[str] | None = None, mistakes: int = 10) -> MultiLabelReport:
    """The report of ``probs`` [n, L] (float, in [0, 1]) against ``truth`` [n, L] (0/1) with
    label j predicted where probs[:, j] >= thresholds[j]. With ``paths`` the ``mistakes`` photos
    whose predicted label set is most confidently wrong are listed."""
    truth = np.asarray(truth) > 0.5
    probs = np.asarray(probs, np.float64).reshape(len(truth), len(labels))
    thresholds = np.asarray(thresholds, np.float64)
    predicted = probs >= thresholds[None, :]
    tp = (predicted & truth).sum(axis=0)
    fp = (predicted & ~truth).sum(axis=0)
    fn = (~predicted & truth).sum(axis=0)
    per_label = []
    for j, label in enumerate(labels):
        per_label.append(LabelMetrics(
            label, int(truth[:, j].sum()), float(thresholds[j]),
            float(tp[j] / (tp[j] + fp[j])) if tp[j] + fp[j] else 0.0,
            float(tp[j] / (tp[j] + fn[j])) if tp[j] + fn[j] else 0.0,
            _f1(tp[j], fp[j], fn[j]), average_precision(probs[:, j], truth[:, j])))
    aps = [m.average_precision for m in per_label if m.average_precision is not None]
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-np.mean(np.where(truth, np.log(clipped), np.log(1 - clipped)))) if len(truth) else 0.0
    report = MultiLabelReport(
        labels=list(labels), count=len(truth),
        accuracy=float(np.mean((predicted == truth).all(axis=1))) if len(truth) else 0.0, loss=loss,
        micro_f1=_f1(tp.sum(), fp.sum(), fn.sum()), macro_f1=float(np.mean([m.f1 for m in per_label])),
        mean_average_precision=float(np.mean(aps)) if aps else None, per_label=per_label)
    if paths is not None:
        wrong = np.nonzero((predicted != truth).any(axis=1))[0]
        # How confidently wrong: the largest distance past the threshold among its wrong labels.
        margin = np.where(predicted != truth, np.abs(probs - thresholds[None, :]), 0.0).max(axis=1)
        for i in wrong[np.argsort(-margin[wrong], kind="stable")][:mistakes]:
            report.mistakes.append({"path": paths[i], "labels": [labels[j] for j in np.nonzero(truth[i])[0]],
                                    "predicted": [labels[j] for j in np.nonzero(predicted[i])[0]]})
    return report
