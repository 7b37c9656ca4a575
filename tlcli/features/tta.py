"""Test-time augmentation beyond the mirror: the central crop (``classifier.crop_view``) as a
further view of every image, kept only when cross-validation on the training images says the
head predicts better with it.

The crop views are two more feature views, (crop, crop mirror), computed as the plain and
mirror ones are (``compute_views``, stored under ``crop_key``). Since the mean of four views is
the mean of two pairwise means, the views the head sees stay two: plain' = (plain + crop) / 2
and mirror' = (mirror + crop mirror) / 2 (``averaged``), as the saved classifier averages them
(``classifier.build_classifier(crop=True)``).

The decision (``decide``): the head is scored on the training images' views with and without
the crop views (the same options, hence the same folds), each image scored by a fit that did not
see it, on its views' mean features as the saved model would score it: out of fold, or, after
fine-tuning that kept its new weights, on the fine-tuning holdout with the head fit on the rest
(the backbone trained on the rest, which would flatter their out-of-fold losses). The crop views
are kept when the paired per-image log losses are lower with them by more than ``GATE_Z``
standard errors of the differences (``gate``), fine-tuning's holdout rule.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from tlcli.features.views import FeatureViews
from tlcli.model.classifier import CROP_FRACTION, GATE_Z, significantly_better

CROP_KEY = "-crop"  # the crop views' store keys: backbone.cache_key + this (+ "-mirror")


def crop_key(cache_key: str) -> str:
    """The ``cache_key`` under which ``compute_views`` stores the crop views of ``cache_key``'s."""
    return f"{cache_key}{CROP_KEY}"


@dataclass
class Decision:
    """What a run decided about the crop views (tlcli.json's ``test_time_augmentation``):
    ``views`` the saved model averages when ``kept``; the mean out-of-fold log loss per training
    image ``without`` and ``with_crop`` them over ``images`` images, ``se`` the standard error of
    their paired differences (None where not measured); ``reason`` in one line; ``extracted``
    and ``cached``: the crop views' vectors through the backbone and from the cache."""

    views: list[str]
    kept: bool
    reason: str
    crop_fraction: float = CROP_FRACTION
    without: float | None = None
    with_crop: float | None = None
    se: float | None = None
    images: int = 0
    extracted: int = 0
    cached: int = 0
    scored_on: str = "CV"  # "CV": out-of-fold on the training images; "holdout": the fine-tuning holdout

    def to_dict(self) -> dict:
        """The fields (floats rounded to 6 places) and ``summary``, ``describe``'s line."""
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        return dict(record, summary=self.describe())

    def describe(self) -> str:
        """One line of at most 60 characters, for the train summary and progress."""
        if self.without is None:
            return f"crop not {'kept' if self.extracted + self.cached else 'tried'}: {self.reason}"
        verdict = "kept" if self.kept else "not kept"
        return f"crop {verdict}: {self.scored_on} loss {self.without:.4f} -> {self.with_crop:.4f} (SE {self.se:.2g})"


def gate(without, with_crop, *, z: float = GATE_Z) -> tuple[bool, float]:
    """(keep the crop views, the standard error of the paired differences): per-image losses
    ``without`` and ``with_crop`` them (same images, same order); kept when the mean loss with
    them is lower by more than ``z`` standard errors (``classifier.significantly_better``)."""
    d = np.asarray(without, np.float64) - np.asarray(with_crop, np.float64)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size >= 2 else float("nan")
    return significantly_better(without, with_crop, z=z), se


def view_names(mirror: bool) -> list[str]:
    """The views the saved model averages with the crop views kept."""
    return ["plain", "mirror", "crop", "crop mirror"] if mirror else ["plain", "crop"]


def skipped(reason: str, *, mirror: bool) -> Decision:
    """The record of a run that did not try the crop views, and why."""
    return Decision(view_names(mirror), kept=False, reason=reason)


def averaged(views: FeatureViews, crop: FeatureViews) -> FeatureViews:
    """The views with the crop views folded in: plain' = (plain + crop) / 2 and, with a mirror
    view, mirror' = (mirror + crop mirror) / 2, float32 arrays in memory (rows of the same
    samples, in order). ``extracted``, ``cached`` and ``engine`` stay ``views``'."""
    def mean(a, b):
        return None if a is None else (np.asarray(a, np.float32) + np.asarray(b, np.float32)) / np.float32(2)

    return FeatureViews(views.samples, mean(views.plain, crop.plain), mean(views.mirror, crop.mirror),
                        views.extracted, views.cached, views.engine)


