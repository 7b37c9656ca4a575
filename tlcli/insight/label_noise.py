"""Likely mislabels from out-of-fold probabilities: confident learning finds the candidates, and
only those that the classifier's own errors do not explain are flagged.

1. **Confident learning** (Northcutt, Jiang and Chuang, JAIR 2021; the method of cleanlab's
   ``find_label_issues`` with ``prune_by_noise_rate``): the threshold t_j of class j is the mean
   probability of j over the images labelled j. An image is *confidently* of class j when
   p_j >= t_j (the most probable such class). The counts of (label i, confident class j), each
   label's row scaled to the images with that label (the calibrated confident joint), estimate
   how many images labelled i are really j; that many images labelled i, those with the largest
   margin p_j - p_i, are the candidates of (i, j). A candidate whose most probable class is its
   own label is dropped.
2. **What the classifier's errors explain.** A classifier that is right 85% of the time gives a
   correct label a low probability now and then; confident learning counts those as label
   errors too. One model of the labels separates the two, fitted by maximum likelihood on all
   the out-of-fold probabilities: the true class ~ softmax(log p / T) (a temperature, as
   ``model.calibration``), and the label is the true class with probability 1 - eps, any other
   class alike with eps. A classifier's own errors are explained by T; only labels that no
   temperature makes probable need eps > 0.
3. **Flag** a candidate when, under that fit, its label is more likely wrong than right:
   P(wrong) = eps/(k-1) (1 - q_y) / (eps/(k-1) (1 - q_y) + (1 - eps) q_y) > 1/2, with q_y the
   calibrated probability of its label. The expected number of false alarms among the flagged is
   the sum of their 1 - P(wrong). Ranked by q_y, the lowest (the strongest evidence) first.
4. **Strong** when "no label is wrong" (eps = 0) is rejected by the likelihood-ratio test at
   ``STRONG_P`` (eps = 0 lies on the boundary: half a chi-square with one degree of freedom).
   ``train`` warns only then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tlcli.model import calibration

MAX_NOISE = 0.5  # the noise rates searched: beyond half, the labels would say little
GRID = 49  # temperatures tried on a log scale over calibration.T_RANGE before refining
STRONG_P = 0.01   # strong: a p-value of "no label is wrong" at most this


@dataclass
class LabelNoise:
    """What the finder concluded on n images. ``flagged``: [(row, suggested class, score, false
    alarm)], strongest evidence first; score = 1 - the calibrated probability of the row's label,
    false alarm = the probability that the label is right after all (1 - P(wrong)).
    ``thresholds``: confident learning's per-class thresholds [k]; ``candidates``: its rows,
    ranked, before step 3; ``cl_errors``: its estimate of the wrong labels (the off-diagonal sum
    of the calibrated confident joint). ``temperature``, ``noise_rate``: the fit of step 2;
    ``p_value``: of "no label is wrong"."""

    flagged: list[tuple[int, int, float, float]]
    thresholds: np.ndarray
    candidates: list[int] = field(default_factory=list)
    cl_errors: float = 0.0
    temperature: float = 1.0
    noise_rate: float = 0.0
    p_value: float = 1.0
    images: int = 0

    @property
    def expected_false_alarms(self) -> float:
        return float(sum(f[3] for f in self.flagged))

    @property
    def strong(self) -> bool:
        """Flags, and "no label is wrong" rejected at ``STRONG_P``."""
        return bool(self.flagged) and self.p_value <= STRONG_P

    def summary(self) -> dict:
        """The figures behind the flags, for JSON: flagged, expected_false_alarms, strong,
        p_value, estimated_errors (noise rate x images), noise_rate, temperature,
        confident_learning_errors, candidates."""
        return {"flagged": len(self.flagged), "expected_false_alarms": round(self.expected_false_alarms, 2),
                "strong": self.strong, "p_value": float(f"{self.p_value:.3g}"),
                "estimated_errors": round(self.noise_rate * self.images, 2), "noise_rate": round(self.noise_rate, 4),
                "temperature": round(self.temperature, 4), "confident_learning_errors": round(self.cl_errors, 2),
                "candidates": len(self.candidates)}


def note(summary: dict) -> str:
    """One phrase on ``LabelNoise.summary()``: the false alarms to expect among the flagged and
    how many wrong labels the fit estimates in all."""
    if not summary:
        return "not looked for"
    return (f"about {summary['expected_false_alarms']:.1f} of the {summary['flagged']} expected to be false "
            f"alarms; about {summary['estimated_errors']:.0f} wrong label(s) estimated in all")


def warning(found: LabelNoise) -> str:
    """``train``'s phrase on a strong finding: the count, and the false alarms expected among it."""
    return (f"{len(found.flagged)} likely mislabeled training image(s) (about "
            f"{found.expected_false_alarms:.1f} of them expected to be false alarms)")


