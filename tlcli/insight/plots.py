"""Charts as PNG files: the confusion matrix of an evaluation and the training curves of a bundle.

matplotlib is imported inside the functions (it costs about a second), and only its object API is
used (``Figure`` rendered by the Agg canvas): no pyplot, so the caller's global backend and any
open figures are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from tlcli.metrics import Report

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


def _phase_rows(rows: list[dict]) -> list[dict]:
    """A phase's rows up to its last trained epoch. The head's validation numbers come from its
    cross-validation folds, which run ``patience`` epochs past the epoch count they choose; the
    head itself is then fit for only that count, so those epochs have no train numbers."""
    trained = [int(r["epoch"]) for r in rows if r.get("loss") is not None or r.get("accuracy") is not None]
    return [r for r in rows if int(r["epoch"]) <= max(trained)] if trained else rows


def _validation_name(phase: str) -> str:
    return "validation (cross-validation folds)" if phase.startswith("head") else "validation (holdout)"


def curves_figure(history: dict[str, list[dict]], *, dpi: int = 100):
    """The ``matplotlib.figure.Figure`` of ``training_curves``: one column per phase (its own
    epoch axis, so a short phase is as readable as a long one), loss above accuracy (each row
    sharing its y axis, so the phases compare), train solid and validation dashed in the phase's
    colour, and one legend below every plot."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    phases = {phase: _phase_rows(rows) for phase, rows in history.items() if rows}
    columns = max(1, len(phases))
    fig = Figure(figsize=(max(9.0, 1.0 + 4.0 * columns), 6.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(2, columns, sharey="row", squeeze=False)
    if not phases:
        for ax in axes[:, 0]:
            ax.text(0.5, 0.5, "no epochs recorded", transform=ax.transAxes, ha="center", va="center")
    for column, (phase, rows) in enumerate(phases.items()):
        last = max(int(r["epoch"]) for r in rows)
        for ax, metric in zip(axes[:, column], ("loss", "accuracy")):
            for key, style, name in ((metric, "-", "train"), (f"val_{metric}", "--", _validation_name(phase))):
                points = [(int(r["epoch"]), r[key]) for r in rows if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=f"C{column}", marker="o" if style == "-" else "s",
                            markersize=3 if len(xs) < 40 else 0, linewidth=1.5, label=f"{phase}: {name}")
            ax.set_xlim(0.5, last + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0, column].set_title(f"{phase} ({last} epoch{'s' if last != 1 else ''})", fontsize=10)
        axes[1, column].set_xlabel("epoch")
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylim(-0.02, 1.02)
    # One entry per line of a phase (loss and accuracy share them), a legend column per phase.
    handles = list({h.get_label(): h for ax in axes.T.flat for h in ax.get_lines()}.values())
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=8)
    fig.suptitle("Training curves" + (" (phases in training order, left to right)" if columns > 1 else ""))
    return fig


def training_curves(history: dict[str, list[dict]], path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write the loss and accuracy of every phase against its epochs (``curves_figure``).

    ``history`` is ``{phase: [{"epoch": 1, "loss": .., "accuracy": .., "val_loss": ..,
    "val_accuracy": ..}, ...]}`` in training order, as recorded in ``tlcli.json``. Validation
    numbers come from the training images only: the head's are the mean over cross-validation
    folds, fine-tuning's are on the holdout. Raises ``OSError``."""
    path = Path(path)
    curves_figure(history, dpi=dpi).savefig(path, format="png")
    return path


def reliability_diagram(report: Report, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write the reliability diagram of ``report``: per bin of the top probability, the accuracy
    against the mean confidence (on the diagonal when calibrated), with each bin's images as
    bars below, and the expected calibration error in the title."""
    from matplotlib.figure import Figure

    rows = report.reliability
    fig = Figure(figsize=(5.5, 6.0), dpi=dpi, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="calibrated")
    centres = [(lo + hi) / 2 for lo, hi, *_ in rows]
    top.bar(centres, [acc for *_, acc in rows], width=1 / 10 * 0.9, color="#4878d0", alpha=0.8, label="accuracy")
    top.plot([conf for *_, conf, _ in rows], [acc for *_, acc in rows], "o", color="#d65f5f",
             label="mean confidence, accuracy")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
            title=f"Reliability: ECE {report.ece:.3f} over {report.count} images")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [count for _, _, count, *_ in rows], width=1 / 10 * 0.9, color="#888888")
    bottom.set(xlabel="top probability", ylabel="images")
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def pr_curves(truth, probs, labels: list[str], thresholds, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write one precision-recall curve per label of a multi-label evaluation (``truth`` [n, L]
    0/1, ``probs`` [n, L]), each with its average precision in the legend and a dot where its
    threshold puts it; a label with no positive photo has no curve (named in the legend)."""
    import numpy as np
    from matplotlib.figure import Figure

    from tlcli import multilabel_metrics as mm

    truth, probs = np.asarray(truth) > 0.5, np.asarray(probs, np.float64)
    fig = Figure(figsize=(7.5, 6), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        curve = mm.pr_curve(probs[:, j], truth[:, j])
        if curve is None:
            ax.plot([], [], label=f"{_short(label)} (no positive photo)")
            continue
        precision, recall = curve
        ap = mm.curve_area(precision, recall)
        line, = ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="post",
                        label=f"{_short(label)} (AP {ap:.3f})")
        predicted = probs[:, j] >= thresholds[j]
        if predicted.any():
            hit = (predicted & truth[:, j]).sum()
            ax.plot([hit / truth[:, j].sum()], [hit / predicted.sum()], "o", color=line.get_color())
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per label (dot: the label's threshold)")
    if len(labels) <= 20:
        ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, format="png")
    return Path(path)
