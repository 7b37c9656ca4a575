"""Choosing a backbone on the user's data: the head cross-validated on each candidate's features.

``leaderboard`` takes the features of the same training images from each candidate backbone and
fits the head (``head.fit_head``, its own cross-validation of L2 and epochs) on each; every
candidate is scored on the same folds (the same labels and seed give the same folds), by the
out-of-fold predictions of the fits that did not see an image. ``ranked`` orders the standings:
higher CV accuracy first, then lower CV loss (the finer measure on the same predictions), then
the faster extraction. ``verdict`` says, in one sentence, why the first one won.

Concatenating two backbones' features (``concatenated``) is one more candidate; the caller keeps
it only when it ranks first, i.e. when cross-validation says it is better than either alone.
Pure numpy: no TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tlcli.errors import UsageError
from tlcli.model import head


@dataclass
class Standing:
    """One candidate's result: ``cv_accuracy`` and ``cv_loss`` (mean log loss) of the head's
    out-of-fold predictions on ``cv_images`` training images; ``ms_per_image`` the measured
    extraction time (None when not measured), ``feature_dim`` and ``image_size`` its features'
    size and input; ``parts``: the backbones it runs (two for a concatenation)."""

    name: str
    parts: list[str]
    cv_accuracy: float
    cv_loss: float
    cv_images: int
    feature_dim: int
    image_size: int
    ms_per_image: float | None = None

    @property
    def is_concat(self) -> bool:
        return len(self.parts) > 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """A backbone's features of the training images, row i for image i: ``features`` [n, d]."""

    name: str
    features: np.ndarray
    image_size: int
    ms_per_image: float | None = None
    parts: list[str] = field(default_factory=list)


def cross_validate(features: np.ndarray, y, num_classes: int, **head_options) -> tuple[float, float, int]:
    """(accuracy, mean log loss, images scored) of the head's out-of-fold predictions on
    ``features`` [n, d] with labels ``y`` [n]; ``head_options`` are ``head.fit_head``'s (not
    ``fixed_epochs``). Raises ``UsageError`` when the images are too few to cross-validate."""
    y = np.asarray(y, int)
    fit = head.fit_head(features, y, num_classes, **head_options)
    if not len(fit.oof_rows):
        raise UsageError("--backbone: choosing among candidates needs at least 2 training images of every "
                         "class to cross-validate; give one backbone")
    truth = y[fit.oof_rows % len(y)]
    probs = fit.oof_probs.astype(np.float64)
    accuracy = float((probs.argmax(axis=1) == truth).mean())
    loss = float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0)).mean())
    return accuracy, loss, len(truth)


def leaderboard(candidates: list[Candidate], y, num_classes: int, **head_options) -> list[Standing]:
    """Every candidate's ``Standing`` (``cross_validate`` on its features), ``ranked``."""
    standings = []
    for c in candidates:
        accuracy, loss, n = cross_validate(c.features, y, num_classes, **head_options)
        standings.append(Standing(c.name, list(c.parts or [c.name]), accuracy, loss, n, int(c.features.shape[1]),
                                  c.image_size, c.ms_per_image))
    return ranked(standings)


def ranked(standings: list[Standing]) -> list[Standing]:
    """Best first: higher CV accuracy, then (a concatenation last among equals: it costs both
    extractions) lower CV loss, then faster extraction (unmeasured last)."""
    return sorted(standings, key=lambda s: (-s.cv_accuracy, s.is_concat, s.cv_loss,
                                            s.ms_per_image if s.ms_per_image is not None else np.inf))


def concatenated(a: Candidate, b: Candidate) -> Candidate | None:
    """The candidate of ``a``'s and ``b``'s features side by side, or None when their input
    sizes differ (one model input cannot feed both)."""
    if a.image_size != b.image_size:
        return None
    ms = None if a.ms_per_image is None or b.ms_per_image is None else a.ms_per_image + b.ms_per_image
    return Candidate(f"{a.name} + {b.name}", np.hstack([np.asarray(a.features, np.float32),
                                                        np.asarray(b.features, np.float32)]),
                     a.image_size, ms, [*(a.parts or [a.name]), *(b.parts or [b.name])])


def verdict(standings: list[Standing]) -> str:
    """Why ``standings[0]`` (``ranked``) won, in one sentence: against the best other single
    backbone, and why a concatenation that did not win was not kept."""
    best = standings[0]
    if len(standings) == 1:
        return f"{best.name} is the only candidate"
    rival = next((s for s in standings[1:] if not s.is_concat), standings[1])
    if best.cv_accuracy > rival.cv_accuracy:
        why = f"the highest CV accuracy, {best.cv_accuracy:.4f} against {rival.name}'s {rival.cv_accuracy:.4f}"
    elif best.cv_loss < rival.cv_loss:
        why = (f"the same CV accuracy as {rival.name} ({best.cv_accuracy:.4f}) and a lower CV loss "
               f"({best.cv_loss:.3f} against {rival.cv_loss:.3f})")
    else:
        why = f"CV accuracy and loss equal to {rival.name}'s, and the faster extraction"
    pair = next((s for s in standings[1:] if s.is_concat), None)
    if pair is not None:
        why += (f"; {pair.name} ({pair.cv_accuracy:.4f}) not kept: no higher CV accuracy, for running "
                f"{len(pair.parts)} backbones")
    return f"{best.name}: {why}"
