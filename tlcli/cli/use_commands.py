"""The commands that run a bundle: predict, export, evaluate and serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli.cli import common, render, reports, shell
from tlcli.config import (
    DEFAULT_MODEL_DIR,
    EVALUATE_ENGINE,
    EVALUATE_MISTAKES,
    EVALUATE_OVERLAYS,
    EVALUATE_TOP_K,
    PREDICT_ENGINE,
    PREDICT_TOP_K,
    SERVE_HOST,
    SERVE_PORT,
    Engine,
    ExportFormat,
    IOType,
    Quantize,
)
from tlcli.errors import TlcliError, UsageError

ENGINE_HELP = ("tf: the SavedModel; tflite, onnx, openvino: the bundle's exported file; auto: the fastest exported "
               "file the bundle holds (tflite, openvino, onnx), else tf.")


@common.app.command(cls=shell.Command, short_help="Classify images with a trained bundle.")
@common.interruptible
def predict(
    # readable=False: an unreadable file gets its own error from the library, not exit 2 for all.
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="Image files and/or folders.",
                                                show_default=False,
                                                readable=False)],
    model: common.ModelDir = Path(DEFAULT_MODEL_DIR),
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = PREDICT_TOP_K,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine(PREDICT_ENGINE),
    max_pixels: Annotated[Optional[int], typer.Option(min=1, help="Largest image (decoded pixels) accepted; default: "
                                                           "the limit the model was trained with.",
                                                      show_default=False)] = None,
    explain: Annotated[Optional[Path], typer.Option(metavar="OUTDIR", help="Also write a saliency overlay of "
                                                         "each image (PNG: what drove the guess) into OUTDIR; "
                                                         "runs the SavedModel.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --explain: replace overlays already in "
                                                        "OUTDIR.")] = False,
    threshold: common.ThresholdOption = None,
    unknown_threshold: common.UnknownThreshold = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: path, predictions, error "
                                                          "(and overlay; labels, of a multi-label model; unknown "
                                                          "and unknown_score, with a detector).")] = False,
):
    """Classify images with a trained bundle. Exit code 0 only if every input succeeded."""
    import time

    from tlcli.deploy import inference, saliency

    try:
        if explain is None:
            b, eng, files = inference.prepare(paths, model_dir=model, top_k=top_k, engine=engine.value,
                                              max_pixels=max_pixels, threshold=threshold,
                                              unknown_threshold=unknown_threshold)
            results = inference.iter_predict(files, bundle=b, engine=eng, top_k=top_k, max_pixels=max_pixels,
                                             threshold=threshold,
                                             unknown_threshold=inference.unknown_threshold_for(b, unknown_threshold,
                                                                                               eng))
        else:
            explainer, files, plan, note = saliency.prepare(paths, out_dir=explain, model_dir=model, top_k=top_k,
                                                            engine=engine.value, max_pixels=max_pixels, force=force)
            if note:
                common.err.print(render.note(note), highlight=False)
            b, eng = explainer.bundle, explainer.engine
            inference.thresholds(b, threshold)  # a bad --threshold fails before any image
            results = saliency.iter_explained(files, explainer=explainer, plan=plan, top_k=top_k,
                                              max_pixels=max_pixels, threshold=threshold,
                                              unknown_threshold=inference.unknown_threshold_for(b, unknown_threshold,
                                                                                                eng))
    except TlcliError as exc:
        common.fail(exc, json_out=json_out)
    start = time.perf_counter()
    failed = unknown = 0
    shown = []
    try:
        for p, _ in results:
            failed += p.error is not None
            unknown += bool(p.unknown)
            if json_out:
                render.print_json(p.to_dict(), indent=None)  # JSON Lines
            else:
                shown.append(p)
    except TlcliError as exc:  # the model itself failed (a damaged or crafted bundle)
        common.fail(exc, json_out=json_out)
    seconds = time.perf_counter() - start
    if not json_out:
        common.out.print(render.predictions_table(eng.name, min(top_k, len(b.labels)), shown,
                                                          common.out.width))
    if len(files) > 1:  # throughput after the model is loaded; on stderr, so --json stdout stays JSON Lines
        done = len(files) - failed
        verb = "classified" if explain is None else "classified and explained"
        common.err.print(render.note(f"{done} images {verb} in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} "
                              f"images/s, engine {eng.name})" + (f"; {unknown} called unknown" if unknown else "")),
                         highlight=False)
    if explain is not None:
        common.err.print(render.note(f"{len(files) - failed} saliency overlay(s) in {explain}"), highlight=False)
    if failed:
        common.err.print(render.note(f"{failed} of {len(files)} input(s) failed", style="yellow"), highlight=False)
        raise typer.Exit(1)


@common.app.command(cls=shell.Command, short_help="Export the bundle (TFLite, ONNX, OpenVINO), checked against "
                                                   "the SavedModel.")
@common.interruptible
def export(
    format: Annotated[Optional[ExportFormat], typer.Option(help="The format to write; all: every format whose extra "
                                                                "is installed, into the bundle, with a table.",
                                                           show_default=False)] = None,
    tflite: Annotated[bool, typer.Option("--tflite", help="Same as --format tflite.")] = False,
    model: common.ModelDir = Path(DEFAULT_MODEL_DIR),
    output: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Output file (default: in the bundle: "
                                                                        "model.tflite, model.onnx, "
                                                                        "openvino/model.xml).")] = None,
    quantize: Annotated[Quantize, typer.Option(help="float16: half size (TFLite, OpenVINO); dynamic: int8 weights "
                                                    "(TFLite, ONNX); int8: full integer, calibrated on training "
                                                    "images (TFLite).")] = Quantize.NONE,
    io_type: Annotated[IOType, typer.Option(help="With --quantize int8: the type of the input and output "
                                                 "tensors.")] = IOType.FLOAT32,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Labelled folder for calibration and "
                                                                     "parity (default: the bundle's recorded "
                                                                     "images).")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(
        metavar="POINTS", help="Fail (exit 1, nothing written) when the exported model's accuracy on the parity "
                               "images is more than POINTS below the SavedModel's.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing exported file (the bundle's, or "
                                                        "--output).")] = False,
    json_out: common.JsonFlag = False,
):
    """Export the bundle to TFLite, ONNX or OpenVINO and check it agrees with the SavedModel."""
    from tlcli.deploy import export as exports

    chosen = format.value if format else ("tflite" if tflite else None)
    if chosen is None or (tflite and chosen != "tflite"):
        common.fail(UsageError("export: choose one format with --format (tflite, onnx, openvino, all); --tflite "
                               "is --format tflite"), json_out=json_out)
    if chosen == "all":
        if output is not None or io_type != IOType.FLOAT32:
            common.fail(UsageError("--format all: writes each format into the bundle; give --output or --io-type "
                                   "with one format"), json_out=json_out)
        r = common.with_progress(exports.export_all, model, quiet=json_out, json_out=json_out,
                                 quantize=quantize.value, data_dir=common.path_str(data),
                                 max_accuracy_drop=max_accuracy_drop, force=force)
    else:
        r = common.with_progress(exports.export_model, model, quiet=json_out, json_out=json_out, format=chosen,
                                 output=output, quantize=quantize.value, io_type=io_type.value,
                                 data_dir=common.path_str(data), max_accuracy_drop=max_accuracy_drop, force=force)
    if json_out:
        render.print_json(r.to_dict())
    elif chosen == "all":
        common.out.print(reports.exports_table(r))
    else:
        common.out.print(reports.export_summary(r))


@common.app.command(cls=shell.Command, short_help="Score a bundle on a labelled folder.")
@common.interruptible
def evaluate(
    data_dir: Annotated[Path, typer.Argument(metavar="DIR", show_default=False,
                                             help="Labelled folder: one subfolder per class, named like the "
                                                  "model's labels.")],
    model: common.ModelDir = Path(DEFAULT_MODEL_DIR),
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine(EVALUATE_ENGINE),
    top_k: Annotated[int, typer.Option(help="k for the top-k accuracy.")] = EVALUATE_TOP_K,
    mistakes: Annotated[int, typer.Option(help="How many of the most confident mistakes to show.")] = EVALUATE_MISTAKES,
    report: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder to write confusion_matrix.png, "
                                                                       "mistakes.csv (every mistake) and mistakes.html "
                                                                       "(thumbnails) into.")] = None,
    overlays: Annotated[int, typer.Option(help="With --report: saliency overlays (what drove the guess) of the "
                                               "N most confident mistakes; 0: none.")] = EVALUATE_OVERLAYS,
    force: Annotated[bool, typer.Option("--force", help="Replace the report files in a --report folder that is "
                                                        "not empty.")] = False,
    threshold: common.ThresholdOption = None,
    unknown_threshold: common.UnknownThreshold = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on "
                                                          "stdout.")] = False,
):
    """Evaluate a trained bundle on a labelled folder: accuracy, per-class metrics, confusion matrix
    and the most confident mistakes (multi-label: per-label precision, recall, F1 and average
    precision, micro and macro F1, mAP, subset accuracy, and pr_curves.png with --report). Exit
    code 1 if any file had to be skipped."""
    from tlcli import insight

    r = common.with_progress(insight.evaluate, data_dir, quiet=json_out, json_out=json_out, model_dir=model,
                       engine=engine.value, top_k=top_k, report_dir=report, max_mistakes=mistakes, force=force,
                             overlays=overlays, threshold=threshold, unknown_threshold=unknown_threshold)
    if json_out:
        render.print_json(r.to_dict())
    else:
        for shown in reports.evaluation(r):
            common.out.print(shown, highlight=False)
    if r.skipped:
        common.err.print(render.note(f"{len(r.skipped)} file(s) skipped", style="yellow"), highlight=False)
        raise typer.Exit(1)


@common.app.command(cls=shell.Command, short_help="Serve a bundle over HTTP (TF Serving's REST API and a page).")
@common.interruptible
def serve(
    model: common.ModelDir = Path(DEFAULT_MODEL_DIR),
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 makes the (unauthenticated) server "
                                           "reachable from the network.")] = SERVE_HOST,
    port: Annotated[int, typer.Option(help="TCP port (0: a free one).")] = SERVE_PORT,
    name: Annotated[Optional[str], typer.Option(help="Model name in the /v1/models/NAME URLs; default: the "
                                                     "bundle folder's name.", show_default=False)] = None,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine(PREDICT_ENGINE),
    workers: Annotated[Optional[int], typer.Option(help="Requests classified at once (LiteRT interpreters); "
                                                        "default: the number of CPUs.", show_default=False)] = None,
    max_pixels: Annotated[Optional[int], typer.Option(min=1, help="Largest image (decoded pixels) accepted; default: "
                                                           "the limit the model was trained with.",
                                                      show_default=False)] = None,
    threshold: common.ThresholdOption = None,
    unknown_threshold: common.UnknownThreshold = None,
):
    """Serve the bundle over HTTP: TF Serving's REST API, POST /predict, and a page at / to try it.
    Ctrl-C (or SIGTERM) finishes the requests in flight and exits 0."""
    from tlcli.deploy.server import serve as run_serve

    try:
        r = run_serve(model, host=host, port=port, name=name, engine=engine.value, workers=workers,
                      max_pixels=max_pixels, threshold=threshold, unknown_threshold=unknown_threshold,
                      progress=render.line_events(common.err))
    except TlcliError as exc:
        common.fail(exc)
    common.err.print(render.note(f"stopped serving {r.name} after {r.seconds:.0f} s"), highlight=False)
