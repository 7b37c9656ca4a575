"""``tlcli audit``: the duplicates, train/val leaks, likely mislabels and outliers of a dataset
(``findings``), from the backbone features training computes (same scan, split and feature
cache, so an audit after ``train`` extracts nothing), with its report: ``audit.html``, one CSV per
kind and ``review.csv`` (``review``: the actions to take, chosen on the page or in the file, for
``tlcli train --labels-override``). The audit only reads the images; it never changes them.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tlcli import data
from tlcli.config import DEFAULTS, TrainConfig, validate
from tlcli.errors import UsageError
from tlcli.insight import html_report, label_noise, review
from tlcli.insight.findings import COPY_QUANTILE, FLOOR_QUANTILE, AuditResult, analyse, engine_of
from tlcli.interrupts import sigterm_as_interrupt
from tlcli.progress import Callback, Info, silent

REPORT_HTML = "audit.html"
HTML_FINDINGS = 300  # per kind on the page (each a thumbnail); the CSV files hold every finding
CSV_FILES = {"near_duplicates": "near_duplicates.csv", "likely_mislabeled": "likely_mislabeled.csv",
             "outliers": "outliers.csv"}


def _size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:  # the header only
            return img.size
    except Exception:  # changed since the scan: it simply is not counted
        return None


def image_stats(samples, image_size: int) -> dict:
    """Width, height and aspect ratio (width / height) of ``samples``' files: min, median and max,
    and how many have a shorter side below ``image_size`` (upscaled for the model). Sizes are
    read from the file headers (EXIF orientation not applied)."""
    with ThreadPoolExecutor(8) as pool:
        sizes = [s for s in pool.map(_size, [s.path for s in samples]) if s]
    if not sizes:
        return {}
    w, h = np.array(sizes, float).T
    stats = {name: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
             for name, v in (("width", w), ("height", h), ("aspect_ratio", w / h))}
    return stats | {"images": len(sizes), "smaller_than_input": int((np.minimum(w, h) < image_size).sum())}


def image_size_rows(stats: dict) -> list[list[str]]:
    """The rows of ``image_stats``' table: [name, min, median, max] for the width and height (in
    pixels) and the aspect ratio (width / height, two decimals); [] for empty ``stats``."""
    return [[name.replace("_", " "), *(f"{stats[name][k]:.{2 if name == 'aspect_ratio' else 0}f}"
                                       for k in ("min", "median", "max"))]
            for name in ("width", "height", "aspect_ratio") if name in stats]


_THRESHOLD_MEANINGS = {
    "near_duplicate": "near-duplicates at or above this similarity (cosine, centred features)",
    "copy_similarity": f"edited copies' similarity to their originals ({COPY_QUANTILE:.0%} quantile)",
    "distinct_similarity": f"what distinct training images reach ({FLOOR_QUANTILE:.0%} quantile of the nearest "
                           "other)",
    "calibration_copies": "edited copies made to measure copy_similarity",
    "outlier": "outliers below this similarity to the nearest class centre",
    "outlier_median": "median similarity of the training images to their nearest class centre",
    "outlier_mad": "median absolute deviation of that similarity",
}


def threshold_rows(thresholds: dict) -> list[list[str]]:
    """The rows of ``AuditResult.thresholds``' table: [name, value, meaning], numbers with three
    decimals (counts whole), the per-class mislabel thresholds one row per class."""
    def shown(v):
        return str(v) if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = []
    for name, value in thresholds.items():
        if isinstance(value, dict):
            rows += [[f"{name}: {label}", shown(v),
                      f"{label} is predicted at or above this out-of-fold probability (its largest F1)"
                      if name == "label_threshold" else f"mean probability of {label} over the images labelled {label}"]
                     for label, v in value.items()]
        else:
            rows.append([name, shown(value), _THRESHOLD_MEANINGS.get(name, "")])
    return rows


def audit(data_dir: str | os.PathLike | None = None, *, model_dir: str | os.PathLike | None = None,
          val_dir: str | os.PathLike | None = None,
          val_split: float = DEFAULTS.val_split, seed: int = DEFAULTS.seed, backbone: str = DEFAULTS.backbone,
          image_size: int | None = None, cache_dir: str | os.PathLike | None = None,
          batch_size: int = DEFAULTS.batch_size, max_pixels: int = DEFAULTS.max_pixels, strict: bool = False,
          extractor: str = DEFAULTS.extractor, report_dir: str | os.PathLike | None = None, force: bool = False,
          progress: Callback = silent) -> AuditResult:
    """Audit ``data_dir/<class>/*`` (and ``val_dir``, or the ``val_split`` that ``train`` with the
    same ``seed`` makes; or ``data_dir``'s split folders, train/, val/ and test/, as ``train``
    reads them): scan and split exactly as ``tlcli train`` does, features of the frozen
    ``backbone`` through the same cache, then the findings of the module docstring.
    ``report_dir``: also write ``REPORT_HTML`` (thumbnails side by side) and ``CSV_FILES`` there;
    a folder that is not empty is refused unless ``force``. Never writes into the image folders.
    ``model_dir``: a bundle whose training settings (data folders, split, seed, backbone, image
    size, cache, extractor) are used instead of those options, so the audit sees what that
    training saw; ``data_dir`` then overrides only the folder.
    Raises ``UsageError`` for a bad option, ``DatasetError`` / ``BackboneError`` as ``train``, and
    ``KeyboardInterrupt`` on Ctrl-C or SIGTERM (a report folder it created is removed then)."""
    start = time.perf_counter()
    if model_dir is not None:
        cfg = _trained_config(model_dir, data_dir)
    elif data_dir is None:
        raise UsageError("DIR: give the image folder to audit, or --model BUNDLE to audit what it was trained on")
    else:
        cfg = TrainConfig(data_dir=str(data_dir), val_dir=str(val_dir) if val_dir else None, val_split=val_split,
                          seed=seed, backbone=backbone, image_size=image_size,
                          cache_dir=str(cache_dir) if cache_dir else None, batch_size=batch_size,
                          max_pixels=max_pixels, strict=strict, extractor=extractor, tensorboard=None)
    validate(cfg)
    data.check_folder(cfg.data_dir)
    if cfg.val_dir:
        data.check_folder(cfg.val_dir, "--val-dir")
    data.split_folders(cfg.data_dir, val_dir=cfg.val_dir)  # a --val-dir beside DIR's own val/: refused now
    out_dir, created = None, report_dir is not None and not os.path.lexists(report_dir)
    if report_dir is not None:
        out_dir = html_report.prepare_dir(report_dir, data=[("DIR", cfg.data_dir), ("--val-dir", cfg.val_dir)],
                                          force=force)
    try:
        with sigterm_as_interrupt():
            result = _audit(cfg, out_dir, progress)
    except BaseException:
        if created:
            _remove_report(out_dir)
        raise
    result.seconds = time.perf_counter() - start
    return result


def _remove_report(out_dir: Path) -> None:
    """Remove the report folder an audit that failed had created, with the report files in it; a
    file someone else put there meanwhile keeps it."""
    for name in (*CSV_FILES.values(), review.REVIEW_CSV, REPORT_HTML):
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()
    with contextlib.suppress(OSError):
        out_dir.rmdir()


def _audit(cfg: TrainConfig, out_dir: Path | None, progress: Callback) -> AuditResult:
    from tlcli.model.backbone import fetch, resolve_spec

    spec = resolve_spec(cfg.backbone, cfg.image_size, signature=cfg.backbone_signature, output_key=cfg.backbone_output)
    path = fetch(spec)
    views, splits, extractor, size, key = dataset_features(cfg, spec, path, progress)
    multi = cfg.multi_label or any(s.labels for s in splits.train)
    result = analyse(splits, views.plain, extractor=extractor, image_size=size, max_pixels=cfg.max_pixels,
                      seed=cfg.seed, cache=(cfg.cache_dir, key), progress=progress, mislabels=not multi)
    if multi:  # several labels a photo: a likely missing or extra label, not another class
        from tlcli.insight import label_sets

        result.likely_mislabeled, found = label_sets.label_findings(views, splits.train, splits.labels,
                                                                    seed=cfg.seed)
        result.thresholds |= found
    result.data_dir, result.val_dir = cfg.data_dir, cfg.val_dir
    result.extracted, result.cached = views.extracted, views.cached
    result.image_stats = image_stats(splits.train + splits.val + splits.test, size)
    if out_dir is not None:
        result.files = write_report(result, out_dir)
    return result


def _trained_config(model_dir, data_dir) -> TrainConfig:
    """The TrainConfig of the bundle at ``model_dir`` for an audit (``data_dir`` replacing its
    image folder when given): its backbone as it was resolved, at its image size."""
    from tlcli import bundle

    b = bundle.load(model_dir)
    cfg = TrainConfig.from_dict(b.meta.config)
    trained = b.meta.data  # the folders as absolute paths
    if data_dir is None and not trained.train_dir:
        raise UsageError(f"--model {model_dir}: the bundle does not record the folder it was trained on; "
                         "give that folder as DIR too")
    if b.meta.backbone.parts:
        raise UsageError(f"--model {model_dir}: its backbone concatenates {' and '.join(b.meta.backbone.parts)}, "
                         "which audit does not run; audit DIR with one of them as --backbone")
    root = str(Path(trained.train_dir).parent) if trained.test_dir else None  # split folders
    return cfg.replace(data_dir=str(data_dir) if data_dir is not None else root or trained.train_dir,
                       val_dir=None if root and data_dir is None else trained.val_dir if data_dir is None
                       else cfg.val_dir,
                       backbone=b.meta.backbone.handle, image_size=b.image_size, tensorboard=None, resume=False,
                       fine_tune=False)


def dataset_features(cfg: TrainConfig, spec, path: str, progress: Callback = silent):
    """(plain feature views of train + val + test, data.Splits, what embeds images, image size, cache
    key): the scan, split, engine (``--extractor``) and cache key of ``training.train``, so that
    its cached features are found."""
    from tlcli import features
    from tlcli.model import backbone

    loaded = backbone.load(spec, path=path)
    splits = data.scan_splits(cfg, image_size=loaded.image_size, progress=progress)
    key = backbone.cache_key(spec, loaded.image_size)
    views, extractor, runner = features.frozen_views(loaded, spec, splits.train + splits.val + splits.test,
                                                     cache_key=key, cfg=cfg, progress=progress)
    progress(Info(f"features: {views.extracted} extracted, {views.cached} from cache"))
    embed, key = engine_of(views.engine, (extractor, runner), key)
    return views, splits, embed, loaded.image_size, key


def _sizes_note(stats: dict) -> str:
    if not stats:
        return ""
    return (f"{stats['images']} images, {stats['smaller_than_input']} of them smaller than the model input "
            "(upscaled). Read from the file headers.")


def write_report(result: AuditResult, out_dir) -> dict[str, str]:
    """``REPORT_HTML``, the ``CSV_FILES`` of ``result`` and ``review.REVIEW_CSV`` in ``out_dir``;
    returns {name: path}. Paths in the page are shown relative to DIR (or --val-dir) when under
    it; each image on it has the review's action picker. Raises ``TlcliError``."""
    out_dir = Path(out_dir)
    roots = [r for r in (result.val_dir, result.data_dir) if r]

    def rel(path):
        return next((html_report.shown_path(path, r) for r in roots
                     if html_report.shown_path(path, r) != str(path)), str(path))

    written = {}
    written[CSV_FILES["near_duplicates"]] = html_report.write_csv(
        out_dir / CSV_FILES["near_duplicates"], ("group", "kind", "similarity", "path", "label", "split"),
        [(g, d.kind, f"{d.similarity:.6f}", p, label, split) for g, d in enumerate(result.near_duplicates, 1)
         for p, label, split in zip(d.paths, d.labels, d.splits)])
    written[CSV_FILES["likely_mislabeled"]] = html_report.write_csv(
        out_dir / CSV_FILES["likely_mislabeled"], ("path", "label", "suggested_label", "score", "false_alarm"),
        [(m.path, m.label, m.suggested_label, f"{m.score:.6f}", "" if m.false_alarm is None else f"{m.false_alarm:.6f}")
         for m in result.likely_mislabeled])
    written[CSV_FILES["outliers"]] = html_report.write_csv(
        out_dir / CSV_FILES["outliers"], ("path", "label", "score"),
        [(o.path, o.label, f"{o.score:.6f}") for o in result.outliers])
    rows = review.review_rows(result)
    written[review.REVIEW_CSV] = review.write_csv(rows, out_dir / review.REVIEW_CSV)
    controls = review.Controls(rows, result.labels)

    def card(path, lines):  # an image with the review's action picker under it
        return html_report.Card(path, lines, control=controls.control(path))

    Section = html_report.Section
    sections = [
        Section("Near-duplicates", "Each row is one group: identical files, or the same photo resized, "
                "recompressed, cropped or mirrored. train_val_leak inflates the validation accuracy; "
                "across_classes means conflicting labels; within_class is redundant.",
                [[card(p, [f"{d.kind} ({d.similarity:.3f})", f"{label} / {split}", rel(p)])
                  for p, label, split in zip(d.paths, d.labels, d.splits)]
                 for d in result.near_duplicates[:HTML_FINDINGS]]),
        Section("Likely mislabels", f"Out-of-fold, the head found the label more likely wrong than right, "
                f"beyond what its own errors explain; {label_noise.note(result.mislabel_estimate)}. Review each "
                "one: change a label only when the image itself shows it is wrong.",
                [[card(m.path, [f"{m.label} -> {m.suggested_label}", f"score {m.score:.3f}"
                                + ("" if m.false_alarm is None else f", false alarm {m.false_alarm:.0%}"), rel(m.path)])
                  for m in result.likely_mislabeled[:HTML_FINDINGS]]]),
        Section("Outliers", "Far from every class: junk, placeholders, or a class the dataset lacks.",
                [[card(o.path, [o.label, f"score {o.score:.3f}", rel(o.path)])
                  for o in result.outliers[:HTML_FINDINGS]]]),
        Section("Images per class", "", header=["class", *result.class_counts],
                rows=[[label, *(counts.get(label, 0) for counts in result.class_counts.values())]
                      for label in result.class_counts["train"]]),
        Section("Image sizes", _sizes_note(result.image_stats), header=["", "min", "median", "max"],
                rows=image_size_rows(result.image_stats)),
        Section("Skipped files", "", header=["file", "reason"],
                rows=[[rel(s["path"]), s["reason"]] for s in result.skipped]),
        Section("Thresholds", "Each finding was judged against these values, measured on the training images.",
                header=["name", "value", "meaning"], rows=threshold_rows(result.thresholds)),
    ]
    counts = result.counts()
    summary = [f"{result.data_dir}" + (f" (val: {result.val_dir})" if result.val_dir else ""),
               ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()),
               f"At most {HTML_FINDINGS} findings of each kind are shown, most suspicious first; the CSV files "
               "beside this page list every one."]
    review_page = {"toolbar": controls.toolbar, "script": controls.script} if rows else {}
    written[REPORT_HTML] = html_report.write_page(out_dir / REPORT_HTML, "tlcli audit", summary, sections,
                                                  **review_page)
    return {name: str(p) for name, p in written.items()}