def confident_joint(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-class thresholds [k], the calibrated confident joint [k, k]: rows the labels, columns
    the confident class, each row summing to the images with that label)."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, int)
    k = probs.shape[1]
    counts = np.bincount(y, minlength=k).astype(np.float64)
    t = np.array([probs[y == j, j].mean() if counts[j] else np.inf for j in range(k)])
    above = probs >= t[None, :]
    counted = above.any(axis=1)
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    joint = np.zeros((k, k))
    np.add.at(joint, (y[counted], confident[counted]), 1.0)
    rows = joint.sum(axis=1)
    joint = np.where(rows[:, None] > 0, joint * (counts / np.maximum(rows, 1.0))[:, None], np.diag(counts))
    return t, joint


def prune_by_noise_rate(probs: np.ndarray, y: np.ndarray, joint: np.ndarray) -> dict[int, int]:
    """{row: suggested class}: for each pair (label i, class j != i), the round(joint[i, j])
    images labelled i with the largest p_j - p_i; a row picked for several classes keeps the most
    probable; rows whose most probable class is their label are dropped."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, int)
    k = probs.shape[1]
    suggested: dict[int, int] = {}
    for i, j in zip(*np.nonzero(np.round(joint * (1 - np.eye(k))) >= 1)):
        rows = np.nonzero(y == i)[0]
        margin = probs[rows, j] - probs[rows, i]
        for r in rows[np.argsort(-margin, kind="stable")[:int(round(joint[i, j]))]].tolist():
            if r not in suggested or probs[r, j] > probs[r, suggested[r]]:
                suggested[r] = int(j)
    best = probs.argmax(axis=1)
    return {r: j for r, j in suggested.items() if best[r] != y[r]}


def _own(probs_log: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / t) of each row's label."""
    z = probs_log / t
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z[np.arange(len(y)), y]) / np.exp(z).sum(axis=1)


def _best_noise(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(eps, log-likelihood) maximising sum log(a + eps (b - a)) over eps in [0, MAX_NOISE]
    (concave in eps: bisection on the derivative)."""
    d = b - a
    if (d / a).sum() <= 0:  # the slope at eps = 0 is not positive: no noise fits best
        return 0.0, float(np.log(a).sum())
    lo, hi = 0.0, MAX_NOISE
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (d / (a + mid * d)).sum() > 0 else (lo, mid)
    return lo, float(np.log(a + lo * d).sum())


def noise_fit(probs: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(temperature, noise rate, log-likelihood, that of the best fit without noise) of the
    labels under: label = the true class with probability 1 - eps, else any other class alike;
    the true class ~ softmax(log probs / temperature). Maximum likelihood (golden-section on
    log T, bisection on eps)."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    k = logp.shape[1]

    def profile(log_t: float, noise: bool) -> tuple[float, float]:
        a = np.clip(_own(logp, y, float(np.exp(log_t))), 1e-300, 1.0)
        return _best_noise(a, (1 - a) / (k - 1)) if noise else (0.0, float(np.log(a).sum()))

    out = []
    grid = np.linspace(np.log(calibration.T_RANGE[0]), np.log(calibration.T_RANGE[1]), GRID)
    step = grid[1] - grid[0]
    for noise in (True, False):  # a grid first: with noise the likelihood may have two modes
        best = grid[int(np.argmax([profile(g, noise)[1] for g in grid]))]
        lo, hi = best - step, best + step
        ratio = (np.sqrt(5.0) - 1) / 2
        for _ in range(30):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            if profile(a, noise)[1] > profile(b, noise)[1]:
                hi = b
            else:
                lo = a
        log_t = (lo + hi) / 2
        out.append((float(np.exp(log_t)), *profile(log_t, noise)))
    (t, eps, ll), (_, _, ll0) = out
    return t, eps, ll, ll0


def find(probs: np.ndarray, y: np.ndarray) -> LabelNoise:
    """The likely mislabels of out-of-fold ``probs`` [n, k] (raw: the temperature is fitted
    here) with labels ``y`` [n] (module docstring)."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, int)
    n, k = probs.shape
    temperature, eps, ll, ll0 = noise_fit(probs, y) if n >= calibration.MIN_IMAGES else (1.0, 0.0, 0.0, 0.0)
    q = calibration.scaled(probs, temperature)
    t, joint = confident_joint(q, y)
    suggested = prune_by_noise_rate(q, y, joint)
    own = q[np.arange(n), y]
    wrong = eps / (k - 1) * (1 - own)
    posterior = wrong / np.maximum(wrong + (1 - eps) * own, 1e-300)
    ranked = sorted(suggested, key=lambda r: (own[r], r))
    flagged = [(r, suggested[r], float(1.0 - own[r]), float(1.0 - posterior[r])) for r in ranked
               if posterior[r] > 0.5]
    stat = max(0.0, 2 * (ll - ll0))
    p_value = 0.5 * math.erfc(math.sqrt(stat / 2)) if eps > 0 else 1.0  # half of chi2(1)'s tail
    cl_errors = float((joint * (1 - np.eye(k))).sum())
    return LabelNoise(flagged, t, ranked, cl_errors, temperature, eps, p_value, n)
