"""What tlcli shows: the summary tables, the progress display, ``safe`` escaping and paths that
wrap after a "/" (``path_cell``); the evaluate and audit screens are in ``reports``.

The functions take library results and return Rich renderables; ``app`` prints them. Only the
``tlcli.cli`` package imports Rich, and everything is readable at 80 columns: no table cuts a
label or a number, and a progress row keeps its count, rate and times.
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


def _escape(match: re.Match) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def safe(text, style: str = "") -> Text:
    """``text`` (a path, a label, a message naming them) ready to print: a ``Text``, so never read
    as markup, with each character that could move the cursor, retitle the window or reorder what
    is shown written as a visible escape (ESC as \\x1b, a newline as \\n, U+2028 as \\u2028)."""
    return Text(_UNSAFE.sub(_escape, str(text)), style=style)


def _cuts(text: str, width: int) -> list[int]:
    """Where to break ``text`` into lines of at most ``width`` cells: after a "/" when one is in
    reach, else (a part longer than the width) within the part."""
    cuts, start, last = [], 0, 0
    for end in [i + 1 for i, c in enumerate(text) if c == "/"] + [len(text)]:
        if end - start > width and last > start:
            cuts.append(last)
            start = last
        while end - start > width:
            start += width
            cuts.append(start)
        last = end
    return [c for c in cuts if 0 < c < len(text)]


class PathText(Text):
    """A path that wraps after a "/" rather than within a name (``path``)."""

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        parts = [p for p in re.split(r"(?<=/)", self.plain) if p] or [""]
        return Measurement(min(max(map(len, parts)), options.max_width), min(self.cell_len, options.max_width))

    def wrap(self, console, width, **kwargs):
        from rich.containers import Lines

        lines = Lines()
        for line in self.split("\n", allow_blank=True):
            lines.extend(line.divide(_cuts(line.plain, max(1, width))))
        return lines


def path_cell(text, style: str = "") -> PathText:
    """A file or folder path for a table cell: escaped like ``safe``, wrapped after a "/"."""
    return PathText(_UNSAFE.sub(_escape, str(text)), style=style)


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


def num(x) -> str:
    return f"{x:.3f}"


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _epoch_info(task: str, logs: dict) -> str:
    """An epoch's metrics in a few characters. The held-out part is named for what it is: the
    head's cross-validation folds (``cv``) or fine-tuning's holdout, never "val" (that is the
    validation split, reported once training ends)."""
    held = "holdout" if task.startswith("fine-tune") else "cv"
    shown = [f"loss {logs['loss']:.3f}"] if "loss" in logs else []
    if "val_accuracy" in logs:
        shown.append(f"{held} {100 * logs['val_accuracy']:.1f}%")
    return "  ".join(shown)


def _rate(done: int, seconds: float) -> str:
    """Steps per second (images/s for the image tasks), or seconds per step when slower than one
    a second; "" before a rate means anything."""
    if seconds <= 0.5 or not done:
        return ""
    return f"{done / seconds:.1f}/s" if done >= seconds else f"{seconds / done:.0f}s each"


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
            case Info(message) if not self.quiet:  # soft_wrap: never a line break inside a hint
                self.console.print(safe(message, style="dim"), soft_wrap=True)
            case Warn(message):
                self.console.print(Text.assemble(("warning: ", "yellow"), safe(message)), soft_wrap=True)
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
        from rich.table import Column

        # At 80 columns the count, rate, elapsed time and ETA always fit (60 cells); an epoch's
        # metrics get what is left, and are shortened with an ellipsis rather than pushing the
        # numbers off the line.
        bar = [BarColumn(bar_width=10)] if console.width >= 100 else []  # below 100 columns: numbers first
        self.bar = RichProgress(TextColumn("{task.description}", table_column=Column(min_width=10, no_wrap=True)),
                                *bar, MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}", table_column=Column(min_width=7, no_wrap=True)),
                                TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}",
                                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                console=console, disable=quiet, transient=False, expand=True)
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
                self.tasks[e.task] = self.bar.add_task(e.task, total=e.total, completed=e.completed, info="",
                                                       rate="")
        elif e.task in self.tasks:
            task = self.tasks[e.task]
            info = _epoch_info(e.task, e.logs) if isinstance(e, Epoch) else ""
            fields = {"info": info} if info else {}
            self.bar.update(task, completed=e.completed, total=e.total, **fields)
            shown = next(t for t in self.bar.tasks if t.id == task)
            self.bar.update(task, rate=_rate(shown.completed, shown.elapsed or 0.0))


class LogProgress(_Display):
    """Plain lines for a log file or CI, where a bar cannot redraw: ``extract 64/245 0:00:03
    21.3/s`` (task, steps done of total, time since the task started, steps per second, the last
    epoch's metrics), at most one line per task every ``interval`` seconds, and always the line
    of a task's end."""

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
            self.info[e.task] = _epoch_info(e.task, e.logs)
        if not self.quiet and (isinstance(e, End) or now - self.printed[e.task] >= self.interval):
            self.printed[e.task] = now
            done = f"{e.completed}/{e.total}" if e.total is not None else str(e.completed)
            seconds = now - self.started[e.task]
            line = " ".join(filter(None, (e.task, done, _elapsed(seconds), _rate(e.completed, seconds))))
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
        t.add_row(path_cell(s["path"]), safe(s["reason"] + (f" ({s['detail']})" if s.get("detail") else "")))
    rest = Counter(s["reason"] for s in skipped[SKIPPED_ROWS:])
    if rest:
        counts = ", ".join(f"{n} {reason}" for reason, n in rest.most_common())
        t.add_row(f"... and {len(skipped) - SKIPPED_ROWS} more", safe(counts))
    return t


def train_summary(result, *, tensorboard: str | None) -> Table:
    t = kv_table("Training summary")
    kind = " subset" if getattr(result, "task", None) == "multi_label" else ""  # every label of a photo right
    t.add_row(f"train{kind} accuracy", pct(result.train_accuracy))
    t.add_row(f"val{kind} accuracy", pct(result.val_accuracy))
    if result.test_accuracy is not None:
        t.add_row("test accuracy", f"{pct(result.test_accuracy)} on {sum(result.test_counts.values())} test images "
                  "(the final report)")
    cal = result.calibration
    if cal and cal.get("oof_ece_before") is not None:
        t.add_row("calibration", f"temperature {cal['temperature']:.2f} folded into the head (held-out "
                                 f"calibration error {cal['oof_ece_before']:.3f} -> {cal['oof_ece_after']:.3f})")
    if result.unknown:
        u = result.unknown
        t.add_row("unknown", f"score threshold {u['threshold']:.4g}: {pct(u['oof_rate'])} of the held-out training "
                             f"photos above it (target {pct(u['target_rate'])})")
    epochs = f"head {result.head_epochs}"
    if result.fine_tune_epochs:
        epochs += f", fine-tune {result.fine_tune_epochs}"
        if result.fine_tune_improved is False:
            epochs += " (undone: the holdout loss never improved, the starting backbone was kept)"
    t.add_row("epochs", epochs)
    plan = result.plan
    if plan:
        planned = f"fine-tune {plan['epochs']} epochs at {plan['image_size']} px" if plan["fine_tune"] else "head only"
        t.add_row("time budget", f"{plan['budget_s']:g} s; planned {planned}, about {plan['estimated_s']:.0f} s")
    if result.test_time_augmentation:
        t.add_row("test-time views", safe(result.test_time_augmentation["summary"]))
    t.add_row("features", f"{result.extracted} extracted, {result.cached} cached"
              + (" (backbone passes, mirror views included)" if result.mirror else ""))
    t.add_row("skipped files", str(len(result.skipped)))
    o = result.labels_override
    if o:
        t.add_row("labels override", f"{o['relabelled']} relabelled, {o['dropped']} dropped, {o['kept']} kept "
                  f"(no file changed); sha256 {o['sha256'][:16]}")
        t.add_row("review file", path_cell(o["file"]))
    t.add_row("strategy", safe(result.strategy))
    t.add_row("time", f"{result.seconds:.1f} s")
    if result.extracted_by_worker:
        t.add_row("workers", f"this is worker {result.worker} of {len(result.extracted_by_worker)}; extracted by "
                  f"each: {', '.join(map(str, result.extracted_by_worker))}")
    if result.model_dir is None:  # a cluster's other worker: the chief writes the bundle
        t.add_row("model", "written by the chief (worker 0)")
        return t
    t.add_row("model", path_cell(result.model_dir))
    t.add_row("curves", path_cell(Path(result.model_dir) / "training_curves.png"))
    if tensorboard:
        t.add_row("tensorboard", safe(f"tensorboard --logdir {Path(result.model_dir) / tensorboard}"))
    return t


def choice_table(choice: dict) -> Table:
    """The leaderboard of ``--backbone A,B`` / ``auto`` (``choice.BackboneChoice.to_dict``), best
    first, with why the winner won and the notes below."""
    t = Table(title="Backbone choice (head cross-validated on the training images)", title_justify="left",
              caption=Text("\n").join([safe(f"kept {choice['reason']}"),
                                        *(safe(n, "dim") for n in choice.get("notes", []))]),
              caption_justify="left")
    t.add_column("backbone", overflow="fold")
    for header in ("CV acc", "CV loss", "ms/img", "features"):
        t.add_column(header, justify="right")
    for i, c in enumerate(choice["candidates"]):
        ms = "-" if c.get("ms_per_image") is None else f"{c['ms_per_image']:.3g}"
        t.add_row(safe(c["name"], "bold" if i == 0 else ""), pct(c["cv_accuracy"]), f"{c['cv_loss']:.3f}", ms,
                  str(c["feature_dim"]))
    return t


def _ranked(p) -> list[str]:
    if p.labels is not None:  # a multi-label model: the labels at or above their thresholds
        shown = [f"{q['label']} {100 * q['probability']:.1f}%" for q in p.predictions if q["label"] in p.labels]
        return shown or ["no label above its threshold"]
    return [f"{q['label']} {100 * q['probability']:.1f}%" for q in p.predictions]


def predictions_table(engine: str, columns: int, predictions, width: int = 80) -> Table:
    """The table of ``predictions`` (``inference.Prediction``): each file with its ``columns``
    ranked classes, or its error in red; ``unknown`` above them, dimmed, for a photo the model's
    unknown detector calls so. When the ranks do not fit ``width`` side by side beside
    the file (24 cells), they are stacked in one column, one per line, so that no label or number
    is ever cut."""
    cells = max((len(cell) for p in predictions for cell in _ranked(p)), default=0)
    multi = any(p.labels is not None for p in predictions)
    stacked = multi or (columns > 1 and 24 + (cells + 3) * columns > width)
    table = Table(title=f"Predictions ({engine})", title_justify="left")
    # The file keeps some width whatever the other cells hold; an error message folds in "#1".
    table.add_column("file", overflow="fold", min_width=20)
    headers = ["labels"] if multi else [f"top {columns}"] if stacked else [f"#{i + 1}" for i in range(columns)]
    for header in headers:
        table.add_column(header, overflow="fold")
    for p in predictions:
        if p.error:
            table.add_row(path_cell(p.path), safe(p.error.removeprefix(f"{p.path}: "), style="red"))
        else:
            ranked = [safe(cell, style="dim" if p.unknown else "") for cell in _ranked(p)]
            if p.unknown:  # what it most resembles stays below, dimmed
                ranked[0] = Text("\n").join([Text("unknown", style="bold yellow"), ranked[0]])
            table.add_row(path_cell(p.path), *([Text("\n").join(ranked)] if stacked else ranked))
    return table


def models_table(listing) -> Table:
    """A ``models.ModelList``: each preset, its sizes, licence, measured CPU time, and whether
    (and how big) it is cached; the handles are in ``--json``."""
    t = Table(title="Backbone presets", title_justify="left",
              caption=Text.assemble("ms: CPU time per image through LiteRT on the 2-core development machine "
                                    "(-: not measured there). Handles: --json. TF Hub cache: ",
                                    safe(listing.cache_dir)), caption_justify="left")
    t.add_column("name", overflow="fold")
    t.add_column("input", justify="right")
    t.add_column("features", justify="right")
    t.add_column("licence")
    t.add_column("ms", justify="right")
    t.add_column("cached", justify="right")
    for m in listing.models:
        cached = Text(_size(m.size_bytes), style="green") if m.cached else Text("no", style="dim")
        t.add_row(safe(m.name or "-"), str(m.image_size or "-"), str(m.features or "-"), safe(m.licence or "-"),
                  "-" if m.cpu_ms is None else f"{m.cpu_ms:.1f}", cached)
    return t


def fetch_summary(r) -> Table:
    """A ``models.FetchResult``."""
    t = kv_table("Backbone " + ("downloaded" if r.downloaded else "already cached"))
    if r.name:
        t.add_row("name", safe(r.name))
    t.add_row("handle", safe(r.handle))
    t.add_row("path", path_cell(r.path))
    t.add_row("size", _size(r.size_bytes))
    return t


def share_summary(r) -> Table:
    """A ``bundle.share.ShareResult``."""
    t = kv_table("Bundle to share: no absolute path, images relative to their folder")
    t.add_row("path", path_cell(r.path))
    t.add_row("files", str(r.files))
    t.add_row("images", f"{r.images} in splits.json (export --data DIR finds them under DIR)")
    if r.left_out:
        t.add_row("left out", safe(", ".join(r.left_out)))
    return t
