"""Everything tlcli shows: every Rich table, the progress display, and ``safe`` escaping.

The functions take library results and return Rich renderables; ``cli.py`` prints them. Only this
module and ``cli.py`` import Rich.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tlcli.progress import (
    Advance,
    Counts,
    End,
    Epoch,
    Info,
    ProgressEvent,
    Skipped,
    Start,
    Warn,
)

# C0 and C1 control characters, DEL, line and paragraph separators, bidi marks, embeddings,
# overrides and isolates, and lone surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def _escape(match: re.Match) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe(text, style: str = "") -> Text:
    """``text`` (a path, a label, a message naming them) ready to print: a ``Text``, so never read
    as markup, with each character that could move the cursor, retitle the window or reorder what
    is shown written as a visible escape (ESC as \\x1b, a newline as \\n, U+2028 as \\u2028)."""
    return Text(_UNSAFE.sub(_escape, str(text)), style=style)


def error_line(message) -> Text:
    return Text.assemble(("error: ", "bold red"), safe(message))


def note(message, style: str = "dim") -> Text:
    """A one-line remark on stderr (throughput, a count of failures), escaped like everything else."""
    return safe(message, style=style)


def print_json(data: dict, *, indent: int | None = 2) -> None:
    """Standard JSON on stdout, written directly: never through Rich, which would colour it."""
    from tlcli.strict_json import dumps

    sys.stdout.write(dumps(data, indent=indent) + "\n")
    sys.stdout.flush()


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return f"{x:.3f}"


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _epoch_info(logs: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in logs.items() if k in _EPOCH_METRICS)


# ---- progress --------------------------------------------------------------------------------

class _Display:
    """A progress callback: one-off events (info, warning, counts, skipped) become lines and tables
    on ``console``; task events (Start, Advance, Epoch, End) go to ``task_event``."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def task_event(self, e: Start | Advance | Epoch | End) -> None:
        raise NotImplementedError

    def __call__(self, e: ProgressEvent) -> None:
        match e:
            case Start() | Advance() | Epoch() | End():
                self.task_event(e)
            case Info(message) if not self.quiet:
                self.console.print(safe(message, style="dim"))
            case Warn(message):
                self.console.print(Text.assemble(("warning: ", "yellow"), safe(message)))
            case Counts() if not self.quiet:
                self.console.print(counts_table(e.train, e.val, e.test))
            case Skipped(files):
                self.console.print(skipped_table(files))


