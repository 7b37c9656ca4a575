"""Fixing labels without touching a photo: audit's review.csv, its picker on audit.html (in
Chromium), and ``tlcli train --labels-override`` with the tiny backbone: relabels and drops
applied to the scan, the files unchanged, the features all from the cache, the bundle's record."""

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import COLOURS, make_colour_dataset, run_cli
from tests.test_audit import CHROMIUM, snapshot

HEADER = "path,label,suggested_label,evidence,action,new_label"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_backbone):
    """Split folders of colour photos with two planted flips (a red photo moved into blue/, a
    green one into red/), audited with a report."""
    import tlcli

    root = tmp_path_factory.mktemp("review") / "photos"
    make_colour_dataset(root / "train", per_class=10)
    make_colour_dataset(root / "val", per_class=3, start=50)
    flips = {root / "train/blue/red_3.png": "red", root / "train/red/green_4.jpg": "green"}
    for moved, true in flips.items():
        shutil.move(root / "train" / true / moved.name, moved)
    cache, report = tmp_path_factory.mktemp("review-cache"), tmp_path_factory.mktemp("review-report") / "r"
    result = tlcli.audit(root, backbone=str(tiny_backbone), image_size=32, cache_dir=cache, batch_size=8,
                         report_dir=report)
    return {"root": root, "flips": {str(p): label for p, label in flips.items()}, "cache": cache,
            "report": report, "result": result}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_audit_writes_a_review_with_the_flips_suggested_and_no_action_chosen(planted):
    report = planted["report"]
    assert "review.csv" in planted["result"].files
    assert (report / "review.csv").read_text().splitlines()[0] == HEADER
    rows = {r["path"]: r for r in read_rows(report / "review.csv")}
    for path, true in planted["flips"].items():
        assert rows[path]["label"] != true and rows[path]["suggested_label"] == true
        assert re.match(r"likely mislabel, score [01]\.\d{3}, false alarm \d+%", rows[path]["evidence"])
    assert all(r["action"] == r["new_label"] == "" for r in rows.values())
    assert all(os.path.isabs(p) for p in rows)
    findings = planted["result"]
    named = {m.path for m in findings.likely_mislabeled} | {o.path for o in findings.outliers} \
        | {p for g in findings.near_duplicates for p in g.paths}
    assert set(rows) == {os.path.abspath(p) for p in named}  # one row per image a finding names


def test_round_trip_relabels_and_drops_with_cached_features_and_no_file_changed(planted, tiny_backbone, tmp_path):
    from tlcli import bundle
    from tlcli.bundle.share import shareable_meta

    root, rows = planted["root"], read_rows(planted["report"] / "review.csv")
    for r in rows:
        r["action"] = "relabel" if r["path"] in planted["flips"] else "keep"
    dropped = str(root / "train/green/green_6.jpg")
    rows.append({"path": "train/green/green_6.jpg", "label": "green", "action": "drop"})  # relative to DIR
    review = tmp_path / "review.csv"
    with open(review, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, HEADER.split(","), restval="")
        w.writeheader()
        w.writerows(rows)
    before = snapshot(root)
    out = tmp_path / "model"
    result = run_cli("train", root, "--labels-override", review, "--out", out, "--backbone", tiny_backbone,
                     "--image-size", 32, "--epochs", 60, "--batch-size", 8, "--tensorboard", "none",
                     "--cache-dir", planted["cache"], "--json")
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert snapshot(root) == before  # not a file moved, renamed or rewritten
    assert trained["extracted"] == 0  # every feature from the audit's cache: keyed by content
    digest = hashlib.sha256(review.read_bytes()).hexdigest()
    expected = {"file": str(review), "sha256": digest, "rows": len(rows), "relabelled": 2, "dropped": 1,
                "kept": len(rows) - 3}
    assert trained["labels_override"] == expected
    b = bundle.load(out)
    assert b.meta.labels_override == expected and b.meta.config["labels_override"] == str(review)
    labels = b.labels
    recorded = {p: labels[i] for p, i in b.splits()["train"]}
    assert {p: recorded[p] for p in planted["flips"]} == planted["flips"]
    assert dropped not in recorded and len(recorded) == 30 - 1
    assert trained["train_counts"] == {"blue": 10, "green": 9, "red": 10}
    shared = shareable_meta(b.meta.to_dict(), out)  # a shared copy names the review by file only
    assert shared["labels_override"]["file"] == "review.csv" and shared["config"]["labels_override"] is None
    # A bundle made before the field loads, and is written back without it.
    meta = json.loads((out / "tlcli.json").read_text())
    meta.pop("labels_override")
    (out / "tlcli.json").write_text(json.dumps(meta))
    old = bundle.load(out).meta
    assert old.labels_override is None and "labels_override" not in old.to_dict()


def test_the_summary_names_the_override(planted, tiny_backbone, tmp_path):
    review = tmp_path / "review.csv"
    review.write_text(f"{HEADER}\n{next(iter(planted['flips']))},blue,red,,relabel,\n")
    result = run_cli("train", planted["root"], "--labels-override", review, "--out", tmp_path / "model",
                     "--backbone", tiny_backbone, "--image-size", 32, "--epochs", 30, "--batch-size", 8,
                     "--tensorboard", "none", "--cache-dir", planted["cache"], columns=80)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("labels override" in line and "1 relabelled, 0 dropped, 0 kept" in line for line in lines)
    assert max(len(line) for line in lines) <= 80


