"""The command line: parse options, call the library, render with Rich. Nothing else lives here.

Exit codes: 0 success; 1 a user error (one line on stderr) or, for predict/evaluate, at least one
input file that could not be used; 2 a bad option; 130 interrupted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tlcli import __version__
from tlcli.config import (DEFAULT_MODEL_DIR, DEFAULTS, EVALUATE_ENGINE, EVALUATE_MISTAKES, EVALUATE_TOP_K,
                          PREDICT_ENGINE, PREDICT_TOP_K, STRATEGIES)
from tlcli.errors import TlcliError, UsageError
from tlcli.presets import DEFAULT_PRESET, PRESETS

app = typer.Typer(help="Transfer learning from TF Hub image feature vectors: train, predict, export, evaluate.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)


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


def fail(exc: TlcliError):
    err.print(Text.assemble(("error: ", "bold red"), safe(exc)), highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def interruptible(command):
    """Ctrl-C anywhere in a command (even inside the TensorFlow import) ends it with one line and
    exit code 130; the library has already left every bundle intact."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"tlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Print the version and exit.")] = None):
    """tlcli: train an image classifier on a folder of photos, predict, and export for serving or phones."""
    global out, err
    # Made when a command runs, not at import, so COLUMNS, NO_COLOR and FORCE_COLOR are read then.
    out, err = Console(), Console(stderr=True)


class Progress:
    """Renders library progress events as Rich progress bars and lines on stderr."""

    def __init__(self, console: Console, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.quiet = quiet
        self.bar = RichProgress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, disable=quiet, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, e) -> None:
        if e.kind == "start":
            if e.task in self.tasks:
                self.bar.reset(self.tasks[e.task], total=e.total, completed=e.completed)
            else:
                self.tasks[e.task] = self.bar.add_task(e.task, total=e.total, completed=e.completed, info="")
        elif e.kind in ("advance", "end", "epoch") and e.task in self.tasks:
            info = ""
            if e.kind == "epoch":
                info = "  ".join(f"{k} {v:.4f}" for k, v in e.logs.items() if k in
                                 ("loss", "accuracy", "val_loss", "val_accuracy"))
            fields = {"info": info} if info else {}
            self.bar.update(self.tasks[e.task], completed=e.completed, total=e.total, **fields)
        elif e.kind == "info" and not self.quiet:
            self.bar.console.print(safe(e.message, style="dim"))
        elif e.kind == "warning":
            self.bar.console.print(Text.assemble(("warning: ", "yellow"), safe(e.message)))
        elif e.kind == "counts" and not self.quiet:
            t = Table(title="Images per class", title_justify="left")
            t.add_column("class", overflow="fold")
            t.add_column("train", justify="right")
            t.add_column("val", justify="right")
            for label, n in e.logs["train"].items():
                t.add_row(safe(label), str(n), str(e.logs["val"].get(label, 0)))
            self.bar.console.print(t)
        elif e.kind == "skipped":
            self.bar.console.print(skipped_table(e.logs["skipped"]))


def skipped_table(skipped: list[dict]) -> Table:
    t = Table(title=f"Skipped {len(skipped)} unusable file(s)", title_justify="left", title_style="yellow")
    t.add_column("file", overflow="fold", min_width=20)
    t.add_column("reason", overflow="fold")
    for s in skipped:
        t.add_row(safe(s["path"]), safe(s["reason"] + (f" ({s['detail']})" if s.get("detail") else "")))
    return t


def _with_progress(fn, *args, quiet: bool = False, **kwargs):
    """Call a library function with a progress display; a TlcliError becomes one line and its
    exit code."""
    try:
        with Progress(err, quiet=quiet) as progress:
            return fn(*args, progress=progress, **kwargs)
    except TlcliError as exc:
        fail(exc)


def _given(ctx: typer.Context, renamed: dict[str, str]) -> set[str]:
    """The parameters set on the command line (not left at their defaults), by library name."""
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") for name in ctx.params}
    return {renamed.get(name, name) for name, source in sources.items() if source not in ("DEFAULT", "DEFAULT_MAP")}


def _print_json(data: dict, *, indent: int | None = 2) -> None:
    """Standard JSON on stdout, written directly: never through Rich, which would colour it."""
    from tlcli.strict_json import dumps

    sys.stdout.write(dumps(data, indent=indent) + "\n")
    sys.stdout.flush()


