"""What every engine checks in what a model gives back, whatever runs it: a crafted or damaged
model must not pair wrong rows with files, or hand out NaN as a probability."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlcli.errors import BundleError

_FIX = "the bundle is damaged or crafted; retrain it"


def run_error(where: Path, exc: Exception) -> BundleError:
    """The one-line error for a model that failed at run time (a crafted graph's Assert, Reshape ...)."""
    return BundleError(f"{where}: the model failed on a batch of images ({type(exc).__name__}); the bundle "
                       "is damaged or crafted; retrain it")


def checked_probabilities(probs, rows: int, classes: int, where: Path) -> np.ndarray:
    """``probs`` if it is ``rows`` x ``classes`` finite probabilities (in [0, 1], with a margin
    for quantization), as float32. A crafted model could give fewer rows than images (results
    paired with the wrong files), other shapes, NaN or negative values. Raises ``BundleError``."""
    probs = np.asarray(probs)
    if probs.shape != (rows, classes) or not np.issubdtype(probs.dtype, np.number):
        raise BundleError(f"{where}: the model gave {'x'.join(map(str, probs.shape))} values of type {probs.dtype} "
                          f"for {rows} image(s) and {classes} labels, not {rows}x{classes} probabilities; {_FIX}")
    probs = probs.astype(np.float32)
    if not (np.all(np.isfinite(probs)) and np.all(probs >= -0.01) and np.all(probs <= 1.01)):
        raise BundleError(f"{where}: the model gave probabilities that are NaN, infinite or outside [0, 1]; {_FIX}")
    return probs


def checked_scores(scores, rows: int, where: Path) -> np.ndarray:
    """``scores`` if it is ``rows`` finite numbers (one "unknown_score" an image), as float32 [rows].
    Raises ``BundleError``."""
    scores = np.asarray(scores)
    if scores.shape not in ((rows,), (rows, 1)) or not np.issubdtype(scores.dtype, np.number) \
            or not np.all(np.isfinite(scores)):
        raise BundleError(f"{where}: the model gave unknown scores of shape {'x'.join(map(str, scores.shape))} "
                          f"for {rows} image(s), or non-finite ones; {_FIX}")
    return scores.reshape(rows).astype(np.float32)


def checked_outputs(named: dict, rows: int, classes: int, where: Path) -> dict[str, np.ndarray]:
    """The outputs of one batch, found by name (``probabilities``, and ``unknown_score`` when the
    model has it), each checked."""
    out = {"probabilities": checked_probabilities(named["probabilities"], rows, classes, where)}
    if "unknown_score" in named:
        out["unknown_score"] = checked_scores(named["unknown_score"], rows, where)
    return out
