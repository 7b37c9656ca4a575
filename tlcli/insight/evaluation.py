"""Evaluate a bundle on a labelled folder: the same ``metrics.compute`` as the end of training,
plus an optional report folder with ``confusion_matrix.png``, ``reliability.png``, ``mistakes.csv`` and
``mistakes.html``."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tlcli import bundle as bundles
from tlcli import data, files, metrics
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    EVALUATE_ENGINE,
    EVALUATE_MISTAKES,
    EVALUATE_OVERLAYS,
    EVALUATE_TOP_K,
)
from tlcli.deploy import inference
from tlcli.errors import DatasetError, UsageError
from tlcli.progress import Advance, Callback, End, Skipped, Start, Warn, counter, silent

CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
MISTAKES_CSV = "mistakes.csv"
MISTAKES_HTML = "mistakes.html"
SALIENCY_DIR = "saliency"  # the overlays of the mistakes shown in MISTAKES_HTML
PR_CURVES_PNG = "pr_curves.png"  # a multi-label model's report: one precision-recall curve per label
HTML_MISTAKES = 200  # the most confident mistakes shown in MISTAKES_HTML (mistakes.csv has every one)
MISTAKES_COLUMNS = ("path", "true_label", "predicted_label", "probability")


@dataclass
class EvaluateResult:
    """``report`` holds the metrics (``report.mistakes``: the ``max_mistakes`` most confident);
    ``skipped`` the files that could not be used ({"path", "reason", "detail"}); ``warnings``
    e.g. model labels without a folder; ``files`` the report files written, by name."""

    model_dir: str
    data_dir: str
    engine: str
    report: metrics.Report  # of a multi-label model: a multilabel_metrics.MultiLabelReport
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # With the bundle's unknown detector (and its threshold not off): {"threshold", "images" called
    # unknown, "rate", "rest" (the other images), "accuracy_on_rest" (None when none is left)}.
    unknown: dict | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["unknown"] is None:
            del out["unknown"]  # as before the detector, for a bundle without one
        return out


def write_mistakes(mistakes: list[metrics.Mistake], path: str | os.PathLike) -> Path:
    """CSV with a header ``path,true_label,predicted_label,probability``, most confident first,
    cells that start like a formula marked as text (``html_report.csv_cell``), written atomically
    (``files.write_atomic``). Raises ``OSError``."""
    from tlcli.insight import html_report

    path = Path(path)
    files.write_atomic(path, html_report.csv_bytes(MISTAKES_COLUMNS, [
        [m.path, m.true_label, m.predicted_label, f"{m.probability:.6f}"] for m in mistakes]))
    return path


def class_rows(report: metrics.Report) -> list[list[str]]:
    """[label, precision, recall, F1, support] per class, then the macro and weighted averages
    (support: every image); the scores with three decimals."""
    def scores(d):
        return [f"{d['precision']:.3f}", f"{d['recall']:.3f}", f"{d['f1']:.3f}"]

    rows = [[c.label, *scores(asdict(c)), str(c.support)] for c in report.per_class]
    return rows + [[f"{name} avg", *scores(avg), str(report.count)]
                   for name, avg in (("macro", report.macro), ("weighted", report.weighted))]


def write_mistakes_page(mistakes: list[metrics.Mistake], path: str | os.PathLike, *, data_dir, model_dir,
                        report: metrics.Report, overlays: dict[str, tuple[Path, str]] | None = None) -> Path:
    """``html_report``'s page of an evaluation: the per-class table of ``report`` (``class_rows``),
    then the most confident ``mistakes`` (at most ``HTML_MISTAKES``), each image with its true and
    predicted label and a link to the full image, paths shown relative to ``data_dir``; beside
    it its saliency overlay when ``overlays`` ({path: (overlay file, label explained)}) has one.
    Raises ``TlcliError``."""
    from tlcli.insight import html_report

    shown = mistakes[:HTML_MISTAKES]
    overlays = overlays or {}
    cards = [html_report.Card(m.path, [f"true {m.true_label}, predicted {m.predicted_label}",
                                       f"probability {100 * m.probability:.1f}%",
                                       html_report.shown_path(m.path, data_dir)]
                              + ([f"right: what drove '{overlays[m.path][1]}'"] if m.path in overlays else []),
                              overlay=str(overlays[m.path][0]) if m.path in overlays else None) for m in shown]
    sections = [html_report.Section("Per class", "Precision: of the images predicted as the class, the share that "
                                    "are; recall: of the images of the class, the share found; F1: their harmonic "
                                    "mean; support: the images of the class.",
                                    header=["class", "precision", "recall", "F1", "support"], rows=class_rows(report)),
                html_report.Section(f"Most confident mistakes ({len(shown)} of {len(mistakes)})",
                                    "A confident mistake is often a wrong label rather than a wrong model. "
                                    + (f"Beside the {len(overlays)} most confident, the saliency map of the guess: the "
                                       "brighter, the more those pixels raised it." if overlays else ""), [cards])]
    return html_report.write_page(path, "tlcli evaluate", [f"model {model_dir} on {data_dir}",
                                                           f"accuracy {100 * report.accuracy:.1f}%"], sections)


def _write_report(out_dir: Path, report: metrics.Report, every_mistake, *, data_dir, b: bundles.Bundle,
                  overlays: int, max_pixels: int, engine, progress: Callback) -> dict[str, str]:
    """The report files in ``out_dir`` (see ``evaluate``), by name. Raises ``TlcliError``, ``OSError``."""
    from tlcli.insight import plots

    written = {CONFUSION_PNG: str(plots.confusion_matrix(report, out_dir / CONFUSION_PNG)),
               RELIABILITY_PNG: str(plots.reliability_diagram(report, out_dir / RELIABILITY_PNG)),
               MISTAKES_CSV: str(write_mistakes(every_mistake, out_dir / MISTAKES_CSV))}
    explained = _overlays([m.path for m in every_mistake[:min(overlays, HTML_MISTAKES)]], out_dir / SALIENCY_DIR,
                          b=b, max_pixels=max_pixels, engine=engine, progress=progress)
    if explained:
        written[SALIENCY_DIR] = str(out_dir / SALIENCY_DIR)
    written[MISTAKES_HTML] = str(write_mistakes_page(every_mistake, out_dir / MISTAKES_HTML, data_dir=data_dir,
                                                     model_dir=b.path, report=report, overlays=explained))
    return written


def _overlays(paths: list[str], out_dir: Path, *, b: bundles.Bundle, max_pixels: int, engine,
              progress: Callback) -> dict[str, tuple[Path, str]]:
    """``saliency.write_overlays`` of ``paths`` (through ``engine`` when it is the SavedModel's),
    or nothing (with a ``Warn``) for a bundle without its SavedModel, whose gradients the maps
    need."""
    from tlcli.deploy import saliency

    if not paths:
        return {}
    if not saliency.can_explain(b):
        progress(Warn(f"--model {b.path}: no {saliency.SAVED_MODEL_FILE}, so no saliency overlays in the report"))
        return {}
    return saliency.write_overlays(paths, out_dir, bundle=b, max_pixels=max_pixels, progress=progress,
                                   engine=engine if isinstance(engine, inference.TFEngine) else None)


def _coverage_warnings(counts: dict[str, int], data_dir, n_labels: int) -> list[str]:
    """What the evaluation folder lacks: labels without a folder, classes with few images."""
    missing = [label for label, n in counts.items() if n == 0]
    warnings = []
    if missing:
        warnings.append(f"{len(missing)} of the model's {n_labels} labels have no folder in {data_dir}: "
                        f"{', '.join(missing)}; they have support 0 and count as 0 in the macro averages "
                        "(the weighted averages are unaffected)")
    return warnings + [f"class '{label}' has only {n} image(s) in {data_dir}; its metrics are noisy"
                       for label, n in counts.items() if 0 < n < data.FEW_IMAGES]


def _check_options(*, top_k: int, max_mistakes: int, overlays: int, batch_size: int, engine: str) -> None:
    """Raise ``UsageError`` for an option of ``evaluate`` that cannot work."""
    inference.check_top_k(top_k)
    for option, value, least in (("--mistakes", max_mistakes, 0), ("--overlays", overlays, 0),
                                 ("--batch-size", batch_size, 1)):
        if value < least:
            raise UsageError(f"{option} {value}: must be >= {least}")
    inference.check_engine(engine)


def _report_folder(report_dir, data_dir, *, force: bool) -> Path | None:
    """``evaluate``'s report folder, checked and made (``html_report.prepare_dir``); None without one."""
    if report_dir is None:
        return None
    from tlcli.insight import html_report

    return html_report.prepare_dir(report_dir, data=[("DIR", data_dir)], force=force)


def evaluate(data_dir: str | os.PathLike, *, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR,
             engine: str = EVALUATE_ENGINE, top_k: int = EVALUATE_TOP_K,
             report_dir: str | os.PathLike | None = None, max_mistakes: int = EVALUATE_MISTAKES,
             batch_size: int = 32, max_pixels: int | None = None, force: bool = False,
             overlays: int = EVALUATE_OVERLAYS, threshold: float | None = None,
             unknown_threshold: float | str | None = None, progress: Callback = silent) -> EvaluateResult:
    """Score every image of ``data_dir/<label>/...`` with the bundle and compute the metrics
    with ``metrics.compute``, exactly as training does for ``metrics.val`` in ``tlcli.json``.

    ``engine``: tf (the SavedModel), tflite, onnx or openvino (the bundle's exported file, e.g. to
    check a quantized export) or auto (``inference.resolve_engine``). ``report_dir``: also write
    ``confusion_matrix.png``, ``mistakes.csv`` (all mistakes, most confident first) and
    ``mistakes.html`` (the most confident, with thumbnails) there, and beside the ``overlays``
    most confident of those a saliency overlay (``deploy.saliency``, from the SavedModel, whatever
    ``engine``), written into its ``saliency`` folder; as ``audit``'s, a folder that is not empty
    (an old report, the user's files) is refused (``OutputExistsError``) unless ``force``, and then
    only the report's files are replaced.

    Folders are matched to the bundle's labels by name: a folder that is not a label raises
    ``DatasetError``; a label with no folder is allowed (evaluating on some classes only) and
    named in ``warnings``: its support is 0, so it counts as 0 in the macro averages. Unusable
    files are skipped and listed in ``skipped``, as in training. With the bundle's unknown
    detector, ``unknown`` counts the images it calls unknown and the accuracy on the rest (the
    metrics themselves cover every image); ``unknown_threshold`` as ``predict``'s. Raises
    ``BundleError`` for a missing or corrupt bundle (or exported file) and ``UsageError`` for a
    bad option (or extra).
    A multi-label bundle: see ``_multi_label_result`` (``threshold``: for every label).
    """
    _check_options(top_k=top_k, max_mistakes=max_mistakes, overlays=overlays, batch_size=batch_size, engine=engine)
    start = time.perf_counter()
    b = bundles.load(model_dir)
    cuts = inference.thresholds(b, threshold)
    inference.unknown_threshold_for(b, unknown_threshold)  # a bad option fails before the scan
    max_pixels = max_pixels or b.max_pixels
    out_dir = _report_folder(report_dir, data_dir, force=force)
    kind = inference.resolve_engine(b, engine)
    eng = None
    if kind != "tf":  # cheap to open, and a missing exported file should fail before the scan
        eng = inference.open_engine(b, kind)

    folder = data.scan(data_dir, image_size=b.image_size, labels=b.labels, max_pixels=max_pixels,
                       progress=counter(progress, "scan"))
    skipped = [s.to_dict() for s in folder.skipped]
    warnings = _coverage_warnings(folder.counts(), data_dir, len(b.labels))
    for w in warnings:
        progress(Warn(w))
    if eng is None:
        eng = inference.open_engine(b, kind)
    unknown_cut = inference.unknown_threshold_for(b, unknown_threshold, eng)
    probs, paths, ys, unknown = _predict_all(folder.samples, b, eng, batch_size=batch_size, max_pixels=max_pixels,
                                             multi_label=cuts is not None, unknown_cut=unknown_cut,
                                             skipped=skipped, progress=progress)
    if not ys:
        raise DatasetError(f"DIR {data_dir}: no usable image to evaluate")
    if skipped:
        progress(Skipped(skipped))
    if cuts is not None:
        return _multi_label_result(b, data_dir, eng.name, ys, probs, paths, cuts, out_dir, skipped=skipped,
                                   warnings=warnings, max_mistakes=max_mistakes, start=start)
    # All mistakes for mistakes.csv; the report keeps the most confident max_mistakes, which is
    # what compute(max_mistakes=...) returns, since the order is the same.
    report = metrics.compute(ys, probs, b.labels, paths=paths, top_k=top_k, max_mistakes=len(ys))
    every_mistake = report.mistakes
    report = dataclasses.replace(report, mistakes=every_mistake[:max_mistakes])
    files = {} if out_dir is None else _write_report(out_dir, report, every_mistake, data_dir=data_dir, b=b,
                                                     overlays=overlays, max_pixels=max_pixels, engine=eng,
                                                     progress=progress)
    return EvaluateResult(model_dir=str(b.path), data_dir=str(data_dir), engine=eng.name, report=report,
                          skipped=skipped, warnings=warnings, files=files,
                          seconds=time.perf_counter() - start,
                          unknown=unknown_summary(probs, ys, unknown, unknown_cut))


def _predict_all(samples, b, eng, *, batch_size: int, max_pixels: int, multi_label: bool, unknown_cut,
                 skipped: list, progress: Callback) -> tuple[np.ndarray, list, list, list[bool]]:
    """(probabilities [n, labels], paths, labels (label sets of a multi-label bundle), called
    unknown) of the ``samples`` the engine could read; a file that changed after the scan is added
    to ``skipped``."""
    paths, ys, unknown = [], [], []
    probs = np.empty((len(samples), len(b.labels)), np.float32)  # one float32 row an image, filled in place
    progress(Start("evaluate", total=len(samples)))
    for i, (pred, row) in enumerate(inference.iter_predict([s.path for s in samples], bundle=b, engine=eng,
                                                           top_k=1, batch_size=batch_size, max_pixels=max_pixels,
                                                           unknown_threshold=unknown_cut)):
        if row is None:  # the file changed after the scan
            skipped.append({"path": pred.path, "reason": "unreadable at prediction", "detail": pred.error})
        else:
            probs[len(ys)] = row
            unknown.append(bool(pred.unknown))
            paths.append(pred.path)
            ys.append(samples[i].label_set() if multi_label else samples[i].label)
        progress(Advance("evaluate", completed=i + 1, total=len(samples)))
    progress(End("evaluate", completed=len(samples), total=len(samples)))
    return probs[:len(ys)], paths, ys, unknown


def unknown_summary(probs: np.ndarray, ys: list[int], unknown: list[bool], threshold: float | None) -> dict | None:
    """How many images the detector calls unknown and the accuracy on the others (None with no
    threshold, or with it off)."""
    if threshold is None or threshold == float("inf"):
        return None
    called = np.asarray(unknown, bool)
    rest = ~called
    right = probs.argmax(axis=1) == np.asarray(ys)
    return {"threshold": threshold, "images": int(called.sum()), "rate": float(called.mean()),
            "rest": int(rest.sum()), "accuracy_on_rest": float(right[rest].mean()) if rest.any() else None}


def _multi_label_result(b, data_dir, engine: str, label_sets, probs, paths, cuts, out_dir, *, skipped, warnings,
                        max_mistakes: int, start: float) -> EvaluateResult:
    """``evaluate``'s result for a multi-label bundle, scored on a labels CSV with a ``labels``
    column (or class folders: one label a photo): ``multilabel_metrics.compute`` at ``cuts`` (its
    thresholds, or evaluate's ``threshold`` for every label), and ``pr_curves.png`` in ``out_dir``
    (when given)."""
    from tlcli import multilabel_metrics

    truth = multilabel_metrics.multi_hot(label_sets, len(b.labels))
    report = multilabel_metrics.compute(truth, probs, b.labels, cuts, paths=paths, mistakes=max_mistakes)
    written = {}
    if out_dir is not None:
        from tlcli.insight import plots

        written[PR_CURVES_PNG] = str(plots.pr_curves(truth, probs, b.labels, cuts, out_dir / PR_CURVES_PNG))
    return EvaluateResult(model_dir=str(b.path), data_dir=str(data_dir), engine=engine, report=report,
                          skipped=skipped, warnings=warnings, files=written, seconds=time.perf_counter() - start)
