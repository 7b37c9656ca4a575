"""tlcli audit: exact findings on small datasets with known defects, none on a clean one, the
JSON schema, train's one-line check, the near-neighbour search, and the HTML report in Chromium."""

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

CHROMIUM = Path("/usr/bin/chromium")
BINS = 16
CLASSES = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def make_histogram_backbone(path: Path) -> Path:
    """A hub-format SavedModel: float32 [b, h, w, 3] in [0, 1] -> [b, 3 * BINS], each channel's
    soft histogram. Like a real backbone's pooled features, it hardly changes when a picture is
    resized, recompressed, cropped a little or mirrored, while two different pictures differ."""
    import tensorflow as tf

    root = tf.train.Checkpoint()
    centres = tf.constant((np.arange(BINS) + 0.5) / BINS, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(images):
        weights = tf.nn.relu(1.0 - tf.abs(images[..., None] - centres) * BINS)  # [b, h, w, 3, BINS]
        return tf.reshape(tf.reduce_mean(weights, [1, 2]), [-1, 3 * BINS])

    root.__call__ = call
    tf.saved_model.save(root, str(path))
    return path


def picture(colour, seed: int, size: int = 48, patches: int = 4) -> Image.Image:
    """A picture of one class: its colour, shaded at random, with ``patches`` patches of random
    colours, so that no two pictures share a histogram."""
    rng = np.random.default_rng(seed)
    arr = np.broadcast_to(np.array(colour, np.float32) * rng.uniform(0.7, 1.15), (size, size, 3)).copy()
    for _ in range(patches):
        x, y = rng.integers(0, size - 12, 2)
        w, h = rng.integers(8, 22, 2)
        arr[y:y + h, x:x + w] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_pictures(root: Path, per_class: int, *, start: int = 0) -> dict:
    paths = {}
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            paths[(name, i)] = p = root / name / f"{name}_{i:02d}.jpg"
            picture(colour, seed=int(hashlib.sha256(f"{name}{i}".encode()).hexdigest()[:8], 16)).save(p, quality=92)
    return paths


def recompressed(src: Path, dst: Path, scale: float, quality: int) -> Path:
    img = Image.open(src).convert("RGB")
    size = (round(img.width * scale), round(img.height * scale))
    img.resize(size, Image.Resampling.BILINEAR).save(dst, quality=quality)
    return dst


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def histogram_backbone(tmp_path_factory):
    return make_histogram_backbone(tmp_path_factory.mktemp("histogram") / "backbone")


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    """train/ and val/ with known defects, and what they are: two training pictures copied into
    val resized and recompressed, a red picture filed as green, an identical copy within blue,
    and a flat grey placeholder filed as blue."""
    root = tmp_path_factory.mktemp("defects")
    train, _ = make_pictures(root / "train", 10), make_pictures(root / "val", 4, start=50)
    leaks = [(train[("red", 3)], recompressed(train[("red", 3)], root / "val/red/copy_of_red_03.jpg", 0.75, 80)),
             (train[("green", 5)], recompressed(train[("green", 5)], root / "val/green/copy_green_05.jpg", 1.3, 70))]
    flipped = root / "train/green/red_07.jpg"  # a clearly red one
    train[("red", 7)].unlink()
    picture(CLASSES["red"], seed=7, patches=1).save(flipped, quality=92)
    exact = shutil.copyfile(train[("blue", 2)], root / "train/blue/blue_02_again.jpg")
    placeholder = root / "train/blue/placeholder.png"
    Image.new("RGB", (48, 48), (128, 128, 128)).save(placeholder)
    return {"root": root, "train": root / "train", "val": root / "val", "leaks": leaks, "flipped": flipped,
            "exact": (train[("blue", 2)], exact), "placeholder": placeholder}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("audit-cache")


@pytest.fixture(scope="module")
def audited(defects, histogram_backbone, cache, tmp_path_factory):
    """The library audit of ``defects``, with its report, and the dataset before it ran."""
    import tlcli

    before = snapshot(defects["root"])
    report = tmp_path_factory.mktemp("audit-report") / "report"
    r = tlcli.audit(defects["train"], val_dir=defects["val"], backbone=str(histogram_backbone),
                          image_size=32, cache_dir=cache, batch_size=16, report_dir=report)
    return r, report, before


def test_finds_exactly_the_injected_defects(audited, defects):
    r, _, _ = audited
    assert [g.kind for g in r.near_duplicates] == ["train_val_leak", "train_val_leak", "exact"]
    assert sorted((g.paths, g.splits, g.labels[0] == g.labels[1]) for g in r.near_duplicates[:2]) == \
        sorted(([str(a), str(b)], ["train", "val"], True) for a, b in defects["leaks"])
    assert r.near_duplicates[0].similarity >= r.near_duplicates[1].similarity  # most similar first
    assert r.near_duplicates[2].paths == [str(p) for p in defects["exact"]]
    assert r.near_duplicates[2].similarity == 1.0
    assert all(r.thresholds["near_duplicate"] <= g.similarity < 1.0 for g in r.near_duplicates[:2])
    assert [(m.path, m.label, m.suggested_label) for m in r.likely_mislabeled] == [(str(defects["flipped"]), "green",
                                                                                    "red")]
    assert 0.5 < r.likely_mislabeled[0].score <= 1.0
    assert [(o.path, o.label) for o in r.outliers] == [(str(defects["placeholder"]), "blue")]
    assert r.class_counts == {"train": {"blue": 12, "green": 11, "red": 9}, "val": {"blue": 4, "green": 5, "red": 5}}
    assert r.imbalance == pytest.approx(12 / 9, abs=1e-4)
    assert r.image_stats["images"] == 46 and r.image_stats["width"]["max"] == round(48 * 1.3)


def test_a_dataset_root_of_split_folders_is_audited_as_its_splits(audited, defects, histogram_backbone, cache,
                                                                   tmp_path):
    import tlcli

    root = shutil.copytree(defects["root"], tmp_path / "dataset")
    (root / "test" / "red").mkdir(parents=True)
    (root / "test" / "blue").mkdir(parents=True)
    leaked = shutil.copyfile(root / "train/red/red_04.jpg", root / "test/red/red_04.jpg")
    picture(CLASSES["blue"], seed=999).save(root / "test/blue/new.jpg", quality=92)
    events = []
    r = tlcli.audit(root, backbone=str(histogram_backbone), image_size=32, cache_dir=cache, batch_size=16,
                    progress=events.append)
    assert f"DIR {root}: split folders found; using train/ for training, val/ for validation, test/ for a final " \
           "test report" in [e.message for e in events if e.kind == "info"]
    assert r.labels == ["blue", "green", "red"]
    assert r.class_counts == dict(audited[0].class_counts, test={"blue": 1, "green": 0, "red": 1})
    assert [(g.kind, g.paths, g.splits) for g in r.near_duplicates if "test" in g.splits] == \
        [("train_val_leak", [str(root / "train/red/red_04.jpg"), str(leaked)], ["train", "test"])]


def test_the_audit_changes_nothing_in_the_dataset(audited, defects):
    assert snapshot(defects["root"]) == audited[2]


def test_a_clean_set_has_no_near_duplicates_and_no_mislabels(tmp_path, histogram_backbone, cache):
    import tlcli

    make_pictures(tmp_path / "clean", 12)
    r = tlcli.audit(tmp_path / "clean", backbone=str(histogram_backbone), image_size=32, cache_dir=cache,
                          batch_size=16)
    assert r.near_duplicates == [] and r.likely_mislabeled == []
    assert sum(r.class_counts["val"].values()) == 6  # the default --val-split, as train splits it
    # The threshold came from the calibration copies, and distinct pictures stay under it.
    assert r.thresholds["calibration_copies"] == 4 * 30
    assert r.thresholds["distinct_similarity"] < r.thresholds["near_duplicate"]


def test_json_is_one_object_in_the_issue_schema_and_a_second_audit_extracts_nothing(audited, defects,
                                                                                     histogram_backbone, cache):
    result = run_cli("audit", defects["train"], "--val-dir", defects["val"], "--backbone", histogram_backbone,
                     "--image-size", 32, "--cache-dir", cache, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert list(d)[:6] == ["near_duplicates", "likely_mislabeled", "outliers", "class_counts", "skipped", "thresholds"]
    for g in d["near_duplicates"]:
        assert set(g) == {"paths", "labels", "splits", "similarity", "kind"}
        assert len(g["paths"]) == len(g["labels"]) == len(g["splits"]) >= 2
        assert g["kind"] in ("exact", "within_class", "across_classes", "train_val_leak")
        assert all(isinstance(p, str) for p in g["paths"]) and isinstance(g["similarity"], float)
    assert [set(m) for m in d["likely_mislabeled"]] == [{"path", "label", "suggested_label", "score", "false_alarm"}]
    assert set(d["mislabel_estimate"]) >= {"flagged", "expected_false_alarms", "strong", "estimated_errors"}
    assert [set(o) for o in d["outliers"]] == [{"path", "label", "score"}]
    assert set(d["class_counts"]) == {"train", "val"} and d["skipped"] == []
    assert {"near_duplicate", "outlier", "mislabel"} <= set(d["thresholds"])
    assert d["extracted"] == 0  # every feature came from the cache the library run filled
    assert d["near_duplicates"] == [vars(g) for g in audited[0].near_duplicates]


def test_tables_show_paths_relative_to_dir(audited, defects, histogram_backbone, cache):
    result = run_cli("audit", defects["train"], "--val-dir", defects["val"], "--backbone", histogram_backbone,
                     "--image-size", 32, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "green/red_07.jpg" in result.stdout and "blue/placeholder.png" in result.stdout
    assert "red/copy_of_red_03.jpg (red, val)" in result.stdout  # under --val-dir: relative to it
    assert str(defects["flipped"]) not in result.stdout and str(defects["placeholder"]) not in result.stdout
    assert "train_val_leak" in result.stdout and "remove the copies from one split" in result.stdout


def test_report_folder_holds_the_page_and_one_csv_per_kind_and_is_not_overwritten(audited, defects,
                                                                                 histogram_backbone, cache):
    import tlcli
    from tlcli.errors import OutputExistsError, UsageError

    r, report, _ = audited
    assert set(r.files) == {"audit.html", "near_duplicates.csv", "likely_mislabeled.csv", "outliers.csv", "review.csv"}
    rows = (report / "near_duplicates.csv").read_text().splitlines()
    assert rows[0] == "group,kind,similarity,path,label,split" and len(rows) == 1 + 6
    assert (report / "likely_mislabeled.csv").read_text().splitlines()[1].startswith(f"{defects['flipped']},green,red,")
    page = (report / "audit.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 6 + 1 + 1 and "http" not in page
    options = dict(val_dir=defects["val"], backbone=str(histogram_backbone), image_size=32, cache_dir=cache)
    with pytest.raises(OutputExistsError, match="--report .*not empty.*--force"):
        tlcli.audit(defects["train"], report_dir=report, **options)
    with pytest.raises(UsageError, match="--report .*image folder"):
        tlcli.audit(defects["train"], report_dir=defects["train"] / "report", **options)
    assert not (defects["train"] / "report").exists()


def test_train_warns_in_one_line_and_records_the_counts(defects, histogram_backbone, tmp_path):
    import tlcli
    from tlcli import bundle
    from tlcli.progress import Warn

    warnings = []
    r = tlcli.train(defects["train"], val_dir=str(defects["val"]), out=str(tmp_path / "model"),
                    backbone=str(histogram_backbone), image_size=32, epochs=60, batch_size=16, tensorboard=None,
                    cache_dir=str(tmp_path / "cache"),
                    progress=lambda e: warnings.append(e.message) if isinstance(e, Warn) else None)
    ours = [w for w in warnings if "tlcli audit" in w]
    # One flipped label among 32 images: the audit lists it, but it is no strong finding, so
    # train's warning is about the duplicates only (tests/test_label_noise.py: when it warns).
    assert ours == [f"2 group(s) of identical or near-identical images across train and val; "
                    f"run 'tlcli audit --model {tmp_path / 'model'}' to see them"]
    assert ours[0] in r.warnings
    meta = bundle.load(tmp_path / "model").meta
    assert meta.audit == {"train_val_duplicates": 2, "likely_mislabeled": meta.audit["likely_mislabeled"],
                          "cross_validated": 32, "mislabels_strong": False,
                          "mislabels_expected_false_alarms": meta.audit["mislabels_expected_false_alarms"],
                          "mislabels_p_value": meta.audit["mislabels_p_value"]}
    assert meta.audit["mislabels_p_value"] > 0.01  # what keeps the mislabels out of the warning
    assert meta.audit["likely_mislabeled"] <= 1
    # An audit after training extracts nothing: the same scan, split and feature cache.
    a = tlcli.audit(defects["train"], val_dir=defects["val"], backbone=str(histogram_backbone),
                    image_size=32, cache_dir=tmp_path / "cache", batch_size=16)
    assert (a.extracted, a.cached) == (0, 46)
    # The hint, run as printed, audits with the training's own settings: same backbone, size and
    # folders, so the same cached features and the same findings.
    hinted = run_cli("audit", "--model", tmp_path / "model", "--json")
    assert hinted.exit_code == 0, hinted.output
    found = json.loads(hinted.stdout)
    assert (found["extracted"], found["cached"]) == (0, 46)
    assert found["data_dir"] == str(defects["train"]) and found["val_dir"] == str(defects["val"])
    assert len(found["likely_mislabeled"]) == len(a.likely_mislabeled)


def test_a_bundle_made_before_the_audit_field_loads(bundle_copy):
    from tlcli import bundle

    meta_path = bundle_copy / "tlcli.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("audit", None)
    meta_path.write_text(json.dumps(meta))
    meta = bundle.load(bundle_copy).meta
    assert meta.audit is None and "audit" not in meta.to_dict()


# ---- the pieces ------------------------------------------------------------------------------

def test_blocked_search_equals_the_full_matrix_and_groups_join_chains():
    from tlcli.insight import neighbours

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20)).astype(np.float32)
    X[7] = X[3] * 2.0            # the same direction: similarity 1
    X[150] = X[3] + 1e-3         # nearly
    found = neighbours.top_k(X, 3, block=64)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    assert (found.index[:, 0] == S.argmax(axis=1)).all()
    np.testing.assert_allclose(found.similarity, -np.sort(-S, axis=1)[:, :3], atol=1e-5)
    pairs = found.pairs(0.999)
    assert [(i, j) for i, j, _ in pairs] == [(3, 7), (3, 150), (7, 150)]
    assert neighbours.groups(300, pairs) == [[3, 7, 150]]
    assert neighbours.groups(6, [(0, 1), (4, 5), (1, 2)]) == [[0, 1, 2], [4, 5]]
    above = neighbours.pairs_above(X, 0.5, block=64)  # the upper triangle, across blocks
    assert [(i, j) for i, j, _ in above] == [(i, j) for i in range(300) for j in range(i + 1, 300) if S[i, j] >= 0.5]
    assert len(above) > 3
    same = np.repeat(X[:1], 10, axis=0)  # ten identical rows, each keeping its 3 best: still one group
    assert neighbours.groups(10, neighbours.pairs_above(same, 0.99, max_per_row=3, block=4)) == [list(range(10))]
    sub = neighbours.top_k(X, 1, rows=[150, 10])
    assert sub.index[:, 0].tolist() == [int(S[150].argmax()), int(S[10].argmax())]


def test_report_page_shows_sizes_readable_thresholds_and_no_empty_tables(tmp_path):
    from tests.helpers import page_sections, solid_image
    from tlcli.insight import audit, html_report
    from tlcli.insight.findings import AuditResult, Outlier

    (tmp_path / "data" / "red").mkdir(parents=True)
    solid_image((200, 40, 40), size=(64, 48)).save(odd := tmp_path / "data" / "red" / "odd one.png")
    result = AuditResult(
        data_dir=str(tmp_path / "data"), val_dir=None, labels=["blue", "red"], near_duplicates=[],
        likely_mislabeled=[], outliers=[Outlier(str(odd), "red", 0.41234)],
        class_counts={"train": {"blue": 5, "red": 6}, "val": {"blue": 1}}, skipped=[],
        thresholds={"near_duplicate": 0.9123456789012345, "calibration_copies": 128,
                    "mislabel": {"blue": 0.7345678901234567, "red": 0.5}, "outlier": 0.30000000000000004},
        image_stats={"width": {"min": 64.0, "median": 300.5, "max": 1024.0},
                     "height": {"min": 48.0, "median": 200.0, "max": 768.0},
                     "aspect_ratio": {"min": 0.75, "median": 1.3333333333333333, "max": 2.0},
                     "images": 12, "smaller_than_input": 3})
    audit.write_report(result, html_report.prepare_dir(tmp_path / "report", data=[], force=False))
    sections = page_sections((tmp_path / "report" / "audit.html").read_text())
    # Nothing skipped: one line, no table header above nothing.
    assert sections["Skipped files"] == {"notes": ["None found."], "rows": [], "links": []}
    assert sections["Thresholds"]["rows"] == [
        ["name", "value", "meaning"],
        ["near_duplicate", "0.912", "near-duplicates at or above this similarity (cosine, centred features)"],
        ["calibration_copies", "128", "edited copies made to measure copy_similarity"],
        ["mislabel: blue", "0.735", "mean probability of blue over the images labelled blue"],
        ["mislabel: red", "0.500", "mean probability of red over the images labelled red"],
        ["outlier", "0.300", "outliers below this similarity to the nearest class centre"]]
    sizes = sections["Image sizes"]
    assert sizes["rows"] == [["", "min", "median", "max"], ["width", "64", "300", "1024"],
                             ["height", "48", "200", "768"], ["aspect ratio", "0.75", "1.33", "2.00"]]
    assert "12 images, 3 of them smaller than the model input" in sizes["notes"][0]
    # The card links to the full image (a file: URL, nothing fetched when the page opens).
    assert sections["Outliers"]["links"] == [odd.as_uri()] * 2 and "%20" in odd.as_uri()


# ---- the pages in a real browser ---------------------------------------------------------------

def test_reports_open_in_headless_chromium_with_every_thumbnail(audited, trained_bundle, colour_data, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    import tlcli

    # A red picture filed as blue: evaluate's page shows it as a confident mistake.
    shutil.copytree(colour_data, tmp_path / "eval")
    shutil.copyfile(colour_data / "red" / "red_0.jpg", tmp_path / "eval" / "blue" / "filed_wrong.jpg")
    e = tlcli.evaluate(tmp_path / "eval", model_dir=trained_bundle, report_dir=tmp_path / "eval-report")
    pages = {audited[1] / "audit.html": 8, Path(e.files["mistakes.html"]): 2}  # the mistake and its saliency overlay
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                       else route.continue_())  # offline: any other request would fail
            for path, n in pages.items():
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
                assert len(widths) == n and all(w > 0 for w in widths), (path, widths)
                shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
                assert np.asarray(shot, np.float32).std() > 10, f"{path.name}: the screenshot is blank"
            assert "true blue, predicted red" in page.content()
        finally:
            browser.close()


def test_bad_options_and_folders_are_one_line_errors(tmp_path, defects):
    for args, code, word in ((["--val-split", "1.5"], 2, "--val-split"), (["--image-size", "4"], 2, "--image-size")):
        result = run_cli("audit", defects["train"], *args)
        assert result.exit_code == code and word in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("audit", tmp_path / "missing")
    assert result.exit_code == 1 and "no such directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
HOSTILE_CLASSES = {"red": '=HYPERLINK("example.invalid?leak","red")', "green": "+green", "blue": "@blue"}


def formula_cells(path: Path) -> list[str]:
    """The cells of a CSV file that a spreadsheet would run as a formula."""
    with open(path, newline="", encoding="utf-8") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    return [c for c in cells if c.startswith(FORMULA_START) and not c.lstrip("+-").replace(".", "", 1).isdigit()]


def test_csv_cells_that_start_like_a_formula_are_marked_as_text(defects, histogram_backbone, cache, tmp_path,
                                                                monkeypatch):
    import tlcli

    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):  # relative paths under "-set": the path cells start with "-" too
        for old, new in HOSTILE_CLASSES.items():
            shutil.copytree(defects[split] / old, tmp_path / "-set" / split / new)
    r = tlcli.audit("-set/train", val_dir="-set/val", backbone=str(histogram_backbone), image_size=32,
                    cache_dir=cache, batch_size=16, report_dir="report")
    assert r.near_duplicates and r.likely_mislabeled and r.outliers  # every CSV has rows
    for name in ("near_duplicates.csv", "likely_mislabeled.csv", "outliers.csv"):
        assert formula_cells(tmp_path / "report" / name) == [], name
    with open(tmp_path / "report" / "likely_mislabeled.csv", newline="", encoding="utf-8") as f:
        row = list(csv.reader(f))[1]
    assert row[0].startswith("'-set/") and row[1:3] == ["'+green", "'" + HOSTILE_CLASSES["red"]]


def test_evaluate_mistakes_csv_marks_formula_starts_as_text_and_keeps_numbers(tmp_path):
    from tlcli.insight import evaluation
    from tlcli.metrics import Mistake

    labels = [*FORMULA_START, "-12", "cat"]
    path = evaluation.write_mistakes([Mistake(f"{c}x.jpg", c + "1", c, 0.5) for c in labels], tmp_path / "m.csv")
    assert formula_cells(path) == []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert [row[2] for row in rows] == ["'=", "'+", "'-", "'@", "'\t", "'\r", "-12", "cat"]
    assert [row[3] for row in rows] == ["0.500000"] * len(labels)


def test_sigterm_stops_the_audit_like_ctrl_c_removing_the_report_folder_it_made(defects, histogram_backbone, cache,
                                                                                tmp_path):
    import signal

    import tlcli
    from tlcli.progress import Info

    def reached_default(signum, frame):
        raise RuntimeError("SIGTERM was not handled by audit")

    def terminate_after_the_features(event):
        if isinstance(event, Info) and event.message.startswith("features"):
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, reached_default)
    try:
        with pytest.raises(KeyboardInterrupt):
            tlcli.audit(defects["train"], val_dir=defects["val"], backbone=str(histogram_backbone), image_size=32,
                        cache_dir=cache, batch_size=16, report_dir=tmp_path / "report",
                        progress=terminate_after_the_features)
        assert signal.getsignal(signal.SIGTERM) is reached_default
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []  # the report folder it had made is gone
