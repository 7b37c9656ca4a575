"""The report screens: what ``tlcli evaluate``, ``tlcli audit`` and ``tlcli export`` show, as Rich
renderables."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from tlcli.cli.render import kv_table, num, path_cell, pct, safe, skipped_table


def _per_class_table(rep) -> Table:
    pc = Table(title="Per class", title_justify="left")
    pc.add_column("class", overflow="fold")
    for name in ("precision", "recall", "F1", "support"):
        pc.add_column(name, justify="right")
    for c in rep.per_class:
        pc.add_row(safe(c.label), num(c.precision), num(c.recall), num(c.f1), str(c.support),
                   style="dim" if c.support == 0 else None)
    pc.add_section()
    for name, avg in (("macro avg", rep.macro), ("weighted avg", rep.weighted)):
        pc.add_row(name, num(avg["precision"]), num(avg["recall"]), num(avg["f1"]), str(rep.count),
                   style="bold")
    return pc



def _confusion_table(rep) -> Table:
    numbered = len(rep.labels) > 8
    cm = Table(title="Confusion matrix", title_justify="left",
               caption="columns numbered as the rows" if numbered else None, caption_justify="left")
    cm.add_column("true \\ predicted", overflow="fold")
    for j, label in enumerate(rep.labels):
        cm.add_column(str(j) if numbered else safe(label), justify="right", overflow="fold")
    for i, label in enumerate(rep.labels):
        cells = [f"[green]{n}[/]" if i == j and n else f"[red]{n}[/]" if n else "[dim]0[/]"
                 for j, n in enumerate(rep.confusion[i])]
        cm.add_row(safe(f"{i} {label}" if numbered else label), *cells)
    return cm



def _mistakes_table(rep, root=None) -> Table:
    """The most confident mistakes, paths relative to ``root`` (the evaluated DIR) when under it."""
    mt = Table(title=f"Most confident mistakes ({len(rep.mistakes)} shown)", title_justify="left")
    mt.add_column("file", overflow="fold", min_width=20)
    mt.add_column("true", overflow="fold")
    mt.add_column("predicted", overflow="fold")
    mt.add_column("probability", justify="right")
    for m in rep.mistakes:
        mt.add_row(path_cell(_under(m.path, (root,))), safe(m.true_label), safe(m.predicted_label), pct(m.probability))
    return mt



def _multi_label_evaluation(r) -> list:
    """``evaluation`` of a multi-label model: the summary, then per label its threshold,
    precision, recall, F1, average precision and photos."""
    rep = r.report
    t = _evaluated("Evaluation (multi-label)", r)
    t.add_row("subset accuracy", f"{pct(rep.accuracy)} (every label of a photo right)")
    t.add_row("F1", f"micro {num(rep.micro_f1)}, macro {num(rep.macro_f1)}")
    t.add_row("mAP", "no label has a positive photo" if rep.mean_average_precision is None
              else f"{num(rep.mean_average_precision)} (mean average precision over labels)")
    pl = Table(title="Per label", title_justify="left")
    pl.add_column("label", overflow="fold")
    for name in ("thresh.", "precision", "recall", "F1", "AP", "photos"):
        pl.add_column(name, justify="right")
    for m in rep.per_label:
        pl.add_row(safe(m.label), f"{m.threshold:.3f}", num(m.precision), num(m.recall), num(m.f1),
                   "-" if m.average_precision is None else num(m.average_precision), str(m.positives),
                   style="dim" if m.positives == 0 else None)
    mt = Table(title=f"Most confident mistakes ({len(rep.mistakes)} shown)", title_justify="left")
    mt.add_column("file", overflow="fold", min_width=20)
    mt.add_column("labels", overflow="fold")
    mt.add_column("predicted", overflow="fold")
    for m in rep.mistakes:
        mt.add_row(path_cell(_under(m["path"], (r.data_dir,))), safe(", ".join(m["labels"]) or "-"),
                   safe(", ".join(m["predicted"]) or "-"))
    return [t, pl, mt if rep.mistakes else Text("No mistakes.")] + _wrote(r)


def evaluation(r) -> list:
    """The renderables of an ``EvaluateResult``, in order: summary, per class, confusion matrix,
    mistakes, and a 'wrote' line per report file."""
    rep = r.report
    if getattr(rep, "task", None) == "multi_label":
        return _multi_label_evaluation(r)
    t = _evaluated("Evaluation", r)
    t.add_row("accuracy", pct(rep.accuracy))
    t.add_row(f"top-{rep.top_k} accuracy", pct(rep.top_k_accuracy))
    t.add_row("loss", f"{rep.loss:.4f} (cross-entropy: the negative log-likelihood)")
    t.add_row("calibration", f"ECE {rep.ece:.3f} (expected calibration error, {len(rep.reliability)} bins used), "
                             f"Brier {rep.brier:.3f}")
    if r.unknown is not None:
        u = r.unknown
        rest = "none left" if u["accuracy_on_rest"] is None else \
            f"{pct(u['accuracy_on_rest'])} on the other {u['rest']}"
        t.add_row("unknown", f"{u['images']} of {rep.count} ({pct(u['rate'])}) scored above {u['threshold']:.4g}; "
                             f"accuracy {rest}")
    shown = [t, _per_class_table(rep), _confusion_table(rep),
             _mistakes_table(rep, r.data_dir) if rep.mistakes else Text("No mistakes.")]
    return shown + _wrote(r)


def _evaluated(title: str, r) -> Table:
    """The summary table of an ``EvaluateResult``, begun: the model (and engine) and the images."""
    t = kv_table(title)
    t.add_row("model", safe(f"{r.model_dir} (engine {r.engine})"))
    t.add_row("images", safe(f"{r.report.count} in {r.data_dir}"))
    return t


def _wrote(r) -> list:
    """A "wrote" line per file of ``r.files`` (an evaluation's or an audit's report)."""
    return [Text.assemble("wrote ", safe(path)) for path in r.files.values()]

_AUDIT_ACTIONS = {"train_val_leak": "remove the copies from one split",
                  "across_classes": "keep one, with the right label", "exact": "delete the extra copies",
                  "within_class": "delete the extra copies (redundant)"}


def _under(path: str, roots) -> str:
    """``path`` relative to the first of ``roots`` it lies under, else as given."""
    from tlcli.insight.html_report import shown_path

    return next((shown_path(path, root) for root in roots if root and shown_path(path, root) != str(path)), str(path))



def audit(r) -> list:
    """The renderables of an ``audit.AuditResult``: a summary line per kind, the groups of
    near-duplicates, the likely mislabels, the outliers, image sizes and skipped files (the
    progress display has shown the counts per class).
    Paths are shown relative to DIR (or --val-dir) when they lie under it."""
    roots = (r.val_dir, r.data_dir) if r.val_dir else (r.data_dir,)
    counts = r.counts()
    t = kv_table("Audit")
    t.add_row("data", safe(r.data_dir + (f" (val: {r.val_dir})" if r.val_dir else "")))
    for kind in ("train_val_leak", "across_classes", "exact", "within_class"):
        t.add_row(f"duplicates: {kind}", Text(str(counts[kind]), style="red" if counts[kind] else "green"))
    for kind in ("likely_mislabeled", "outliers", "skipped"):
        t.add_row(kind.replace("_", " "), Text(str(counts[kind]), style="yellow" if counts[kind] else "green"))
    t.add_row("imbalance", "-" if r.imbalance is None else f"{r.imbalance:.2f} (largest / smallest class, train)")
    t.add_row("near-duplicate at", f"similarity >= {r.thresholds.get('near_duplicate', float('nan')):.3f}")
    t.add_row("features", f"{r.extracted} extracted, {r.cached} cached")
    t.add_row("time", f"{r.seconds:.1f} s")
    shown = [t]
    if r.near_duplicates:
        d = Table(title=f"Near-duplicate groups ({len(r.near_duplicates)})", title_justify="left")
        for name in ("#", "kind", "similarity", "files (label, split)", "action"):
            d.add_column(name, overflow="fold")
        for i, g in enumerate(r.near_duplicates, 1):
            files = Text("\n").join(safe(f"{_under(p, roots)} ({label}, {split})")
                                     for p, label, split in zip(g.paths, g.labels, g.splits))
            d.add_row(str(i), g.kind, f"{g.similarity:.3f}", files, _AUDIT_ACTIONS[g.kind])
        shown.append(d)
    if r.likely_mislabeled:
        from tlcli.insight.label_noise import note

        m = Table(title=f"Likely mislabels ({len(r.likely_mislabeled)}; "
                        f"{note(r.mislabel_estimate)}), strongest evidence first", title_justify="left")
        for name in ("file", "label", "suggested", "score", "false alarm", "action"):
            m.add_column(name, overflow="fold")
        for x in r.likely_mislabeled:
            m.add_row(path_cell(_under(x.path, roots)), safe(x.label), safe(x.suggested_label), f"{x.score:.3f}",
                      "-" if x.false_alarm is None else f"{x.false_alarm:.0%}",
                      safe(f"review: is it {x.suggested_label}? (keep it if not)"))
        shown.append(m)
    if r.outliers:
        o = Table(title=f"Outliers ({len(r.outliers)}): far from every class; junk, or a class the data lacks",
                  title_justify="left")
        for name in ("file", "label", "score", "action"):
            o.add_column(name, overflow="fold")
        for x in r.outliers:
            o.add_row(path_cell(_under(x.path, roots)), safe(x.label), f"{x.score:.3f}",
                      "look; remove it if it is junk")
        shown.append(o)
    if r.image_stats:
        s = Table(title=f"Image sizes ({r.image_stats['images']} images; "
                        f"{r.image_stats['smaller_than_input']} smaller than the model input)", title_justify="left")
        for name in ("", "min", "median", "max"):
            s.add_column(name, justify="right")
        for name in ("width", "height", "aspect_ratio"):
            v = r.image_stats[name]
            digits = 2 if name == "aspect_ratio" else 0
            s.add_row(name, *(f"{v[k]:.{digits}f}" for k in ("min", "median", "max")))
        shown.append(s)
    if r.skipped:
        shown.append(skipped_table([dict(s, path=_under(s["path"], roots)) for s in r.skipped]))
    return shown + _wrote(r)


# ---- export ----------------------------------------------------------------------------------

FORMAT_NAMES = {"tflite": "TFLite", "onnx": "ONNX", "openvino": "OpenVINO"}


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def export_summary(r) -> Table:
    name = FORMAT_NAMES.get(r.format, r.format)
    t = kv_table(f"{name} export")
    t.add_row("file", path_cell(r.path))
    for extra in r.files[1:]:
        t.add_row("", path_cell(extra))
    t.add_row("labels", f"inside the {Path(r.path).suffix} file" if r.labels_path is None
              else safe(r.labels_path + (f" (also inside the {Path(r.path).suffix})" if r.labels_embedded else "")))
    t.add_row("quantize", safe(r.quantize + (f", {r.io_type} input/output" if r.quantize == "int8" else "")))
    t.add_row("size", _size(r.size_bytes))
    if r.ms_per_image is not None:
        t.add_row("speed", f"{r.ms_per_image:.2f} ms per image (one at a time, this machine)")
    if r.agreement is not None:
        multi = getattr(r, "task", None) == "multi_label"
        t.add_row("label-set agreement" if multi else "top-1 agreement",
                  safe(f"{pct(r.agreement)} on {r.parity_images} {r.parity_data}"))
        t.add_row("largest diff", f"{r.max_abs_diff:.2g} in probability")
        t.add_row("accuracy", f"SavedModel {pct(r.saved_model_accuracy)}, {name} {pct(r.export_accuracy)}"
                  + (" (decisions at the thresholds, against the SavedModel's)" if multi else ""))
        for c in r.per_class:
            shown = (f"SavedModel {pct(c['saved_model_accuracy'])}, {name} {pct(c['export_accuracy'])}"
                     if c["images"] else "no parity images")
            t.add_row(safe(f"  {c['label']}"), safe(f"{shown} ({c['images']} images)"))
        if r.max_accuracy_drop is not None and r.accuracy_drop is not None:
            t.add_row("accuracy gate", f"{r.accuracy_drop:.1f} points below the SavedModel (at most "
                                       f"{r.max_accuracy_drop:g} allowed)")
    else:
        t.add_row("parity", "not measured: no labelled images recorded; pass --data DIR")
    return t


def exports_table(r) -> Table:
    """``export --format all``: one row a format (size, ms per image, agreement, accuracy, largest
    difference), then the formats left out; fits 80 columns."""
    t = Table(title="Exports", title_justify="left", show_edge=False)
    for name, justify in (("format", "left"), ("quantize", "left"), ("size", "right"), ("ms/image", "right"),
                          ("agreement", "right"), ("accuracy", "right"), ("max diff", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    measured = next((x for x in r.results if x.agreement is not None), None)
    if measured is not None:
        t.add_row("SavedModel", "", "", "", "", pct(measured.saved_model_accuracy), "")
    for x in r.results:
        t.add_row(FORMAT_NAMES.get(x.format, x.format), x.quantize, _size(x.size_bytes),
                  "" if x.ms_per_image is None else f"{x.ms_per_image:.2f}",
                  "n/a" if x.agreement is None else pct(x.agreement),
                  "n/a" if x.export_accuracy is None else pct(x.export_accuracy),
                  "n/a" if x.max_abs_diff is None else f"{x.max_abs_diff:.1g}")
    notes = [f"measured on {measured.parity_images} {measured.parity_data}"] if measured is not None else []
    notes += [f"{FORMAT_NAMES.get(s['format'], s['format'])} skipped: {s['reason']}" for s in r.skipped]
    if notes:
        t.caption, t.caption_justify = Text("\n").join(safe(n) for n in notes), "left"
    return t
