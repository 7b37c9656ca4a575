"""The command line: parse options, call the library, render (``render``). Nothing else lives here.

Exit codes: 0 success; 1 a user error (one line on stderr) or, for predict/evaluate, at least one
input file that could not be used; 2 a bad option; 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tlcli import __version__
from tlcli.cli import render, reports, shell
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    DEFAULT_PRESET,
    DEFAULTS,
    EVALUATE_ENGINE,
    EVALUATE_MISTAKES,
    EVALUATE_TOP_K,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    PREDICT_ENGINE,
    PREDICT_TOP_K,
    SERVE_HOST,
    SERVE_PORT,
    Engine,
    Extractor,
    IOType,
    Precision,
    Quantize,
    Strategy,
    TrainConfig,
)
from tlcli.errors import TlcliError, UsageError
from tlcli.model.presets import PRESETS

app = typer.Typer(help="Transfer learning from TF Hub image feature vectors: train a classifier on a folder of "
                       "photos, predict, evaluate, audit the data, export for phones, serve it, and share it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  cls=shell.OneLineUsageErrors)
models_app = typer.Typer(help="Backbone presets and the TF Hub cache, for offline machines.",
                         no_args_is_help=True, add_completion=False, cls=shell.Group)
app.add_typer(models_app, name="models")
out = Console()
err = Console(stderr=True)

# The panels of `tlcli train --help`.
DATA, MODEL, HEAD, FINE_TUNING, HARDWARE, OUTPUT = "Data", "Model", "Head", "Fine-tuning", "Hardware", "Output"


def fail(exc: TlcliError, *, json_out: bool = False):
    """End the command on a library error: the files behind it (if it names some) and its one
    line on stderr; with ``json_out`` also ``{"error", "skipped"}`` on stdout, for a script."""
    skipped = getattr(exc, "skipped", None) or []
    if skipped:
        err.print(render.skipped_table(skipped))
    err.print(render.error_line(exc), highlight=False, soft_wrap=True)
    if json_out:
        render.print_json({"error": str(exc), "exit_code": exc.exit_code, "skipped": skipped})
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


def _with_progress(fn, *args, quiet: bool = False, json_out: bool = False, **kwargs):
    """Call a library function with a progress display on stderr (bars on a terminal, timed
    lines in a log); a TlcliError becomes one line and its exit code (see ``fail``)."""
    try:
        with render.progress_display(err, quiet=quiet) as progress:
            return fn(*args, progress=progress, **kwargs)
    except TlcliError as exc:
        fail(exc, json_out=json_out)


def _given(ctx: typer.Context, renamed: dict[str, str]) -> set[str]:
    """The parameters set on the command line (not left at their defaults), by library name."""
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") for name in ctx.params}
    return {renamed.get(name, name) for name, source in sources.items() if source not in ("DEFAULT", "DEFAULT_MAP")}


def _opt(panel: str, help: str, *names: str, **kwargs):
    """An option of ``train``, shown in the help panel ``panel``."""
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def _path(p: Path | None) -> str | None:
    return str(p) if p else None


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ModelDir = Annotated[Path, typer.Option(metavar="DIR", help="Model bundle directory.")]


@app.command(cls=shell.Command, short_help="Train a classifier on DIR (one subfolder per class).")
@interruptible
def train(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(metavar="DIR", show_default=False,
                                                       help="Folder of class subfolders, or a labels CSV.")] = None,
    val_split: Annotated[float, _opt(DATA, "Fraction of each class held out for validation.")] = DEFAULTS.val_split,
    val_dir: Annotated[Optional[Path], _opt(DATA, "Explicit validation folder (overrides --val-split).",
                                            metavar="DIR")] = None,
    seed: Annotated[int, _opt(DATA, "Seed for the split, shuffling and initialisation.")] = DEFAULTS.seed,
    strict: Annotated[bool, _opt(DATA, "Fail on any unusable file instead of skipping it.", "--strict")] = False,
    max_pixels: Annotated[int, _opt(DATA, "Largest image (decoded pixels) accepted.", min=1)] = DEFAULTS.max_pixels,
    backbone: Annotated[str, _opt(MODEL, f"Preset ({', '.join(PRESETS)}), TF Hub / Kaggle https handle, or "
                                         "local SavedModel directory.")] = DEFAULT_PRESET,
    image_size: Annotated[Optional[int], _opt(MODEL, "Input size; default: the preset's or the backbone's "
                                                     "declared size.", min=MIN_IMAGE_SIZE,
                                              max=MAX_IMAGE_SIZE)] = None,
    mirror: Annotated[Optional[bool], _opt(
        MODEL, "Learn from each image and its left-right mirror image, and average both in the model (twice "
               "the backbone work per image); default: on with --fine-tune. Turn it off when mirroring changes "
               "the class.", "--mirror/--no-mirror", show_default=False)] = DEFAULTS.mirror,
    epochs: Annotated[int, _opt(HEAD, "Cap on head epochs (one full-batch step each on cached features; early "
                                      "stopping picks the count).")] = DEFAULTS.epochs,
    patience: Annotated[int, _opt(HEAD, "Head epochs without improvement before early stopping.")] = DEFAULTS.patience,
    learning_rate: Annotated[Optional[float], _opt(HEAD, "Head step size; default: automatic (1/L, the largest "
                                                         "stable step).")] = DEFAULTS.learning_rate,
    l2: Annotated[Optional[float], _opt(HEAD, "Head L2 strength; default: chosen by cross-validation on the "
                                              "training images.")] = DEFAULTS.l2,
    label_smoothing: Annotated[float, _opt(HEAD, "Label smoothing of the head's loss, in [0, 1).")] = (
        DEFAULTS.label_smoothing),
    class_weights: Annotated[bool, _opt(HEAD, "Weight classes by inverse frequency.")] = DEFAULTS.class_weights,
    fine_tune: Annotated[bool, _opt(FINE_TUNING, "After the head, fine-tune the whole backbone.",
                                    "--fine-tune")] = False,
    fine_tune_epochs: Annotated[int, _opt(FINE_TUNING, "Cap on fine-tune epochs.")] = DEFAULTS.fine_tune_epochs,
    fine_tune_learning_rate: Annotated[float, _opt(FINE_TUNING, "Fine-tune learning rate.")] = (
        DEFAULTS.fine_tune_learning_rate),
    fine_tune_patience: Annotated[int, _opt(FINE_TUNING, "Fine-tune epochs without a better holdout loss before "
                                                         "stopping.")] = DEFAULTS.fine_tune_patience,
    holdout: Annotated[float, _opt(FINE_TUNING, "Fraction of the training images held out to stop fine-tuning "
                                                "early.")] = DEFAULTS.holdout,
    dropout: Annotated[float, _opt(FINE_TUNING, "Dropout in front of the head while fine-tuning.")] = DEFAULTS.dropout,
    fine_tune_micro_batch: Annotated[Optional[int], _opt(
        FINE_TUNING, "Fine-tuning takes each batch's gradient in slices of this many images (same update, less "
                     "memory); default: 8 on the CPU, whole batches on a GPU or TPU; 0 = whole batches.",
        show_default=False)] = DEFAULTS.fine_tune_micro_batch,
    precision: Annotated[Precision, _opt(FINE_TUNING, "Fine-tuning arithmetic (auto: mixed_float16 on a GPU of "
                                                      "compute capability >= 7.0, mixed_bfloat16 on a TPU, "
                                                      "float32 on a CPU); the model is saved float32.")] = (
        Precision(DEFAULTS.precision)),
    batch_size: Annotated[int, _opt(HARDWARE, "Batch size per replica (feature extraction, "
                                              "fine-tuning).")] = DEFAULTS.batch_size,
    strategy: Annotated[Strategy, _opt(HARDWARE, "Distribution strategy (auto: the workers of TF_CONFIG, "
                                                 "else a TPU, else all GPUs, else the CPU).")
                        ] = Strategy(DEFAULTS.strategy),
    cache_dir: Annotated[Optional[Path], _opt(HARDWARE, "Feature cache (default $TLCLI_CACHE_DIR or "
                                                        "~/.cache/tlcli).", metavar="DIR")] = None,
    extractor: Annotated[Extractor, _opt(HARDWARE, "What runs the frozen backbone for its features (auto: LiteRT, "
                                                   "converted once and cached, when there is no GPU or TPU; "
                                                   "else TensorFlow).")] = Extractor(DEFAULTS.extractor),
    out_dir: Annotated[Path, _opt(OUTPUT, "Where to write the model bundle.", "--out",
                                  metavar="DIR")] = Path(DEFAULT_MODEL_DIR),
    force: Annotated[bool, _opt(OUTPUT, "Replace an existing bundle at --out.", "--force")] = False,
    resume: Annotated[bool, _opt(OUTPUT, "Continue an interrupted run into --out.", "--resume")] = False,
    tensorboard: Annotated[str, _opt(OUTPUT, "TensorBoard log folder: relative = inside the bundle, absolute = a "
                                             "run subfolder there; 'none' turns logging off.")] = (
        DEFAULTS.tensorboard or "none"),
    json_out: Annotated[bool, _opt(OUTPUT, "Print the result as JSON on stdout.", "--json")] = False,
):
    """Train a classifier on DIR (one subfolder per class) and write a model bundle."""
    from tlcli import training

    if data_dir is None and not resume:
        fail(UsageError("DIR: give the image folder to train on (one subfolder per class)"), json_out=json_out)
    logs = None if tensorboard.strip().lower() in ("", "none") else tensorboard
    cfg = TrainConfig.from_options({**ctx.params, "data_dir": data_dir or "", "tensorboard": logs},
                                   renamed={"out_dir": "out"})

    result = _with_progress(training.train, config=cfg, given=_given(ctx, {"out_dir": "out"}), json_out=json_out)
    if json_out:
        render.print_json(result.to_dict())
    else:
        out.print(render.train_summary(result, tensorboard=cfg.tensorboard))


@app.command(cls=shell.Command, short_help="Classify images with a trained bundle.")
@interruptible
def predict(
    # readable=False: an unreadable file gets its own error from the library, not exit 2 for all.
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Image files and/or folders.",
                                                show_default=False,
                                                readable=False)],
    model: ModelDir = Path(DEFAULT_MODEL_DIR),
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = PREDICT_TOP_K,
    engine: Annotated[Engine, typer.Option(help="auto: tflite if the bundle has model.tflite, else "
                                                "tf.")] = Engine(PREDICT_ENGINE),
    max_pixels: Annotated[Optional[int], typer.Option(min=1, help="Largest image (decoded pixels) accepted; default: "
                                                           "the limit the model was trained with.",
                                                      show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: path, predictions, error.")] = False,
):
    """Classify images with a trained bundle. Exit code 0 only if every input succeeded."""
    import time

    from tlcli.deploy import inference

    try:
        b, eng, files = inference.prepare(paths, model_dir=model, top_k=top_k, engine=engine.value,
                                          max_pixels=max_pixels)
    except TlcliError as exc:
        fail(exc, json_out=json_out)
    start = time.perf_counter()
    failed = 0
    shown = []
    try:
        for p, _ in inference.iter_predict(files, bundle=b, engine=eng, top_k=top_k, max_pixels=max_pixels):
            failed += p.error is not None
            if json_out:
                render.print_json(p.to_dict(), indent=None)  # JSON Lines
            else:
                shown.append(p)
    except TlcliError as exc:  # the model itself failed (a damaged or crafted bundle)
        fail(exc, json_out=json_out)
    seconds = time.perf_counter() - start
    if not json_out:
        out.print(render.predictions_table(eng.name, min(top_k, len(b.labels)), shown, out.width))
    if len(files) > 1:  # throughput after the model is loaded; on stderr, so --json stdout stays JSON Lines
        done = len(files) - failed
        err.print(render.note(f"{done} images classified in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} "
                              f"images/s, engine {eng.name})"), highlight=False)
    if failed:
        err.print(render.note(f"{failed} of {len(files)} input(s) failed", style="yellow"), highlight=False)
        raise typer.Exit(1)


@app.command(cls=shell.Command, short_help="Export the bundle to TFLite, checked against the SavedModel.")
@interruptible
def export(
    tflite: Annotated[bool, typer.Option("--tflite", help="Write a TFLite model.")] = False,
    model: ModelDir = Path(DEFAULT_MODEL_DIR),
    output: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Output .tflite file (default: "
                                                                        "model.tflite in the bundle).")] = None,
    quantize: Annotated[Quantize, typer.Option(help="float16: half size; dynamic: int8 weights; int8: full "
                                                    "integer, calibrated on training images.")] = Quantize.NONE,
    io_type: Annotated[IOType, typer.Option(help="With --quantize int8: the type of the input and output "
                                                 "tensors.")] = IOType.FLOAT32,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Labelled folder for calibration and "
                                                                     "parity (default: the bundle's recorded "
                                                                     "images).")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(
        metavar="POINTS", help="Fail (exit 1, nothing written) when the TFLite model's accuracy on the parity "
                               "images is more than POINTS below the SavedModel's.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing .tflite file (the bundle's "
                                                        "model.tflite, or --output).")] = False,
    json_out: JsonFlag = False,
):
    """Export the bundle to TFLite and check it agrees with the SavedModel."""
    from tlcli.deploy.export import export_tflite

    if not tflite:
        fail(UsageError("export: choose a format; --tflite is the one available"), json_out=json_out)
    r = _with_progress(export_tflite, model, quiet=json_out, json_out=json_out, output=output,
                       quantize=quantize.value, io_type=io_type.value, data_dir=_path(data),
                       max_accuracy_drop=max_accuracy_drop, force=force)
    if json_out:
        render.print_json(r.to_dict())
    else:
        out.print(render.export_summary(r))


@app.command(cls=shell.Command, short_help="Score a bundle on a labelled folder.")
@interruptible
def evaluate(
    data_dir: Annotated[Path, typer.Argument(metavar="DIR", show_default=False,
                                             help="Labelled folder: one subfolder per class, named like the "
                                                  "model's labels.")],
    model: ModelDir = Path(DEFAULT_MODEL_DIR),
    engine: Annotated[Engine, typer.Option(help="tf: the SavedModel; tflite: the bundle's model.tflite; "
                                                "auto: tflite if there is one.")] = Engine(EVALUATE_ENGINE),
    top_k: Annotated[int, typer.Option(help="k for the top-k accuracy.")] = EVALUATE_TOP_K,
    mistakes: Annotated[int, typer.Option(help="How many of the most confident mistakes to show.")] = EVALUATE_MISTAKES,
    report: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder to write confusion_matrix.png, "
                                                                       "mistakes.csv (every mistake) and mistakes.html "
                                                                       "(thumbnails) into.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the report files in a --report folder that is "
                                                        "not empty.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on "
                                                          "stdout.")] = False,
):
    """Evaluate a trained bundle on a labelled folder: accuracy, per-class metrics, confusion matrix
    and the most confident mistakes. Exit code 1 if any file had to be skipped."""
    from tlcli import insight

    r = _with_progress(insight.evaluate, data_dir, quiet=json_out, json_out=json_out, model_dir=model,
                       engine=engine.value, top_k=top_k, report_dir=report, max_mistakes=mistakes, force=force)
    if json_out:
        render.print_json(r.to_dict())
    else:
        for shown in reports.evaluation(r):
            out.print(shown, highlight=False)
    if r.skipped:
        err.print(render.note(f"{len(r.skipped)} file(s) skipped", style="yellow"), highlight=False)
        raise typer.Exit(1)


@app.command(cls=shell.Command, short_help="Serve a bundle over HTTP (TF Serving's REST API and a page).")
@interruptible
def serve(
    model: ModelDir = Path(DEFAULT_MODEL_DIR),
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 makes the (unauthenticated) server "
                                           "reachable from the network.")] = SERVE_HOST,
    port: Annotated[int, typer.Option(help="TCP port (0: a free one).")] = SERVE_PORT,
    name: Annotated[Optional[str], typer.Option(help="Model name in the /v1/models/NAME URLs; default: the "
                                                     "bundle folder's name.", show_default=False)] = None,
    engine: Annotated[Engine, typer.Option(help="auto: tflite if the bundle has model.tflite, else "
                                                "tf.")] = Engine(PREDICT_ENGINE),
    workers: Annotated[Optional[int], typer.Option(help="Requests classified at once (LiteRT interpreters); "
                                                        "default: the number of CPUs.", show_default=False)] = None,
    max_pixels: Annotated[Optional[int], typer.Option(min=1, help="Largest image (decoded pixels) accepted; default: "
                                                           "the limit the model was trained with.",
                                                      show_default=False)] = None,
):
    """Serve the bundle over HTTP: TF Serving's REST API, POST /predict, and a page at / to try it.
    Ctrl-C (or SIGTERM) finishes the requests in flight and exits 0."""
    from tlcli.deploy.server import serve as run_serve

    try:
        r = run_serve(model, host=host, port=port, name=name, engine=engine.value, workers=workers,
                      max_pixels=max_pixels, progress=render.line_events(err))
    except TlcliError as exc:
        fail(exc)
    err.print(render.note(f"stopped serving {r.name} after {r.seconds:.0f} s"), highlight=False)


@app.command(cls=shell.Command, short_help="Find duplicates, leaks, likely mislabels and outliers in DIR.")
@interruptible
def audit(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(
        metavar="DIR", show_default=False,
        help="Folder with one subfolder of images per class (with --model: the one it was trained "
             "on).")] = None,
    model: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="A trained bundle: audit with its training settings (folders, split, seed, backbone, "
                            "image size, cache), instead of the options below.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Validation folder, as given to "
                                                                        "train.")] = None,
    val_split: Annotated[float, typer.Option(help="Fraction of each class held out, as train splits it.")] = (
        DEFAULTS.val_split),
    seed: Annotated[int, typer.Option(help="The seed of the split, as given to train.")] = DEFAULTS.seed,
    backbone: Annotated[str, typer.Option(help="The backbone, as given to train.")] = DEFAULT_PRESET,
    image_size: Annotated[Optional[int], typer.Option(min=MIN_IMAGE_SIZE, max=MAX_IMAGE_SIZE,
                                                          help="Input size, as given to train.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Feature cache (default $TLCLI_CACHE_DIR or ~/.cache/tlcli).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size of the feature extraction.")] = DEFAULTS.batch_size,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image (decoded pixels) "
                                                       "accepted.")] = DEFAULTS.max_pixels,
    extractor: Annotated[Extractor, typer.Option(help="What runs the backbone, as given to train.")] = Extractor(
        DEFAULTS.extractor),
    report: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder to write audit.html (thumbnails) "
                                                                       "and one CSV per kind into.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the report files in a --report folder that is "
                                                        "not empty.")] = False,
    json_out: JsonFlag = False,
):
    """Find exact and near-duplicates, train/val leaks, likely mislabels and outliers in DIR, from the
    features train computes (an audit after train extracts nothing). Never changes the images."""
    from tlcli.insight.audit import audit as run_audit

    taken = sorted(_given(ctx, {}) & {"val_dir", "val_split", "seed", "backbone", "image_size", "cache_dir",
                                       "extractor"})
    if model is not None and taken:
        fail(UsageError(f"--model {model}: takes {', '.join('--' + t.replace('_', '-') for t in taken)} from the "
                        "bundle; drop them, or audit without --model"), json_out=json_out)
    r = _with_progress(run_audit, data_dir, quiet=json_out, json_out=json_out, model_dir=model, val_dir=_path(val_dir),
                       val_split=val_split, seed=seed,
                       backbone=backbone, image_size=image_size, cache_dir=_path(cache_dir), batch_size=batch_size,
                       max_pixels=max_pixels, extractor=extractor.value, report_dir=report, force=force)
    if json_out:
        render.print_json(r.to_dict())
    else:
        for shown in reports.audit(r):
            out.print(shown, highlight=False)


@app.command(cls=shell.Command, short_help="Copy a bundle for others, without the folders it was trained from.")
@interruptible
def share(
    model: ModelDir = Path(DEFAULT_MODEL_DIR),
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where to write the copy to share.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing copy at --out.")] = False,
    json_out: JsonFlag = False,
):
    """Copy the bundle for others, without the folders it was trained from (see docs/security.md)."""
    from tlcli.bundle.share import share as share_bundle

    try:
        r = share_bundle(model, out=out_dir, force=force)
    except TlcliError as exc:
        fail(exc, json_out=json_out)
    render.print_json(r.to_dict()) if json_out else out.print(render.share_summary(r))


@models_app.command("list", cls=shell.Command, short_help="The backbone presets, and which are cached.")
def models_list(json_out: JsonFlag = False):
    """List the backbone presets: handle, input size, feature size, and whether each is in the TF Hub
    cache ($TFHUB_CACHE_DIR, else ~/.cache/tlcli/tfhub) with its size on disk."""
    from tlcli.model import hub_cache as models

    listing = models.list_models()
    if json_out:
        render.print_json(listing.to_dict())
    else:
        out.print(render.models_table(listing))


@models_app.command("fetch", cls=shell.Command, short_help="Download a backbone into the TF Hub cache.")
@interruptible
def models_fetch(
    name: Annotated[str, typer.Argument(metavar="NAME|HANDLE", show_default=False,
                                        help="A preset name or an https:// TF Hub / Kaggle handle.")],
    json_out: JsonFlag = False,
):
    """Download a backbone into the TF Hub cache ($TFHUB_CACHE_DIR, else ~/.cache/tlcli/tfhub), so train
    works offline later."""
    from tlcli.model import hub_cache as models

    r = _with_progress(models.fetch_model, name, quiet=json_out, json_out=json_out)
    if json_out:
        render.print_json(r.to_dict())
    else:
        out.print(render.fetch_summary(r))


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

        from tlcli._tf import remove_autograph_files

        remove_autograph_files()  # os._exit skips autograph's own atexit removal
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