def rows_of(views: FeatureViews, samples) -> FeatureViews:
    """The views of ``samples`` (a subset of ``views.samples``) alone, as arrays in memory."""
    plain, mirror = views.of(samples)
    return FeatureViews(list(samples), plain, mirror, 0, len(samples), views.engine)


def joined(first: FeatureViews, then: FeatureViews) -> FeatureViews:
    """The views of ``first.samples`` followed by ``then.samples``'s, as arrays in memory."""
    def stack(a, b):
        return None if a is None else np.vstack([np.asarray(a, np.float32), np.asarray(b, np.float32)])

    return FeatureViews(first.samples + then.samples, stack(first.plain, then.plain), stack(first.mirror, then.mirror),
                        first.extracted + then.extracted, first.cached + then.cached, first.engine)


def oof_losses(views: FeatureViews, samples, num_classes: int, **options) -> dict[int, float]:
    """Image index in ``samples`` -> its out-of-fold log loss: the head cross-validated on
    ``views`` (``head.fit_views`` with ``options``) scores each of its views with the fold fit
    that did not see the image, and the image gets the softmax of the mean of its views' logits,
    which for a linear head is the prediction on their mean features (the log probabilities
    differ from the logits by a constant per view, which the softmax ignores). Empty when the
    classes are too small to cross-validate."""
    from tlcli.model import head

    fit = head.fit_views(views, samples, num_classes, **options)
    if not len(fit.oof_rows):
        return {}
    n, k = len(samples), num_classes
    image = fit.oof_rows % n  # the mirror views' rows follow the plain ones
    logp = np.log(np.maximum(fit.oof_probs.astype(np.float64), np.finfo(np.float64).tiny))
    sums, counts = np.zeros((n, k)), np.zeros(n)
    np.add.at(sums, image, logp)
    np.add.at(counts, image, 1)
    seen = np.flatnonzero(counts)
    z = sums[seen] / counts[seen, None]
    z -= z.max(axis=1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = np.array([samples[i].label for i in seen], int)
    return dict(zip(seen.tolist(), (-log_q[np.arange(len(seen)), y]).tolist()))


def holdout_losses(views: FeatureViews, fit_samples, holdout, num_classes: int, **options) -> dict[int, float]:
    """Image index in ``holdout`` -> its log loss under the head fit on ``fit_samples``' views
    (``head.fit_views`` with ``options``), on the mean of its own views."""
    from tlcli.model import head

    fit = head.fit_views(views, fit_samples, num_classes, **options)
    probs = head.predict_views(views, holdout, fit).astype(np.float64)
    y = np.array([s.label for s in holdout], int)
    p = np.maximum(probs[np.arange(len(y)), y], np.finfo(np.float64).tiny)
    return dict(enumerate((-np.log(p)).tolist()))


def decide(views: FeatureViews, crop: FeatureViews, samples, num_classes: int, *, mirror: bool,
           holdout=(), **options) -> Decision:
    """Whether to keep the crop views ``crop`` (rows of the same samples as ``views``), decided on
    the training ``samples`` alone (see the module's docstring); ``options``: ``head.fit_head``'s, as
    the run's head fit uses them. ``holdout``: training images that a fine-tuned backbone did not
    train on; when given, the head is fit on the others and scored on them (the backbone has seen
    the others, so their out-of-fold losses would flatter every view alike), else out of fold."""
    counts = dict(extracted=crop.extracted, cached=crop.cached)
    if holdout:
        paths = {s.path for s in holdout}
        fit_samples = [s for s in samples if s.path not in paths]
        score, what = functools.partial(holdout_losses, fit_samples=fit_samples, holdout=list(holdout)), "holdout"
    else:
        score, what = functools.partial(oof_losses, samples=samples), "CV"
    before = score(views, num_classes=num_classes, **options)
    after = score(averaged(views, crop), num_classes=num_classes, **options)
    common = sorted(set(before) & set(after))
    if len(common) < 2:
        return Decision(view_names(mirror), kept=False, reason="too few images per class to cross-validate",
                        **counts)
    b, a = np.array([before[i] for i in common]), np.array([after[i] for i in common])
    kept, se = gate(b, a)
    reason = f"{what} loss {'' if kept else 'not '}lower by more than {GATE_Z:g} standard errors"
    return Decision(view_names(mirror), kept=kept, reason=reason, without=float(b.mean()), with_crop=float(a.mean()),
                    se=se, images=len(common), scored_on=what, **counts)
