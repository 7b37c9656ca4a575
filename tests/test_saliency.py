"""Saliency (deploy/saliency.py): on a set where only the top-left corner decides the class, the
map falls on that corner; predict --explain, evaluate --report's overlays and serve's /explain
(over HTTP and in headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli
from tests.test_serve import CHROMIUM, call, multipart, running

SIDE = 36  # the photos' side; the model's input is 32: the central crop (2 px off each side), resized
CORNER = {"blue": (20, 40, 220), "red": (220, 30, 30)}


def make_spatial_backbone(path: Path, features: int = 4) -> Path:
    """A hub-format backbone that keeps where things are: [b, h, w, 3] -> the means of the
    pixels and of leaky_relu(conv) over each quarter of the image, [b, 4 * (3 + features)]. (A
    global average would make every pixel's gradient alike, whatever decides the class; a plain
    relu can be dead over a whole solid patch, hiding the patch from the gradient in that channel.)"""
    import tensorflow as tf

    root = tf.train.Checkpoint()
    kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, features], seed=[3, 4]) * 0.5, name="kernel")
    bias = tf.Variable(tf.zeros([features]), name="bias")
    root.kernel, root.bias = kernel, bias
    root.variables = root.trainable_variables = [kernel, bias]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(images):
        conv = tf.nn.leaky_relu(tf.nn.conv2d(images * 2.0 - 1.0, kernel, 1, "SAME") + bias, 0.2)
        x = tf.concat([images, conv], -1)
        h, w = tf.shape(x)[1] // 2, tf.shape(x)[2] // 2
        quarters = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
        return tf.concat([tf.reduce_mean(q, [1, 2]) for q in quarters], -1)

    root.__call__ = call
    tf.saved_model.save(root, str(path))
    return path


def corner_photo(colour, seed: int) -> Image.Image:
    """Random coloured noise, its top-left quarter painted ``colour``: only that corner says the class."""
    arr = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
    arr[:SIDE // 2, :SIDE // 2] = colour
    return Image.fromarray(arr, "RGB")


def corner_folder(root: Path, per_class: int, seed: int) -> Path:
    for i, (label, colour) in enumerate(CORNER.items()):
        (root / label).mkdir(parents=True)
        for k in range(per_class):
            corner_photo(colour, seed + 1000 * i + k).save(root / label / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def corner_bundle(tmp_path_factory):
    import tlcli

    base = tmp_path_factory.mktemp("corner")
    backbone = make_spatial_backbone(base / "backbone")
    out = base / "model"
    tlcli.train(corner_folder(base / "train", 10, seed=0), out=str(out), backbone=str(backbone), image_size=32,
                epochs=30, batch_size=8, tensorboard=None, cache_dir=str(base / "cache"))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return corner_folder(tmp_path_factory.mktemp("corner-photos") / "photos", 3, seed=50_000)


def test_the_map_falls_on_the_corner_that_decides_the_class(corner_bundle, photos):
    from tlcli import load_bundle
    from tlcli.data import images
    from tlcli.deploy import saliency

    explainer = saliency.Explainer(load_bundle(corner_bundle))
    for label in CORNER:
        for path in sorted((photos / label).iterdir()):
            m, c = explainer.saliency(images.load_for_model(path, 32))
            assert m.shape == (32, 32) and m.min() >= 0 and m.sum() == pytest.approx(1.0, abs=1e-4)
            assert explainer.bundle.labels[c] == label
            # Most of the mass (more than half) in the corner that is a quarter of the image.
            assert m[:16, :16].sum() > 0.5, (path, m[:16, :16].sum())


def test_predict_explain_writes_one_overlay_per_photo_named_apart_and_never_overwrites(corner_bundle, photos,
                                                                                        tmp_path):
    twins = []
    for name in ("a", "b"):  # two photos named alike in different folders
        (tmp_path / name).mkdir()
        twins.append(shutil.copyfile(photos / "red" / "0.png", tmp_path / name / "x.png"))
    out = tmp_path / "why"
    result = run_cli("predict", *twins, photos / "blue" / "1.png", "--model", corner_bundle, "--explain", out,
                     "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    overlays = [Path(r["overlay"]) for r in rows]
    assert [r["predictions"][0]["label"] for r in rows] == ["red", "red", "blue"]
    assert len(set(overlays)) == 3 and sorted(out.iterdir()) == sorted(overlays)
    assert all(p.parent == out and p.name.startswith("x.png.") for p in overlays[:2])
    # The heat is drawn where the map is: the overlay departs from the photo in the corner.
    shown = np.asarray(Image.open(overlays[0]).convert("RGB"), np.float32)
    crop = Image.open(twins[0]).convert("RGB").crop((2, 2, 34, 34)).resize(shown.shape[1::-1])
    change = np.abs(shown - np.asarray(crop, np.float32)).mean(axis=-1)
    half = shown.shape[0] // 2
    assert change[:half, :half].mean() > 3 * change[half:, half:].mean()

    before = {p: p.stat().st_mtime_ns for p in overlays}
    again = run_cli("predict", twins[0], "--model", corner_bundle, "--explain", out)
    assert again.exit_code == 1 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in overlays} == before
    forced = run_cli("predict", twins[0], "--model", corner_bundle, "--explain", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert overlays[0].stat().st_mtime_ns > before[overlays[0]]


def test_explain_refuses_litert_and_a_folder_inside_the_photos(corner_bundle, photos, tmp_path):
    lite = run_cli("predict", photos, "--model", corner_bundle, "--explain", tmp_path / "o", "--engine", "tflite")
    assert lite.exit_code == 2 and "--engine tf" in lite.stderr and len(lite.stderr.strip().splitlines()) == 1
    inside = run_cli("predict", photos, "--model", corner_bundle, "--explain", photos / "why")
    assert inside.exit_code == 2 and "outside the image folders" in inside.stderr
    assert not (photos / "why").exists()
    bare = shutil.copytree(corner_bundle, tmp_path / "bare")
    (bare / "saved_model.pb").unlink()
    lacking = run_cli("predict", photos, "--model", bare, "--explain", tmp_path / "o")
    assert lacking.exit_code == 1 and "saved_model.pb" in lacking.stderr
    assert len(lacking.stderr.strip().splitlines()) == 1


def test_python_explain_returns_the_predictions_with_their_overlays(corner_bundle, photos, tmp_path):
    import tlcli

    paths = [photos / "blue" / "2.png", tmp_path / "missing.png"]
    got = tlcli.explain(paths, out_dir=tmp_path / "why", model_dir=corner_bundle, top_k=1)
    assert [p.predictions for p in got] == [p.predictions for p in tlcli.predict(paths, model_dir=corner_bundle,
                                                                                  engine="tf", top_k=1)]
    assert got[0].overlay == str(tmp_path / "why" / Path(got[0].overlay).name) and Path(got[0].overlay).is_file()
    assert got[1].error and got[1].overlay is None and "overlay" not in got[1].to_dict()


def test_evaluate_report_shows_an_overlay_beside_the_most_confident_mistakes(corner_bundle, photos, tmp_path):
    import tlcli
    from tests.helpers import page_sections
    from tlcli.progress import End, Start

    data = tmp_path / "eval"
    shutil.copytree(photos, data)
    for k in range(3):  # three red-cornered photos filed as blue: three confident mistakes
        shutil.copyfile(photos / "red" / f"{k}.png", data / "blue" / f"red{k}.png")
    events = []
    r = tlcli.evaluate(data, model_dir=corner_bundle, report_dir=tmp_path / "report", overlays=2,
                       progress=events.append)
    assert r.report.count - round(r.report.accuracy * r.report.count) == 3
    made = sorted((tmp_path / "report" / "saliency").iterdir())
    assert len(made) == 2 and r.files["saliency"] == str(tmp_path / "report" / "saliency")
    assert [e for e in events if isinstance(e, (Start, End)) and e.task == "saliency"] == [
        Start("saliency", total=2), End("saliency", completed=2, total=2)]
    section = page_sections((tmp_path / "report" / "mistakes.html").read_text())["Most confident mistakes (3 of 3)"]
    links = [link for link in section["links"] if link.endswith(".png") and "/saliency/" in link]
    assert sorted(links) == sorted(p.as_uri() for p in made)
    none = tlcli.evaluate(data, model_dir=corner_bundle, report_dir=tmp_path / "plain", overlays=0)
    assert "saliency" not in none.files and not (tmp_path / "plain" / "saliency").exists()


@pytest.fixture(scope="module")
def explain_url(corner_bundle):
    from tlcli.deploy.server import make_app

    with running(make_app(corner_bundle, engine="tf", workers=1, max_body_bytes=20_000)) as base:
        yield base


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, raw body) of a POST."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}, method="POST"), timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_explain_endpoint_answers_the_overlay_png_within_the_request_bounds(explain_url, photos):
    import io

    data = (photos / "red" / "1.png").read_bytes()
    for body, headers in (multipart([("1.png", data)]), (data, {})):  # an upload, or the raw body
        status, head, png = post(explain_url + "/explain", body, headers)
        assert status == 200 and head["content-type"] == "image/png" and head["x-explained-class"] == "1"
        assert Image.open(io.BytesIO(png)).size == (320, 320)
    two, headers = multipart([("1.png", data), ("2.png", data)])
    assert call(explain_url + "/explain", "POST", two, headers)[0] == 400
    status, _, err = call(explain_url + "/explain", "POST", b"not an image")
    assert status == 400 and "not an image" in err["error"]
    assert call(explain_url + "/explain", "POST", os.urandom(30_000))[0] == 413
    assert call(explain_url + "/explain")[0] == 405


def test_page_toggle_shows_the_overlay_in_headless_chromium(explain_url, photos):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(explain_url + "/")
            page.check("#explain")
            page.set_input_files("#files", str(photos / "blue" / "0.png"))
            page.wait_for_selector(".result img.overlay", timeout=30_000)
            label = page.inner_text(".result .top-label")
            width = page.eval_on_selector(".result img.overlay", "img => img.complete && img.naturalWidth")
        finally:
            browser.close()
    assert label == "blue" and width == 320