def _kv_table(title: str) -> Table:
    """A two-column summary table; add values as ``safe`` text (or constants): a long path folds."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    return t


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@app.command()
@interruptible
def train(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Argument(help="Folder with one subfolder of images per class.",
                                             show_default=False)] = None,
    backbone: Annotated[str, typer.Option(help=f"Preset ({', '.join(PRESETS)}), TF Hub / Kaggle https "
                                               "handle, or local SavedModel directory.")] = DEFAULT_PRESET,
    image_size: Annotated[Optional[int], typer.Option(help="Input size; default: the preset's or the "
                                                           "backbone's declared size.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the model bundle.")] = Path(DEFAULT_MODEL_DIR),
    force: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    epochs: Annotated[int, typer.Option(help="Cap on head epochs (one full-batch step each on cached "
                                             "features; early stopping picks the count).")] = DEFAULTS.epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size per replica (feature extraction, "
                                                 "fine-tuning).")] = DEFAULTS.batch_size,
    learning_rate: Annotated[Optional[float], typer.Option(help="Head step size; default: automatic "
                                                               "(1/L, the largest stable step).")] = DEFAULTS.learning_rate,
    l2: Annotated[Optional[float], typer.Option(help="Head L2 strength; default: chosen by "
                                                     "cross-validation on the training images.")] = DEFAULTS.l2,
    seed: Annotated[int, typer.Option(help="Seed for the split, shuffling and initialisation.")] = DEFAULTS.seed,
    val_split: Annotated[float, typer.Option(help="Fraction of each class held out for validation.")] = DEFAULTS.val_split,
    val_dir: Annotated[Optional[Path], typer.Option(help="Explicit validation folder (overrides --val-split).")] = None,
    fine_tune: Annotated[bool, typer.Option(help="After the head, fine-tune the whole backbone.")] = DEFAULTS.fine_tune,
    fine_tune_epochs: Annotated[int, typer.Option(help="Cap on fine-tune epochs.")] = DEFAULTS.fine_tune_epochs,
    fine_tune_learning_rate: Annotated[float, typer.Option(help="Fine-tune learning rate.")] = DEFAULTS.fine_tune_learning_rate,
    fine_tune_micro_batch: Annotated[Optional[int], typer.Option(
        help="Fine-tuning takes each batch's gradient in slices of this many images (same update, less "
             "memory); default: 8 on the CPU, whole batches on a GPU or TPU; 0 = whole batches.",
        show_default=False)] = DEFAULTS.fine_tune_micro_batch,
    mirror: Annotated[Optional[bool], typer.Option(
        "--mirror/--no-mirror", help="Learn from each image and its left-right mirror image, and average "
                                     "both in the model (twice the backbone work per image); default: on "
                                     "with --fine-tune. Turn it off when mirroring changes the class.",
        show_default=False)] = DEFAULTS.mirror,
    class_weights: Annotated[bool, typer.Option(help="Weight classes by inverse frequency.")] = DEFAULTS.class_weights,
    strategy: Annotated[str, typer.Option(help=f"Distribution strategy: {', '.join(STRATEGIES)}.")] = DEFAULTS.strategy,
    strict: Annotated[bool, typer.Option(help="Fail on any unusable file instead of skipping it.")] = DEFAULTS.strict,
    max_pixels: Annotated[int, typer.Option(help="Largest image (decoded pixels) accepted.")] = DEFAULTS.max_pixels,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache (default $TLCLI_CACHE_DIR or "
                                                           "~/.cache/tlcli).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run into --out.")] = False,
    tensorboard: Annotated[str, typer.Option(help="TensorBoard log folder: relative = inside the bundle, "
                                                  "absolute = a run subfolder there; 'none' turns logging "
                                                  "off.")] = DEFAULTS.tensorboard or "none",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
):
    """Train a classifier on DIR (one subfolder per class) and write a model bundle."""
    from tlcli.config import TrainConfig

    if data_dir is None and not resume:
        fail(UsageError("DIR: give the image folder to train on (one subfolder per class)"))
    cfg = TrainConfig(
        data_dir=str(data_dir) if data_dir else "", backbone=backbone, image_size=image_size, out=str(out_dir),
        force=force, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, l2=l2, seed=seed,
        val_split=val_split, val_dir=str(val_dir) if val_dir else None, fine_tune=fine_tune,
        fine_tune_epochs=fine_tune_epochs, fine_tune_learning_rate=fine_tune_learning_rate, mirror=mirror,
        fine_tune_micro_batch=fine_tune_micro_batch,
        class_weights=class_weights, strategy=strategy, strict=strict, max_pixels=max_pixels,
        cache_dir=str(cache_dir) if cache_dir else None, resume=resume,
        tensorboard=None if tensorboard.strip().lower() in ("", "none") else tensorboard)
    from tlcli.training import train as run_train

    result = _with_progress(run_train, config=cfg, given=_given(ctx, {"out_dir": "out"}))
    if json_out:
        _print_json(result.to_dict())
        return
    t = _kv_table("Training summary")
    t.add_row("train accuracy", _pct(result.train_accuracy))
    t.add_row("val accuracy", _pct(result.val_accuracy))
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
    t.add_row("model", safe(result.model_dir))
    t.add_row("curves", safe(Path(result.model_dir) / "training_curves.png"))
    if cfg.tensorboard:
        t.add_row("tensorboard", safe(f"tensorboard --logdir {Path(result.model_dir) / cfg.tensorboard}"))
    out.print(t)


@app.command()
@interruptible
def predict(
    # readable=False: an unreadable file gets its own error from the library, not exit 2 for all.
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.", show_default=False,
                                                readable=False)],
    model: Annotated[Path, typer.Option(help="Model bundle directory.")] = Path(DEFAULT_MODEL_DIR),
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = PREDICT_TOP_K,
    engine: Annotated[str, typer.Option(help="auto (tflite if the bundle has model.tflite), tf or tflite.")] = PREDICT_ENGINE,
    max_pixels: Annotated[Optional[int], typer.Option(help="Largest image (decoded pixels) accepted; default: "
                                                           "the limit the model was trained with.",
                                                      show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: path, predictions, error.")] = False,
):
    """Classify images with a trained bundle. Exit code 0 only if every input succeeded."""
    import time

    from tlcli import inference

    try:
        b, eng, files = inference.prepare(paths, model_dir=model, top_k=top_k, engine=engine, max_pixels=max_pixels)
    except TlcliError as exc:
        fail(exc)
    start = time.perf_counter()
    failed = 0
    table = Table(title=f"Predictions ({eng.name})", title_justify="left")
    # The file keeps some width whatever the other cells hold; an error message folds in "#1".
    table.add_column("file", overflow="fold", min_width=20)
    for i in range(min(top_k, len(b.labels))):  # no empty columns beyond the number of classes
        table.add_column(f"#{i + 1}", overflow="fold")
    try:
        for p, _ in inference.iter_predict(files, bundle=b, engine=eng, top_k=top_k, max_pixels=max_pixels):
            failed += p.error is not None
            if json_out:
                _print_json(p.to_dict(), indent=None)  # JSON Lines
            elif p.error:
                table.add_row(safe(p.path), safe(p.error.removeprefix(f"{p.path}: "), style="red"))
            else:
                table.add_row(safe(p.path), *[safe(f"{q['label']} {100 * q['probability']:.1f}%")
                                              for q in p.predictions])
    except TlcliError as exc:  # the model itself failed (a damaged or crafted bundle)
        fail(exc)
    seconds = time.perf_counter() - start
    if not json_out:
        out.print(table)
    if len(files) > 1:  # throughput after the model is loaded; on stderr, so --json stdout stays JSON Lines
        done = len(files) - failed
        err.print(f"[dim]{done} images classified in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} "
                  f"images/s, engine {eng.name})[/]", highlight=False)
    if failed:
        err.print(f"[yellow]{failed} of {len(files)} input(s) failed[/]", highlight=False)
        raise typer.Exit(1)


@app.command()
@interruptible
def export(
    tflite: Annotated[bool, typer.Option("--tflite", help="Write a TFLite model.")] = False,
    model: Annotated[Path, typer.Option(help="Model bundle directory.")] = Path(DEFAULT_MODEL_DIR),
    output: Annotated[Optional[Path], typer.Option(help="Output .tflite file (default: model.tflite in "
                                                        "the bundle).")] = None,
    quantize: Annotated[str, typer.Option(help="none, float16 (half size), dynamic (int8 weights) or int8 "
                                               "(full integer, calibrated on training images).")] = "none",
    io_type: Annotated[str, typer.Option(help="With --quantize int8: float32, int8 or uint8 input and "
                                              "output tensors.")] = "float32",
    data: Annotated[Optional[Path], typer.Option(help="Labelled folder for calibration and parity "
                                                      "(default: the bundle's recorded images).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
):
    """Export the bundle to TFLite and check it agrees with the SavedModel."""
    from tlcli.export import export_tflite

    if not tflite:
        fail(UsageError("export: choose a format; --tflite is the one available"))
    r = _with_progress(export_tflite, model, quiet=json_out, output=output, quantize=quantize, io_type=io_type,
                       data_dir=str(data) if data else None)
    if json_out:
        _print_json(r.to_dict())
        return
    t = _kv_table("TFLite export")
    t.add_row("file", safe(r.path))
    t.add_row("labels", safe(r.labels_path + (" (also inside the .tflite)" if r.labels_embedded else "")))
    t.add_row("quantize", safe(r.quantize + (f", {r.io_type} input/output" if r.quantize == "int8" else "")))
    t.add_row("size", f"{r.size_bytes / 1e6:.2f} MB" if r.size_bytes >= 100_000 else f"{r.size_bytes / 1e3:.1f} kB")
    if r.agreement is not None:
        t.add_row("top-1 agreement", safe(f"{_pct(r.agreement)} on {r.parity_images} {r.parity_data}"))
        t.add_row("accuracy", f"SavedModel {_pct(r.saved_model_accuracy)}, TFLite {_pct(r.tflite_accuracy)}")
    else:
        t.add_row("parity", "not measured: no labelled images recorded; pass --data DIR")
    out.print(t)


def _num(x) -> str:
    return f"{x:.3f}"


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


def _mistakes_table(rep) -> Table:
    mt = Table(title=f"Most confident mistakes ({len(rep.mistakes)} shown)", title_justify="left")
    mt.add_column("file", overflow="fold", min_width=20)
    mt.add_column("true", overflow="fold")
    mt.add_column("predicted", overflow="fold")
    mt.add_column("probability", justify="right")
    for m in rep.mistakes:
        mt.add_row(safe(m.path), safe(m.true_label), safe(m.predicted_label), _pct(m.probability))
    return mt


@app.command()
@interruptible
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="Labelled folder: one subfolder per class, named like "
                                                  "the model's labels.", show_default=False)],
    model: Annotated[Path, typer.Option(help="Model bundle directory.")] = Path(DEFAULT_MODEL_DIR),
    engine: Annotated[str, typer.Option(help="tf (the SavedModel), tflite (the bundle's model.tflite) "
                                             "or auto.")] = EVALUATE_ENGINE,
    top_k: Annotated[int, typer.Option(help="k for the top-k accuracy.")] = EVALUATE_TOP_K,
    mistakes: Annotated[int, typer.Option(help="How many of the most confident mistakes to show.")] = EVALUATE_MISTAKES,
    report: Annotated[Optional[Path], typer.Option(help="Folder to write confusion_matrix.png and "
                                                        "mistakes.csv (every mistake) into.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on "
                                                          "stdout.")] = False,
):
    """Evaluate a trained bundle on a labelled folder: accuracy, per-class metrics, confusion matrix
    and the most confident mistakes. Exit code 1 if any file had to be skipped."""
    from tlcli.evaluation import evaluate as run_evaluate

    r = _with_progress(run_evaluate, data_dir, quiet=json_out, model_dir=model, engine=engine, top_k=top_k,
                       report_dir=report, max_mistakes=mistakes)
    if json_out:
        _print_json(r.to_dict())
    else:
        rep = r.report
        t = _kv_table("Evaluation")
        t.add_row("model", safe(f"{r.model_dir} (engine {r.engine})"))
        t.add_row("images", safe(f"{rep.count} in {r.data_dir}"))
        t.add_row("accuracy", _pct(rep.accuracy))
        t.add_row(f"top-{rep.top_k} accuracy", _pct(rep.top_k_accuracy))
        t.add_row("loss", f"{rep.loss:.4f} (cross-entropy)")
        for table in (t, _per_class_table(rep), _confusion_table(rep)):
            out.print(table)
        out.print(_mistakes_table(rep) if rep.mistakes else "No mistakes.")
        for path in r.files.values():
            out.print(Text.assemble("wrote ", safe(path)), highlight=False)
    if r.skipped:
        err.print(f"[yellow]{len(r.skipped)} file(s) skipped[/]", highlight=False)
        raise typer.Exit(1)


def run() -> None:
    """The ``tlcli`` console script: the Typer app, then a fast exit.

    Once a command has finished (bundle renamed into place, files closed, output flushed), the
    interpreter's teardown of TensorFlow still takes over a second; a process that imported it
    skips that with ``os._exit``. Tests call ``app`` directly and are not affected.
    """
    try:
        app()
        code = 0
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    # Also after Ctrl-C inside the TensorFlow import, which leaves part of it loaded: the
    # interpreter's teardown of a half-imported TensorFlow can end the process by SIGINT.
    if code == 130 or any(name.partition(".")[0] == "tensorflow" for name in sys.modules):
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
