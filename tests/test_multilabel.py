"""Several labels a photo (#27): a path,labels CSV, one sigmoid per label with thresholds chosen by
cross-validation, and predict, evaluate, serve, export and audit on such a model; single-label
bundles stay as they were."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tlcli
from tests.helpers import COLOURS, run_cli
from tlcli import data, multilabel_metrics
from tlcli.errors import DatasetError
from tlcli.model import multilabel

PAIRS = [(name,) for name in COLOURS] + list(itertools.combinations(COLOURS, 2))


def two_colours(a, b, seed: int) -> Image.Image:
    """A photo whose left half is colour ``a`` and right half colour ``b`` (with noise)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((24, 24, 3), np.float32)
    arr[:, :12], arr[:, 12:] = a, b
    return Image.fromarray(np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8), "RGB")


def make_multilabel_set(root: Path, per_set: int = 6, *, name: str = "labels.csv") -> Path:
    """Photos of one or two colours, labelled with their colours in ``root/labels.csv`` (path,labels)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for combo in PAIRS:
        for i in range(per_set):
            file = f"{'_'.join(combo)}_{i}.png"
            two_colours(COLOURS[combo[0]], COLOURS[combo[-1]], seed=len(rows)).save(root / file)
            rows.append(f"{file},{';'.join(combo)}")
    (root / name).write_text("\n".join(rows) + "\n")
    return root / name


@pytest.fixture(scope="module")
def multi_csv(tmp_path_factory):
    return make_multilabel_set(tmp_path_factory.mktemp("multi") / "photos")


@pytest.fixture(scope="module")
def multi_bundle(multi_csv, tiny_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi-bundle") / "model"
    tlcli.train(multi_csv, out=str(out), backbone=str(tiny_backbone), image_size=32, epochs=60, batch_size=8,
                tensorboard=None, cache_dir=str(tmp_path_factory.mktemp("multi-cache")), extractor="tf")
    return out


# ---- the CSV ---------------------------------------------------------------------------------

def test_a_labels_column_gives_each_photo_its_label_set(tmp_path):
    csv = make_multilabel_set(tmp_path, per_set=2)
    folder = data.scan(csv, image_size=8)
    assert folder.labels == ["blue", "green", "red"]
    sets = {Path(s.path).name: [folder.labels[i] for i in s.label_set()] for s in folder.samples}
    assert sets["blue_red_0.png"] == ["blue", "red"] and sets["green_1.png"] == ["green"]
    assert folder.counts() == {"blue": 6, "green": 6, "red": 6}  # a photo counts under each of its labels


@pytest.mark.parametrize("lines, message", [
    (["path,labels", "a.png,red;", "b.png,blue"], r"line 2: the label .*empty.*joined by ';'"),
    (["path,label,labels", "a.png,red,red"], r"line 1: the header must be path,label or path,labels"),
    (["path,labels", "a.png,red;blue", "a.png,red"], r"line 3: .*a.png is also on line 2 with another label"),
])
def test_a_malformed_labels_csv_is_one_line_naming_the_line(tmp_path, lines, message):
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as caught:
        data.scan(csv, image_size=8)
    assert "\n" not in str(caught.value)


# ---- thresholds ------------------------------------------------------------------------------

def test_the_threshold_maximises_f1_and_sits_between_two_photos():
    probs = np.array([0.9, 0.8, 0.7, 0.35, 0.3, 0.2, 0.1])
    truth = np.array([1, 1, 0, 1, 1, 0, 0])
    # Predicting the top 5 finds every positive with one false one: F1 8/9, the best cut.
    assert multilabel_metrics.best_threshold(probs, truth) == pytest.approx((0.3 + 0.2) / 2)
    assert multilabel_metrics.best_threshold(probs, np.zeros(7)) == 0.5  # no positive: no F1 to maximise


def test_each_labels_threshold_is_chosen_on_its_out_of_fold_probabilities():
    rng = np.random.default_rng(0)
    Y = (rng.random((240, 3)) < [0.5, 0.25, 0.1]).astype(float)
    X = Y @ rng.normal(size=(3, 16)) * 0.6 + rng.normal(size=(240, 16))
    fit, truth = multilabel.fit_multilabel(X, Y, seed=0, epochs=200)
    assert np.isnan(fit.oof_probs).sum() == 0 and np.array_equal(truth, Y > 0.5)
    fit, info = multilabel.finish(fit, truth)
    assert len(info["temperatures"]) == 3
    for j in range(3):
        p = fit.oof_probs[:, j]
        assert fit.thresholds[j] == pytest.approx(multilabel_metrics.best_threshold(p, truth[:, j]))

        f1 = [multilabel_metrics.compute(truth[:, [j]], p[:, None], ["x"], [cut]).micro_f1
              for cut in (fit.thresholds[j], 0.5)]
        assert f1[0] >= f1[1]
    assert len(set(np.round(fit.thresholds, 3))) > 1  # chosen per label, not one value for all


# ---- a multi-label bundle --------------------------------------------------------------------

def test_a_labels_csv_trains_a_multi_label_bundle(multi_bundle):
    meta = json.loads((multi_bundle / "tlcli.json").read_text())
    assert meta["task"] == "multi_label" and meta["config"]["multi_label"] is True
    assert len(meta["thresholds"]) == 3 and all(0 < t < 1 for t in meta["thresholds"])
    assert meta["metrics"]["val"]["micro_f1"] == 1.0
    assert len(meta["training"]["calibration"]["temperatures"]) == 3
    assert tlcli.load_bundle(multi_bundle).meta.multi_label


def test_predict_lists_every_label_above_its_threshold(multi_bundle, multi_csv):
    two, one = multi_csv.parent / "green_red_1.png", multi_csv.parent / "blue_2.png"
    got = tlcli.predict([two, one], model_dir=multi_bundle, engine="tf", top_k=1)
    assert [p.labels for p in got] == [["green", "red"], ["blue"]]
    assert {q["label"] for q in got[0].predictions} == {"green", "red"}  # each shown label with its probability
    result = run_cli("predict", two, "--model", multi_bundle, "--engine", "tf", "--json", "--threshold", "0")
    line = json.loads(result.stdout)
    assert result.exit_code == 0 and set(line["labels"]) == set(COLOURS) and len(line["predictions"]) == 3
    table = run_cli("predict", two, "--model", multi_bundle, "--engine", "tf", columns=80).stdout
    assert "labels" in table and "green" in table and "red" in table
    assert max(map(len, table.splitlines())) <= 80


def test_evaluate_gives_the_multi_label_metrics_and_a_pr_curve(multi_bundle, multi_csv, tmp_path):
    r = tlcli.evaluate(multi_csv, model_dir=multi_bundle, engine="tf", report_dir=tmp_path / "report")
    rep = r.report
    assert rep.count == 36 and rep.micro_f1 == rep.macro_f1 == 1.0 and rep.accuracy == 1.0
    assert rep.mean_average_precision == 1.0 and [m.positives for m in rep.per_label] == [18, 18, 18]
    assert (tmp_path / "report" / "pr_curves.png").read_bytes().startswith(b"\x89PNG")
    every = tlcli.evaluate(multi_csv, model_dir=multi_bundle, engine="tf", threshold=0.0).report
    assert every.micro_f1 < 1.0 and all(m.threshold == 0.0 and m.recall == 1.0 for m in every.per_label)
    shown = run_cli("evaluate", multi_csv, "--model", multi_bundle, "--engine", "tf", columns=80)
    assert shown.exit_code == 0 and "mAP" in shown.stdout and "micro" in shown.stdout
    assert max(map(len, shown.stdout.splitlines())) <= 80


def test_the_tflite_export_agrees_and_serve_answers_with_labels(multi_bundle, multi_csv, tmp_path):
    import shutil

    from tests.test_serve import call, multipart, running
    from tlcli.deploy.server import make_app

    bundle = tmp_path / "model"
    shutil.copytree(multi_bundle, bundle)
    exported = tlcli.export_tflite(bundle)
    assert exported.task == "multi_label" and exported.agreement == 1.0 and exported.export_accuracy == 1.0
    photos = [multi_csv.parent / name for name in ("green_red_1.png", "blue_2.png", "blue_red_3.png")]
    lite = tlcli.predict(photos, model_dir=bundle, engine="tflite")
    assert [p.labels for p in lite] == [p.labels for p in tlcli.predict(photos, model_dir=bundle, engine="tf")]
    with running(make_app(bundle, engine="tflite", workers=1)) as base:
        body, headers = multipart([(p.name, p.read_bytes()) for p in photos])
        status, _, answer = call(f"{base}/predict", "POST", body, headers)
        assert status == 200 and [a["labels"] for a in answer] == [["green", "red"], ["blue"], ["blue", "red"]]
        rows = np.zeros((1, 32, 32, 3), np.float32).tolist()
        status, _, tf_serving = call(f"{base}/v1/models/model:predict", "POST",
                                     json.dumps({"instances": rows}).encode(), {"Content-Type": "application/json"})
        assert status == 200 and set(tf_serving) == {"predictions"} and len(tf_serving["predictions"][0]) == 3


def test_audit_names_a_missing_and_an_extra_label(multi_csv, tiny_backbone, tmp_path):
    lines = multi_csv.read_text().splitlines()
    planted = [line.replace("green_red_1.png,green;red", "green_red_1.png,green")
               .replace("blue_2.png,blue", "blue_2.png,blue;red") for line in lines]
    csv = multi_csv.parent / "planted.csv"
    csv.write_text("\n".join(planted) + "\n")
    before = {p: p.read_bytes() for p in multi_csv.parent.glob("*.png")}
    r = tlcli.audit(csv, backbone=str(tiny_backbone), image_size=32, val_split=0.0, extractor="tf",
                    cache_dir=str(tmp_path / "cache"))
    found = {(Path(m.path).name, m.label, m.suggested_label) for m in r.likely_mislabeled}
    assert ("green_red_1.png", "green", "green;red") in found and ("blue_2.png", "blue;red", "blue") in found
    assert len(found) <= 4
    assert {p: p.read_bytes() for p in multi_csv.parent.glob("*.png")} == before


# ---- single-label bundles --------------------------------------------------------------------

def test_single_label_bundles_old_and_new_answer_as_before(bundle_copy, colour_data):
    meta = json.loads((bundle_copy / "tlcli.json").read_text())
    assert meta["task"] == "single_label" and "thresholds" not in meta
    photo = colour_data / "red" / "red_0.jpg"
    [new] = tlcli.predict([photo], model_dir=bundle_copy, engine="tf")
    del meta["task"]  # as a bundle of a tlcli before multi-label models
    (bundle_copy / "tlcli.json").write_text(json.dumps(meta))
    old = tlcli.load_bundle(bundle_copy)
    assert not old.meta.multi_label and "task" not in old.meta.to_dict()
    [p] = tlcli.predict([photo], model_dir=bundle_copy, engine="tf")
    # (no "labels"; the bundle's unknown detector adds its two fields)
    assert p == new and p.labels is None and set(p.to_dict()) == {"path", "predictions", "error", "unknown",
                                                                  "unknown_score"}
    refused = run_cli("predict", photo, "--model", bundle_copy, "--threshold", "0.5")
    assert refused.exit_code != 0 and "single-label" in refused.output


def test_a_review_relabels_a_multi_label_photo_to_a_label_set(tmp_path):
    from tlcli.data import labels_override

    csv = make_multilabel_set(tmp_path / "photos", per_set=2)
    folder = data.scan(csv, image_size=8)
    review = tmp_path / "review.csv"
    review.write_text("path,label,suggested_label,evidence,action,new_label\n"
                      "green_1.png,green,green;red,,relabel,\n"
                      "blue_red_0.png,blue;red,blue,,relabel,\n"
                      "red_0.png,red,,,drop,\n")
    parts, record = labels_override.apply(labels_override.read(review), {"train": folder.samples}, folder.labels,
                                          root=csv.parent)
    sets = {Path(s.path).name: [folder.labels[i] for i in s.label_set()] for s in parts["train"]}
    assert sets["green_1.png"] == ["green", "red"] and sets["blue_red_0.png"] == ["blue"]
    assert "red_0.png" not in sets and (record["relabelled"], record["dropped"]) == (2, 1)
