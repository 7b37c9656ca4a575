"""Weight averaging of fine-tuning's epoch checkpoints: a greedy soup kept only where the holdout
agrees.

Checkpoints of one fine-tuning run start from the same weights and stay in one basin of the loss,
so their average is itself a good model, often better than any one of them. The soup starts from
the checkpoint with the best holdout loss and adds the others in order of their loss, each only
when the holdout loss of the new average is no worse: the result is never worse on the holdout
than the best single checkpoint. BatchNorm's statistics are frozen during fine-tuning, so every
checkpoint has the same ones and the average needs no recalibration.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Checkpoints kept in memory for the soup (the best ones by holdout loss): a soup rarely takes
# more, and each is a full copy of the model's weights.
MAX_INGREDIENTS = 5


def keep_best(ingredients: list[tuple[float, list[np.ndarray]]], loss: float, weights: list[np.ndarray],
              *, limit: int = MAX_INGREDIENTS) -> None:
    """Add (``loss``, ``weights``) to ``ingredients`` in place, keeping only the ``limit`` of
    lowest loss (a NaN loss is never kept)."""
    if not np.isfinite(loss):
        return
    ingredients.append((float(loss), weights))
    ingredients.sort(key=lambda item: item[0])
    del ingredients[limit:]


def average(members: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The element-wise mean of several weight lists (same shapes); non-float arrays (counters)
    are taken from the first."""
    out = []
    for arrays in zip(*members):
        first = arrays[0]
        if np.issubdtype(first.dtype, np.floating):
            out.append((np.sum([a.astype(np.float64) for a in arrays], axis=0) / len(arrays)).astype(first.dtype))
        else:
            out.append(first)
    return out


def greedy_soup(ingredients: list[tuple[float, list[np.ndarray]]], evaluate: Callable[[list[np.ndarray]], float],
                *, keep_going: Callable[[], bool] = lambda: True) -> tuple[list[np.ndarray], float, list[int]]:
    """(weights, their holdout loss, the indices of ``ingredients`` averaged into them).
    ``ingredients``: (holdout loss, weights) pairs, never empty; ``evaluate(weights)`` returns
    the holdout loss of a candidate average. Tries each ingredient once, in order of loss, while
    ``keep_going()`` (the time budget); keeps it when the average's loss is no worse."""
    order = sorted(range(len(ingredients)), key=lambda i: ingredients[i][0])
    members = [order[0]]
    best_loss, best = ingredients[order[0]][0], ingredients[order[0]][1]
    for i in order[1:]:
        if not keep_going():
            break
        trial = average([ingredients[j][1] for j in members] + [ingredients[i][1]])
        loss = float(evaluate(trial))
        if loss <= best_loss:
            members.append(i)
            best_loss, best = loss, trial
    return best, best_loss, members
