"""tlcli evaluate, the report files, and what training leaves for watching: TensorBoard scalars and
training_curves.png."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import COLOURS, page_sections, solid_image
from tests.helpers import run_cli as run
from tlcli.metrics import ClassMetrics, Report


def _twin_folder(root: Path, twins: dict[str, int], reds: int, seed: int) -> Path:
    """Classes 'a' and 'b' hold byte-identical copies of one grey image, so no model can tell
    them apart; class 'c' holds distinct red images."""
    source = root.parent / f"{root.name}-twin.png"
    solid_image((128, 128, 128), seed=1).save(source)
    for label, n in twins.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            shutil.copyfile(source, root / label / f"{label}_{i}.png")
    (root / "c").mkdir(parents=True)
    for i in range(reds):
        solid_image(COLOURS["red"], seed=seed + i).save(root / "c" / f"c_{i}.png")
    return root


@pytest.fixture(scope="module")
def twin_bundle(tmp_path_factory, tiny_backbone):
    """Head-only training on the twin classes, with TensorBoard logs in the bundle (the default)."""
    import tlcli

    base = tmp_path_factory.mktemp("twins")
    data = _twin_folder(base / "train", {"a": 8, "b": 8}, reds=8, seed=100)
    out = base / "model"
    tlcli.train(data, out=str(out), backbone=str(tiny_backbone), image_size=32, epochs=30, batch_size=8,
                learning_rate=0.05, patience=5, cache_dir=str(base / "cache"))
    return out


@pytest.fixture(scope="module")
def twin_eval(tmp_path_factory):
    return _twin_folder(tmp_path_factory.mktemp("twins-eval") / "eval", {"a": 3, "b": 5}, reds=4, seed=500)


def _read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    import tensorflow as tf

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    for f in files:
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    return scalars


# ---- the known confusion ---------------------------------------------------------------------

def test_indistinguishable_classes_give_the_exact_confusion_and_precision_recall(twin_bundle, twin_eval):
    import tlcli

    r = tlcli.evaluate(twin_eval, model_dir=twin_bundle)
    rep = r.report
    # Every a/b file is the same image, so all eight get one and the same prediction L (a or b);
    # the red images are easy.
    twin = tlcli.predict([twin_eval / "a" / "a_0.png"], model_dir=twin_bundle, engine="tf", top_k=1)[0]
    chosen = twin.predictions[0]["label"]
    assert chosen in ("a", "b")
    if chosen == "a":
        assert rep.confusion == [[3, 0, 0], [5, 0, 0], [0, 0, 4]]
        precision, recall = {"a": 3 / 8, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 0.0, "c": 1.0}
    else:
        assert rep.confusion == [[0, 3, 0], [0, 5, 0], [0, 0, 4]]
        precision, recall = {"a": 0.0, "b": 5 / 8, "c": 1.0}, {"a": 0.0, "b": 1.0, "c": 1.0}
    assert rep.labels == ["a", "b", "c"] and rep.count == 12
    assert {c.label: c.precision for c in rep.per_class} == pytest.approx(precision)
    assert {c.label: c.recall for c in rep.per_class} == pytest.approx(recall)
    assert [c.support for c in rep.per_class] == [3, 5, 4]
    assert rep.accuracy == pytest.approx((4 + (3 if chosen == "a" else 5)) / 12)
    assert rep.macro["recall"] == pytest.approx(2 / 3)
    assert r.engine == "tf" and r.skipped == []
    assert [w.split(" has only")[0] for w in r.warnings] == ["class 'a'", "class 'c'"]  # fewer than 5 images


def test_report_dir_holds_every_mistake_most_confident_first(twin_bundle, twin_eval, tmp_path):
    import tlcli

    r = tlcli.evaluate(twin_eval, model_dir=twin_bundle, report_dir=tmp_path / "report", max_mistakes=2)
    twin = tlcli.predict([twin_eval / "a" / "a_0.png"], model_dir=twin_bundle, engine="tf", top_k=1)[0]
    chosen, p = twin.predictions[0]["label"], twin.predictions[0]["probability"]
    other = "b" if chosen == "a" else "a"
    n_wrong = {"a": 3, "b": 5}[other]
    with open(tmp_path / "report" / "mistakes.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "true_label", "predicted_label", "probability"]
    # Equal probabilities keep the scan order (sorted paths).
    assert rows[1:] == [[str(twin_eval / other / f"{other}_{i}.png"), other, chosen, f"{p:.6f}"]
                        for i in range(n_wrong)]
    # The report itself keeps only the max_mistakes most confident.
    assert [(m.path, m.true_label, m.predicted_label) for m in r.report.mistakes] == \
        [(row[0], row[1], row[2]) for row in rows[1:3]]
    png = Image.open(tmp_path / "report" / "confusion_matrix.png")
    assert png.format == "PNG" and 400 <= png.width <= 2000 and 400 <= png.height <= 2000
    per_class = page_sections((tmp_path / "report" / "mistakes.html").read_text())["Per class"]["rows"]
    assert [row[0] for row in per_class] == ["class", "a", "b", "c", "macro avg", "weighted avg"]
    assert r.files == {"confusion_matrix.png": str(tmp_path / "report" / "confusion_matrix.png"),
                       "reliability.png": str(tmp_path / "report" / "reliability.png"),
                       "mistakes.csv": str(tmp_path / "report" / "mistakes.csv"),
                       "saliency": str(tmp_path / "report" / "saliency"),  # overlays of the mistakes shown
                       "mistakes.html": str(tmp_path / "report" / "mistakes.html")}


def test_mistakes_page_has_the_per_class_table_and_links_to_each_full_image(tmp_path):
    import numpy as np

    from tlcli import metrics
    from tlcli.insight import evaluation

    (tmp_path / "data" / "cat").mkdir(parents=True)
    paths = [str(tmp_path / "data" / name) for name in ("cat/c 1.png", "cat/c2.png", "dog/d1.png", "dog/d2.png")]
    solid_image((200, 40, 40)).save(paths[0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    report = metrics.compute([0, 0, 1, 1], probs, ["cat", "dog"], paths=paths, max_mistakes=4)
    page = evaluation.write_mistakes_page(report.mistakes, tmp_path / "mistakes.html", data_dir=tmp_path / "data",
                                          model_dir="model", report=report)
    sections = page_sections(page.read_text())
    assert sections["Per class"]["rows"] == [
        ["class", "precision", "recall", "F1", "support"],
        ["cat", "0.500", "0.500", "0.500", "2"], ["dog", "0.500", "0.500", "0.500", "2"],
        ["macro avg", "0.500", "0.500", "0.500", "4"], ["weighted avg", "0.500", "0.500", "0.500", "4"]]
    # Each mistake (most confident first) links to its full image, thumbnail and text alike.
    mistakes = sections["Most confident mistakes (2 of 2)"]
    assert mistakes["links"] == [Path(paths[1]).as_uri()] * 2 + [Path(paths[3]).as_uri()] * 2


def test_a_report_folder_that_is_not_empty_is_refused_without_force(twin_bundle, twin_eval, tmp_path):
    report = tmp_path / "mine"
    report.mkdir()
    (report / "notes.txt").write_text("my notes")
    refused = run("evaluate", twin_eval, "--model", twin_bundle, "--report", report)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.stderr.strip() == f"error: --report {report}: the folder is not empty; choose another, or pass " \
                                     "--force to replace the report files in it"
    assert [p.name for p in report.iterdir()] == ["notes.txt"]
    forced = run("evaluate", twin_eval, "--model", twin_bundle, "--report", report, "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in report.iterdir()) == ["confusion_matrix.png", "mistakes.csv", "mistakes.html",
                                                        "notes.txt", "reliability.png", "saliency"]
    assert (report / "notes.txt").read_text() == "my notes"
    again = run("evaluate", twin_eval, "--model", twin_bundle, "--report", report)  # over an old report
    assert again.exit_code == 1 and "--force" in again.stderr


def test_json_output_round_trips_to_the_library_report(twin_bundle, twin_eval, tmp_path):
    import tlcli

    result = run("evaluate", twin_eval, "--model", twin_bundle, "--json", "--top-k", 2, "--mistakes", 3)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) == {"model_dir", "data_dir", "engine", "report", "skipped", "warnings", "files", "seconds",
                      "unknown"}
    rep = Report.from_dict(d["report"])
    assert rep.to_dict() == d["report"]
    lib = tlcli.evaluate(twin_eval, model_dir=twin_bundle, top_k=2, max_mistakes=3).report
    assert rep.confusion == lib.confusion and rep.top_k == 2 and len(rep.mistakes) == 3
    assert [(c.label, c.support) for c in rep.per_class] == [(c.label, c.support) for c in lib.per_class]
    assert rep.accuracy == pytest.approx(lib.accuracy) and rep.loss == pytest.approx(lib.loss, rel=1e-5)
    assert rep.mistakes[0].path == lib.mistakes[0].path


def test_cli_renders_summary_per_class_table_confusion_and_mistakes(twin_bundle, twin_eval, tmp_path):
    result = run("evaluate", twin_eval, "--model", twin_bundle, "--report", tmp_path / "r")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("accuracy", "top-3 accuracy", "Per class", "macro avg", "weighted avg",
                     "Confusion matrix", "Most confident mistakes", "mistakes.csv", "confusion_matrix.png"):
        assert expected in text, expected
    # The red row of the confusion table: nothing confused with the twins, all 4 correct.
    assert any(line.split("│")[1:5] and [c.strip() for c in line.split("│")[1:5]] == ["c", "0", "0", "4"]
               for line in text.splitlines()), text


# ---- agreement with training, engines, folders -------------------------------------------------

def test_evaluate_on_the_validation_images_matches_metrics_recorded_by_training(trained_bundle, tmp_path):
    import tlcli

    meta = json.loads((trained_bundle / "tlcli.json").read_text())
    val = json.loads((trained_bundle / "splits.json").read_text())["val"]
    for path, label in val:
        dst = tmp_path / "val" / meta["labels"][label]
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst / Path(path).name)
    rep = tlcli.evaluate(tmp_path / "val", model_dir=trained_bundle).report
    recorded = Report.from_dict(meta["metrics"]["val"])
    assert rep.count == recorded.count == len(val)
    assert rep.confusion == recorded.confusion
    assert rep.accuracy == recorded.accuracy and rep.top_k_accuracy == recorded.top_k_accuracy
    assert rep.loss == pytest.approx(recorded.loss, abs=1e-4)
    for mine, theirs in zip(rep.per_class, recorded.per_class):
        assert (mine.label, mine.support) == (theirs.label, theirs.support)
        assert mine.precision == pytest.approx(theirs.precision) and mine.recall == pytest.approx(theirs.recall)


def test_tflite_engine_agrees_with_tf_engine(bundle_copy, colour_data):
    import tlcli

    tlcli.export_tflite(bundle_copy)
    tf_rep = tlcli.evaluate(colour_data, model_dir=bundle_copy, engine="tf")
    lite = tlcli.evaluate(colour_data, model_dir=bundle_copy, engine="tflite")
    assert (tf_rep.engine, lite.engine) == ("tf", "tflite")
    # The default is auto, as predict's and serve's: the export when there is one.
    assert tlcli.evaluate(colour_data, model_dir=bundle_copy).engine == "tflite"
    assert json.loads(run("evaluate", colour_data, "--model", bundle_copy, "--json").stdout)["engine"] == "tflite"
    assert lite.report.count == tf_rep.report.count == 24
    assert lite.report.confusion == tf_rep.report.confusion
    assert lite.report.accuracy == tf_rep.report.accuracy
    assert lite.report.loss == pytest.approx(tf_rep.report.loss, abs=1e-4)


def test_tflite_engine_without_an_export_says_how_to_make_one(trained_bundle, colour_data):
    result = run("evaluate", colour_data, "--model", trained_bundle, "--engine", "tflite")
    assert result.exit_code == 1
    assert "model.tflite" in result.output and "tlcli export --format tflite" in result.output


def test_auto_engine_without_an_export_loads_tensorflow_only_after_the_scan(trained_bundle, tmp_path, monkeypatch):
    import tlcli
    from tlcli.deploy import inference
    from tlcli.errors import DatasetError

    loaded = []
    monkeypatch.setattr(inference, "TFEngine", lambda b: loaded.append(b))
    with pytest.raises(DatasetError):  # the folder check fails first: the SavedModel was never loaded
        tlcli.evaluate(tmp_path / "missing", model_dir=trained_bundle, engine="auto")
    assert loaded == []


def test_class_folder_unknown_to_the_model_is_a_clear_error(trained_bundle, colour_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colour_data, data)
    (data / "purple").mkdir()
    solid_image((128, 0, 128)).save(data / "purple" / "p.png")
    result = run("evaluate", data, "--model", trained_bundle)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "purple" in lines[0] and "(blue, green, red)" in lines[0]
    assert "Traceback" not in result.output


def test_missing_label_folder_warns_and_unreadable_files_are_skipped_with_exit_1(trained_bundle, colour_data,
                                                                                  tmp_path):
    data = tmp_path / "data"
    for label in ("blue", "red"):
        shutil.copytree(colour_data / label, data / label)
    (data / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    result = run("evaluate", data, "--model", trained_bundle, "--json")
    assert result.exit_code == 1, result.output
    d = json.loads(result.stdout)
    assert [(s["path"], s["reason"]) for s in d["skipped"]] == [(str(data / "red" / "broken.jpg"), "not an image")]
    assert len(d["warnings"]) == 1 and "green" in d["warnings"][0] and "no folder" in d["warnings"][0]
    rep = Report.from_dict(d["report"])
    assert rep.count == 16
    assert {c.label: c.support for c in rep.per_class} == {"blue": 8, "green": 0, "red": 8}
    assert "green" in result.stderr and "broken.jpg" in result.stderr


# ---- plots -----------------------------------------------------------------------------------

def _synthetic_report(k: int) -> Report:
    import numpy as np

    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 4, (k, k)) + np.diag(rng.integers(20, 400, k))
    labels = [f"class_{i:02d}_with_a_rather_long_name" for i in range(k)]
    support = confusion.sum(1)
    return Report(labels=labels, count=int(confusion.sum()), accuracy=float(np.trace(confusion) / confusion.sum()),
                  top_k=5, top_k_accuracy=1.0, loss=0.3,
                  per_class=[ClassMetrics(lab, 0.9, 0.9, 0.9, int(s)) for lab, s in zip(labels, support)],
                  macro={"precision": 0.9, "recall": 0.9, "f1": 0.9},
                  weighted={"precision": 0.9, "recall": 0.9, "f1": 0.9},
                  confusion=confusion.tolist(), mistakes=[])


@pytest.mark.parametrize("k", [2, 20])
def test_confusion_matrix_png_grows_with_the_classes(tmp_path, k):
    from tlcli.insight import plots

    path = plots.confusion_matrix(_synthetic_report(k), tmp_path / "cm.png")
    img = Image.open(path)
    img.load()
    assert img.format == "PNG"
    if k == 20:  # room for 400 annotated cells: > 45 px per class each way
        assert 900 <= img.width <= 3000 and 900 <= img.height <= 3000
    else:
        assert 400 <= img.width <= 1200 and 400 <= img.height <= 1200
    colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, shading and colour bar, not a blank canvas


def test_training_curves_give_each_phase_its_axis_train_and_validation_alike_and_the_legend_apart(tmp_path):
    from tlcli.insight import plots

    row = lambda e, val=True: {"epoch": e, "loss": 1 / e, "accuracy": 1 - 0.5 / e,  # noqa: E731
                               **({"val_loss": 1.2 / e, "val_accuracy": 1 - 0.6 / e} if val else {})}
    # As training records it: the head's cross-validation curve runs on past the chosen epoch
    # (7, patience 5), while the head itself is fit for 7 epochs.
    head_rows = [row(e) if e <= 7 else {"epoch": e, "val_loss": 1.2 / e, "val_accuracy": 0.9} for e in range(1, 13)]
    history = {"head": head_rows, "fine-tune": [row(e) for e in range(1, 4)],
               "head refit": [row(e, False) for e in range(1, 6)]}
    fig = plots.curves_figure(history)
    fig.draw_without_rendering()
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 6  # loss and accuracy of each phase
    spans = {}
    for ax in axes:
        phase = ax.get_lines()[0].get_label().split(":")[0]
        ends = {line.get_label(): (min(line.get_xdata()), max(line.get_xdata())) for line in ax.get_lines()}
        assert len(set(ends.values())) == 1, ends  # train and validation over the same epochs
        spans.setdefault(phase, set()).add((next(iter(ends.values())), ax.get_xlim()))
    assert spans == {"head": {((1, 7), (0.5, 7.5))}, "fine-tune": {((1, 3), (0.5, 3.5))},
                     "head refit": {((1, 5), (0.5, 5.5))}}
    width = fig.bbox.width
    assert all(ax.get_window_extent().width > width / 5 for ax in axes)  # a 3-epoch phase is as readable
    [legend] = fig.legends
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert [t.get_text() for t in legend.get_texts()] == [
        "head: train", "head: validation (cross-validation folds)", "fine-tune: train",
        "fine-tune: validation (holdout)", "head refit: train"]
    img = Image.open(plots.training_curves(history, tmp_path / "curves.png"))
    img.load()
    assert img.format == "PNG" and (img.width, img.height) == (1300, 660)
    empty = plots.curves_figure({})
    assert [ax.texts[0].get_text() for ax in empty.axes] == ["no epochs recorded"] * 2 and not empty.legends


# ---- what training leaves for watching --------------------------------------------------------

def test_training_writes_tensorboard_scalars_and_curves_into_the_bundle(twin_bundle):
    meta = json.loads((twin_bundle / "tlcli.json").read_text())
    history = meta["training"]["history"]
    assert list(history) == ["head"]
    assert meta["training"]["tensorboard"] == "logs"
    scalars = _read_events(twin_bundle / "logs")
    assert set(scalars) == {"head/loss", "head/accuracy", "head/val_loss", "head/val_accuracy"}
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        rows = [r for r in history["head"] if metric in r]
        logged = scalars[f"head/{metric}"]
        assert rows and [step for step, _ in logged] == [r["epoch"] for r in rows]
        assert [v for _, v in logged] == pytest.approx([r[metric] for r in rows], rel=1e-6)
    assert len(scalars["head/loss"]) == meta["training"]["head_epochs"]
    img = Image.open(twin_bundle / "training_curves.png")
    img.load()
    assert img.format == "PNG" and img.width >= 800 and img.height >= 300


def test_tensorboard_absolute_dir_gets_a_run_folder_with_fine_tune_scalars(tmp_path, train_args, colour_data):
    import tlcli

    args = dict(train_args, epochs=6, fine_tune=True, fine_tune_epochs=2, tensorboard=str(tmp_path / "tb"))
    tlcli.train(colour_data, out=str(tmp_path / "model"), **args)
    runs = list((tmp_path / "tb").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("model-")
    meta = json.loads((tmp_path / "model" / "tlcli.json").read_text())
    assert meta["training"]["tensorboard"] == str(runs[0])
    assert not (tmp_path / "model" / "logs").exists()
    scalars = _read_events(runs[0])
    assert {"head/loss", "head/val_accuracy", "fine-tune/loss", "fine-tune/val_loss"} <= set(scalars)
    assert [s for s, _ in scalars["fine-tune/val_accuracy"]] == \
        [r["epoch"] for r in meta["training"]["history"]["fine-tune"]]
    assert (tmp_path / "model" / "training_curves.png").exists()


def test_tensorboard_none_writes_no_logs_and_a_relative_dir_may_not_leave_the_bundle(trained_bundle, tmp_path,
                                                                                      train_args, colour_data):
    import tlcli
    from tlcli.errors import UsageError

    assert not (trained_bundle / "logs").exists()
    assert json.loads((trained_bundle / "tlcli.json").read_text())["training"]["tensorboard"] is None
    with pytest.raises(UsageError, match="--tensorboard ../elsewhere"):
        tlcli.train(colour_data, out=str(tmp_path / "m"), **dict(train_args, tensorboard="../elsewhere"))
    assert not (tmp_path / "m").exists()
