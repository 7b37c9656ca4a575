"""Charts as PNG files: the confusion matrix of an evaluation and the training curves of a bundle.

matplotlib is imported inside the functions (it costs about a second), and only its object API is
used (``Figure`` rendered by the Agg canvas): no pyplot, so the caller's global backend and any
open figures are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlcli.metrics import Report

# Phases that retrain from scratch over the same epochs as another phase are drawn on top of it.
_MAX_LABEL = 22


def _short(label: str) -> str:
    """Cut long labels in the middle: their starts and ends are what tell them apart."""
    if len(label) <= _MAX_LABEL:
        return label
    head = (_MAX_LABEL - 1) // 2
    return label[:head] + "\u2026" + label[-(_MAX_LABEL - 1 - head):]


def confusion_matrix(report: Report, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write the confusion matrix (rows: true label, columns: predicted) with the count in every
    cell. Cells are shaded by the fraction of their true class, so that small classes stay as
    visible as large ones. The figure grows with the number of classes (about 60 px per class at
    the default dpi) so that counts and labels stay readable at 20 classes and beyond."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(report.confusion, dtype=np.int64).reshape(len(report.labels), len(report.labels))
    k = len(report.labels)
    rows = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
    cell = 0.55  # inches
    side = max(4.5, cell * k + 2.8)
    fig = Figure(figsize=(side + 1.0, side), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("fraction of the true class")
    size = 10 if k <= 10 else max(6, 10 - (k - 10) // 4)
    for i in range(k):
        for j in range(k):
            n = int(counts[i, j])
            colour = "white" if fraction[i, j] > 0.55 else ("#b0b0b0" if n == 0 else "black")
            ax.text(j, i, str(n), ha="center", va="center", fontsize=size, color=colour,
                    fontweight="bold" if i == j and n else "normal")
    names = [_short(label) for label in report.labels]
    tilt = k > 4 or max(map(len, names)) > 8
    ax.set_xticks(range(k), names, rotation=45 if tilt else 0, ha="right" if tilt else "center", rotation_mode="anchor",
                  fontsize=max(size, 7))
    ax.set_yticks(range(k), names, fontsize=max(size, 7))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"Confusion matrix: {report.count} images, accuracy {100 * report.accuracy:.1f}%")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def training_curves(history: dict[str, list[dict]], path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write loss and accuracy against epoch, train (solid) and validation (dashed), one colour
    per phase, each phase's span shaded and named.

    ``history`` is ``{phase: [{"epoch": 1, "loss": .., "accuracy": .., "val_loss": ..,
    "val_accuracy": ..}, ...]}`` in training order, as recorded in ``tlcli.json``; phases follow
    one another on the epoch axis. Validation numbers come from the training images only: the
    head's are the mean over cross-validation folds, fine-tuning's are on the holdout."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, 2)
    spans: dict[str, tuple[int, int]] = {}
    end = 0
    for phase, rows in history.items():
        if not rows:
            continue
        epochs = [int(r["epoch"]) for r in rows]
        spans[phase] = (end, end + max(epochs))
        end += max(epochs)
    colours = {phase: f"C{i}" for i, phase in enumerate(spans)}
    shades = ["#f2f2f2", "#e3ecf7"]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for i, phase in enumerate(spans):
            a, b = spans[phase]
            ax.axvspan(a + 0.5, b + 0.5, color=shades[i % 2], zorder=0)
            ax.text((a + b + 1) / 2, 1.0, phase, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=9, color="#404040")
            if i:
                ax.axvline(a + 0.5, color="#808080", linestyle=":", linewidth=1)
        for phase, rows in history.items():
            if phase not in spans:
                continue
            offset = spans[phase][0]
            for key, style, name in ((metric, "-", "train"), (f"val_{metric}", "--", "val (held out)")):
                points = [(offset + int(r["epoch"]), r[key]) for r in rows if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colours[phase], marker="o" if style == "-" else "s",
                            markersize=3 if len(xs) < 40 else 0, linewidth=1.5, label=f"{phase}: {name}")
        ax.set_xlabel("epoch (phases in training order)")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if spans:
            ax.set_xlim(0.5, max(b for _, b in spans.values()) + 0.5)
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no epochs recorded", transform=ax.transAxes, ha="center", va="center")
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    path = Path(path)
    fig.savefig(path, format="png")
    return path