class BarProgress(_Display):
    """Rich progress bars, for a terminal."""

    def __init__(self, console: Console, quiet: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        super().__init__(console, quiet)
        self.bar = RichProgress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, disable=quiet, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def task_event(self, e) -> None:
        if isinstance(e, Start):
            if e.task in self.tasks:
                self.bar.reset(self.tasks[e.task], total=e.total, completed=e.completed)
            else:
                self.tasks[e.task] = self.bar.add_task(e.task, total=e.total, completed=e.completed, info="")
        elif e.task in self.tasks:
            info = _epoch_info(e.logs) if isinstance(e, Epoch) else ""
            fields = {"info": info} if info else {}
            self.bar.update(self.tasks[e.task], completed=e.completed, total=e.total, **fields)


class LogProgress(_Display):
    """Plain lines for a log file or CI, where a bar cannot redraw: ``extract 64/245 0:00:03``
    (task, steps done of total, time since the task started, the last epoch's metrics), at most
    one line per task every ``interval`` seconds, and always the line of a task's end."""

    def __init__(self, console: Console, quiet: bool = False, *, interval: float = 10.0, clock=time.monotonic):
        super().__init__(console, quiet)
        self.interval = interval
        self.clock = clock
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        self.info: dict[str, str] = {}

    def task_event(self, e) -> None:
        now = self.clock()
        if isinstance(e, Start) or e.task not in self.started:
            self.started[e.task] = self.printed[e.task] = now
            self.info[e.task] = ""
            return
        if isinstance(e, Epoch):
            self.info[e.task] = _epoch_info(e.logs)
        if not self.quiet and (isinstance(e, End) or now - self.printed[e.task] >= self.interval):
            self.printed[e.task] = now
            done = f"{e.completed}/{e.total}" if e.total is not None else str(e.completed)
            line = f"{e.task} {done} {_elapsed(now - self.started[e.task])}"
            if self.info[e.task]:
                line += "  " + self.info[e.task]
            self.console.print(safe(line), highlight=False, soft_wrap=True)


def line_events(console: Console):
    """A progress callback for a command that runs until stopped (``serve``): each Info and Warn
    event is one line, never wrapped, so a script can read the URL from it."""
    def show(e: ProgressEvent) -> None:
        if isinstance(e, Info):
            console.print(safe(e.message, style="dim"), soft_wrap=True, highlight=False)
        elif isinstance(e, Warn):
            console.print(Text.assemble(("warning: ", "yellow"), safe(e.message)), soft_wrap=True, highlight=False)

    return show


def progress_display(console: Console, *, quiet: bool = False) -> _Display:
    """Bars on a terminal, plain timed lines otherwise (a log file, CI, a pipe)."""
    return BarProgress(console, quiet) if console.is_terminal else LogProgress(console, quiet)


# ---- tables ----------------------------------------------------------------------------------

def kv_table(title: str) -> Table:
    """A two-column summary table; add values as ``safe`` text (or constants): a long path folds."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    return t


def counts_table(train: dict, val: dict, test: dict | None = None) -> Table:
    """Images per class of each split; a test column only when there is a test split."""
    t = Table(title="Images per class", title_justify="left")
    t.add_column("class", overflow="fold")
    t.add_column("train", justify="right")
    t.add_column("val", justify="right")
    if test is not None:
        t.add_column("test", justify="right")
    for label, n in train.items():
        t.add_row(safe(label), str(n), str(val.get(label, 0)), *([str(test.get(label, 0))] if test is not None else []))
    return t


SKIPPED_ROWS = 50  # the skipped table lists this many files, then counts the rest by reason


def skipped_table(skipped: list[dict]) -> Table:
    """The first ``SKIPPED_ROWS`` skipped files with their reasons, then one row counting the
    rest by reason (a folder with a million files can skip thousands; all are in --json and
    the bundle's tlcli.json)."""
    from collections import Counter

    t = Table(title=f"Skipped {len(skipped)} unusable file(s)", title_justify="left", title_style="yellow")
    t.add_column("file", overflow="fold", min_width=20)
    t.add_column("reason", overflow="fold")
    for s in skipped[:SKIPPED_ROWS]:
        t.add_row(safe(s["path"]), safe(s["reason"] + (f" ({s['detail']})" if s.get("detail") else "")))
    rest = Counter(s["reason"] for s in skipped[SKIPPED_ROWS:])
    if rest:
        counts = ", ".join(f"{n} {reason}" for reason, n in rest.most_common())
        t.add_row(f"... and {len(skipped) - SKIPPED_ROWS} more", safe(counts))
    return t


def train_summary(result, *, tensorboard: str | None) -> Table:
    t = kv_table("Training summary")
    t.add_row("train accuracy", pct(result.train_accuracy))
    t.add_row("val accuracy", pct(result.val_accuracy))
    if result.test_accuracy is not None:
        t.add_row("test accuracy", f"{pct(result.test_accuracy)} on {sum(result.test_counts.values())} test images "
                  "(the final report)")
    epochs = f"head {result.head_epochs}"
    if result.fine_tune_epochs:
        epochs += f", fine-tune {result.fine_tune_epochs}"
        if result.fine_tune_improved is False:
            epochs += " (undone: the holdout loss never improved, the starting backbone was kept)"
    t.add_row("epochs", epochs)
    t.add_row("features", f"{result.extracted} extracted, {result.cached} cached"
              + (" (backbone passes, mirror views included)" if result.mirror else ""))
    t.add_row("skipped files", str(len(result.skipped)))
    t.add_row("strategy", safe(result.strategy))
    t.add_row("time", f"{result.seconds:.1f} s")
    if result.extracted_by_worker:
        t.add_row("workers", f"this is worker {result.worker} of {len(result.extracted_by_worker)}; extracted by "
                  f"each: {', '.join(map(str, result.extracted_by_worker))}")
    if result.model_dir is None:  # a cluster's other worker: the chief writes the bundle
        t.add_row("model", "written by the chief (worker 0)")
        return t
    t.add_row("model", safe(result.model_dir))
    t.add_row("curves", safe(Path(result.model_dir) / "training_curves.png"))
    if tensorboard:
        t.add_row("tensorboard", safe(f"tensorboard --logdir {Path(result.model_dir) / tensorboard}"))
    return t


def predictions_table(engine: str, columns: int) -> Table:
    """An empty table of predictions; ``columns`` ranked classes per file (no empty columns
    beyond the number of classes). Fill it with ``add_prediction``."""
    table = Table(title=f"Predictions ({engine})", title_justify="left")
    # The file keeps some width whatever the other cells hold; an error message folds in "#1".
    table.add_column("file", overflow="fold", min_width=20)
    for i in range(columns):
        table.add_column(f"#{i + 1}", overflow="fold")
    return table


def add_prediction(table: Table, p) -> None:
    """One ``inference.Prediction`` as a row: its ranked classes, or its error in red."""
    if p.error:
        table.add_row(safe(p.path), safe(p.error.removeprefix(f"{p.path}: "), style="red"))
    else:
        table.add_row(safe(p.path), *[safe(f"{q['label']} {100 * q['probability']:.1f}%") for q in p.predictions])


def export_summary(r) -> Table:
    t = kv_table("TFLite export")
    t.add_row("file", safe(r.path))
    t.add_row("labels", "inside the .tflite" if r.labels_path is None
              else safe(r.labels_path + (" (also inside the .tflite)" if r.labels_embedded else "")))
    t.add_row("quantize", safe(r.quantize + (f", {r.io_type} input/output" if r.quantize == "int8" else "")))
    t.add_row("size", f"{r.size_bytes / 1e6:.2f} MB" if r.size_bytes >= 100_000 else f"{r.size_bytes / 1e3:.1f} kB")
    if r.agreement is not None:
        t.add_row("top-1 agreement", safe(f"{pct(r.agreement)} on {r.parity_images} {r.parity_data}"))
        t.add_row("accuracy", f"SavedModel {pct(r.saved_model_accuracy)}, TFLite {pct(r.tflite_accuracy)}")
        for c in r.per_class:
            shown = (f"SavedModel {pct(c['saved_model_accuracy'])}, TFLite {pct(c['tflite_accuracy'])}"
                     if c["images"] else "no parity images")
            t.add_row(safe(f"  {c['label']}"), safe(f"{shown} ({c['images']} images)"))
        if r.max_accuracy_drop is not None and r.accuracy_drop is not None:
            t.add_row("accuracy gate", f"{r.accuracy_drop:.1f} points below the SavedModel (at most "
                                       f"{r.max_accuracy_drop:g} allowed)")
    else:
        t.add_row("parity", "not measured: no labelled images recorded; pass --data DIR")
    return t


def _per_class_table(rep) -> Table:
    pc = Table(title="Per class", title_justify="left")
    pc.add_column("class", overflow="fold")
    for name in ("precision", "recall", "F1", "support"):
        pc.add_column(name, justify="right")
    for c in rep.per_class:
        pc.add_row(safe(c.label), _num(c.precision), _num(c.recall), _num(c.f1), str(c.support),
                   style="dim" if c.support == 0 else None)
    pc.add_section()
    for name, avg in (("macro avg", rep.macro), ("weighted avg", rep.weighted)):
        pc.add_row(name, _num(avg["precision"]), _num(avg["recall"]), _num(avg["f1"]), str(rep.count),
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
        mt.add_row(safe(_under(m.path, (root,))), safe(m.true_label), safe(m.predicted_label), pct(m.probability))
    return mt


def evaluation(r) -> list:
    """The renderables of an ``EvaluateResult``, in order: summary, per class, confusion matrix,
    mistakes, and a 'wrote' line per report file."""
    rep = r.report
    t = kv_table("Evaluation")
    t.add_row("model", safe(f"{r.model_dir} (engine {r.engine})"))
    t.add_row("images", safe(f"{rep.count} in {r.data_dir}"))
    t.add_row("accuracy", pct(rep.accuracy))
    t.add_row(f"top-{rep.top_k} accuracy", pct(rep.top_k_accuracy))
    t.add_row("loss", f"{rep.loss:.4f} (cross-entropy)")
    shown = [t, _per_class_table(rep), _confusion_table(rep),
             _mistakes_table(rep, r.data_dir) if rep.mistakes else Text("No mistakes.")]
    return shown + [Text.assemble("wrote ", safe(path)) for path in r.files.values()]


def models_table(listing) -> Table:
    """A ``models.ModelList``: each preset, its sizes, and whether (and how big) it is cached."""
    t = Table(title="Backbone presets", title_justify="left",
              caption=Text.assemble("TF Hub cache: ", safe(listing.cache_dir)), caption_justify="left")
    t.add_column("name", overflow="fold")
    t.add_column("input", justify="right")
    t.add_column("features", justify="right")
    t.add_column("cached", justify="right")
    t.add_column("handle", overflow="fold")
    for m in listing.models:
        cached = Text(_size(m.size_bytes), style="green") if m.cached else Text("no", style="dim")
        t.add_row(safe(m.name or "-"), str(m.image_size or "-"), str(m.features or "-"), cached, safe(m.handle))
    return t


def fetch_summary(r) -> Table:
    """A ``models.FetchResult``."""
    t = kv_table("Backbone " + ("downloaded" if r.downloaded else "already cached"))
    if r.name:
        t.add_row("name", safe(r.name))
    t.add_row("handle", safe(r.handle))
    t.add_row("path", safe(r.path))
    t.add_row("size", _size(r.size_bytes))
    return t


# ---- audit -----------------------------------------------------------------------------------

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
        m = Table(title=f"Likely mislabels ({len(r.likely_mislabeled)})", title_justify="left")
        for name in ("file", "label", "suggested", "score", "action"):
            m.add_column(name, overflow="fold")
        for x in r.likely_mislabeled:
            m.add_row(safe(_under(x.path, roots)), safe(x.label), safe(x.suggested_label), f"{x.score:.3f}",
                      safe(f"look; move it to {x.suggested_label} if that is right"))
        shown.append(m)
    if r.outliers:
        o = Table(title=f"Outliers ({len(r.outliers)}): far from every class; junk, or a class the data lacks",
                  title_justify="left")
        for name in ("file", "label", "score", "action"):
            o.add_column(name, overflow="fold")
        for x in r.outliers:
            o.add_row(safe(_under(x.path, roots)), safe(x.label), f"{x.score:.3f}", "look; remove it if it is junk")
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
    return shown + [Text.assemble("wrote ", safe(path)) for path in r.files.values()]