@pytest.mark.parametrize("row, message", [
    ("{flip},blue,red,,move,", "line 2: action 'move' is none of keep, relabel, drop"),
    ("{flip},blue,,,relabel,", "line 2: relabel to what? Fill in new_label"),
    ("{flip},blue,red,,relabel,purple", "line 2: label 'purple' is not a label of the data (blue, green, red)"),
    ("{root}/train/blue/nope.png,blue,red,,drop,", "line 2: {root}/train/blue/nope.png is not one of the images"),
    ("{flip},blue,red,,relabel,\ntrain/blue/red_3.png,blue,,,drop,",
     "line 3: train/blue/red_3.png is also on line 2 with another action"),  # one photo, written two ways
    ("{flip},green,red,,relabel,", "line 2: {flip} is labelled 'blue' in the data, not 'green' as the review says"),
])
def test_a_bad_review_line_is_a_one_line_error_naming_the_line(planted, tmp_path, row, message):
    from tlcli import data
    from tlcli.config import TrainConfig
    from tlcli.errors import DatasetError

    values = {"flip": next(iter(planted["flips"])), "root": planted["root"]}
    review = tmp_path / "review.csv"
    review.write_text(f"{HEADER}\n{row.format(**values)}\n")
    cfg = TrainConfig(data_dir=str(planted["root"]), labels_override=str(review))
    with pytest.raises(DatasetError) as caught:
        data.scan_splits(cfg, image_size=32)
    assert str(caught.value) == str(caught.value).strip() and "\n" not in str(caught.value)
    assert f"--labels-override {review}: {message.format(**values)}" in str(caught.value)


def test_the_cli_refuses_a_bad_review_before_any_work(planted, tmp_path):
    review = tmp_path / "review.csv"
    review.write_text("path,label\nx.jpg,blue\n")
    result = run_cli("train", planted["root"], "--labels-override", review, "--out", tmp_path / "model")
    assert result.exit_code != 0 and not (tmp_path / "model").exists()
    assert result.stderr.strip().splitlines() == [
        f"error: --labels-override {review}: line 1: the header must name at least path and action (as "
        f"review.csv has: {HEADER}), not path,label"]


def test_a_labels_csv_takes_the_override_relative_to_its_folder(planted, tmp_path):
    from tlcli import data
    from tlcli.config import TrainConfig

    root = planted["root"]
    lines = ["path,label,split"] + [f"{p.relative_to(root.parent)},{p.parent.name},{p.parts[-3]}"
                                    for p in sorted(root.glob("*/*/*"))]
    (root.parent / "labels.csv").write_text("\n".join(lines) + "\n")
    flip = Path(next(iter(planted["flips"])))
    review = tmp_path / "review.csv"  # elsewhere: its relative paths are the labels CSV's
    review.write_text(f"{HEADER}\n'photos/{flip.relative_to(root)},blue,'red,,relabel,\n"
                      "photos/val/green/green_50.jpg,green,,,drop,\n")
    cfg = TrainConfig(data_dir=str(root.parent / "labels.csv"), labels_override=str(review))
    splits = data.scan_splits(cfg, image_size=32)
    assert splits.override["relabelled"] == 1 and splits.override["dropped"] == 1
    train = {os.path.abspath(s.path): splits.labels[s.label] for s in splits.train}
    assert train[str(flip)] == "red"
    assert str(root / "val/green/green_50.jpg") not in {os.path.abspath(s.path) for s in splits.val}
    assert len(splits.val) == 3 * 3 - 1


def test_review_picks_on_the_page_download_as_review_csv(planted, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from tlcli.data import labels_override
    from tlcli.insight import html_report

    report = planted["report"]
    rows = list(csv.reader(open(report / "review.csv", newline="", encoding="utf-8")))[1:]
    index = {r[0]: i for i, r in enumerate(rows)}
    red_in_blue, green_in_red = planted["flips"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                       else route.continue_())  # offline: any other request would fail
            page.goto((report / "audit.html").as_uri())
            with page.expect_download() as untouched:
                page.click("#review-download")
            assert Path(untouched.value.path()).read_bytes() == (report / "review.csv").read_bytes()
            pick = f"select.action[data-row='{index[red_in_blue]}']"
            page.select_option(pick, "relabel")  # to the suggested label, preselected
            target = f"select.new-label[data-row='{index[red_in_blue]}']"
            assert page.is_visible(target) and page.input_value(target) == str(list(COLOURS).index("red"))
            page.select_option(f"select.action[data-row='{index[green_in_red]}']", "relabel")
            page.select_option(f"select.new-label[data-row='{index[green_in_red]}']", str(list(COLOURS).index("blue")))
            page.select_option(f"select.action[data-row='{index[green_in_red]}']", "drop")  # changed its mind
            assert not page.is_visible(f"select.new-label[data-row='{index[green_in_red]}']")
            assert page.inner_text("#review-count") == "2 action(s) chosen"
            with page.expect_download() as filled:
                page.click("#review-download")
            assert filled.value.suggested_filename == "review.csv"
            got = Path(filled.value.path()).read_bytes()
        finally:
            browser.close()
    actions = {red_in_blue: ["relabel", "red"], green_in_red: ["drop", ""]}
    assert got == html_report.csv_bytes(HEADER.split(","), [r[:4] + actions.get(r[0], ["", ""]) for r in rows])
    (tmp_path / "review.csv").write_bytes(got)
    read = labels_override.read(tmp_path / "review.csv")
    assert {(r.path, r.action, r.label) for r in read.rows if r.action != "keep"} == \
        {(red_in_blue, "relabel", "red"), (green_in_red, "drop", "")}
