"""export --max-accuracy-drop: a quantized model more than POINTS below the SavedModel's accuracy
on the parity images is refused in one line (exit 1) and not put in place; the parity report
gives per-class accuracy of both models, in the table and in --json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

RED, GREEN = np.array([220, 30, 30.0]), np.array([30, 200, 40.0])


def blend(t: float, seed: int) -> Image.Image:
    """A noisy image of colour (1 - t) * red + t * green (the noise makes its mean continuous)."""
    rng = np.random.default_rng(seed)
    pixels = (1 - t) * RED + t * GREEN + rng.normal(0, 3, (24, 24, 3))
    return Image.fromarray(np.uint8(np.clip(np.round(pixels), 0, 255)))


@pytest.fixture(scope="module")
def gated(trained_bundle, tmp_path_factory):
    """(bundle copy, labelled folder) where the folder holds 200 images packed around the
    SavedModel's red/green boundary, each labelled with the SavedModel's own answer: the
    SavedModel scores 100% there, and every image int8 quantization flips is an accuracy drop."""
    from tlcli import bundle as bundles
    from tlcli.data import images
    from tlcli.deploy.inference import TFEngine

    root = tmp_path_factory.mktemp("gate")
    bundle = root / "model"
    shutil.copytree(trained_bundle, bundle)
    b = bundles.load(bundle)
    engine = TFEngine(b)
    red, green = b.labels.index("red"), b.labels.index("green")

    def is_red(t):
        return int(engine(images.to_model_input(blend(t, 1), b.image_size)[None])[0].argmax()) == red

    lo, hi = 0.0, 1.0
    assert is_red(lo) and not is_red(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if is_red(mid) else (lo, mid)
    edge = [blend(lo + (i - 100) * 0.00005, i) for i in range(200)]  # close: int8 flips about 10%
    answers = engine(np.stack([images.to_model_input(img, b.image_size) for img in edge])).argmax(1)
    assert set(answers.tolist()) == {red, green}
    folder = root / "edge"
    for label in b.labels:
        (folder / label).mkdir(parents=True)
    Image.fromarray(np.full((24, 24, 3), (20, 40, 220), np.uint8)).save(folder / "blue" / "blue.png")
    for i, (img, answer) in enumerate(zip(edge, answers)):
        img.save(folder / b.labels[answer] / f"edge_{i}.png")
    return bundle, folder


def export(bundle, folder, *extra):
    return run_cli("export", "--tflite", "--model", bundle, "--quantize", "int8", "--data", folder, "--force", *extra)


@pytest.fixture(scope="module")
def ungated(gated):
    """The --json result of an int8 export without a gate (it writes the bundle's model.tflite)."""
    bundle, folder = gated
    result = export(bundle, folder, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_gate_refuses_a_larger_drop_and_keeps_the_previous_model(gated, ungated):
    bundle, folder = gated
    assert ungated["saved_model_accuracy"] == 1.0
    drop = 100 * (1.0 - ungated["export_accuracy"])
    assert drop > 0, "int8 flips no image at the boundary: the test data cannot show the gate"
    previous = (bundle / "model.tflite").read_bytes()
    before = sorted(p.name for p in bundle.iterdir())

    refused = export(bundle, folder, "--max-accuracy-drop", f"{drop / 2:.3f}", "--json")
    assert refused.exit_code == 1
    answer = json.loads(refused.stdout)  # --json: the error as JSON too, for a script
    assert answer["exit_code"] == 1 and answer["error"].startswith("--max-accuracy-drop ")
    lines = [line for line in refused.stderr.strip().splitlines() if not line.startswith(("convert", "parity"))]
    assert len(lines) == 1 and "Traceback" not in refused.output  # besides the progress lines
    assert lines[0].startswith("error: --max-accuracy-drop ")
    assert f"{drop:.1f} points below" in lines[0] and "was not written" in lines[0]
    assert (bundle / "model.tflite").read_bytes() == previous
    assert sorted(p.name for p in bundle.iterdir()) == before  # no temporary file left in the bundle

    allowed = export(bundle, folder, "--max-accuracy-drop", f"{drop + 0.01:.3f}")
    assert allowed.exit_code == 0, allowed.output
    gate_row = next(line for line in allowed.stdout.splitlines() if "accuracy gate" in line)
    assert f"{drop:.1f} points below the SavedModel (at most {drop + 0.01:.3f}".rstrip("0") in gate_row
    # The per-class rows of the table: each label with its parity image count.
    for c in ungated["per_class"]:
        row = next(line for line in allowed.stdout.splitlines() if f" {c['label']} " in line and "SavedModel" in line)
        assert f"({c['images']} images)" in row


def test_parity_report_has_per_class_accuracy_in_json(ungated):
    r = ungated
    per_class = {c["label"]: c for c in r["per_class"]}
    assert list(per_class) == ["blue", "green", "red"]
    assert sum(c["images"] for c in r["per_class"]) == r["parity_images"] == 201
    assert all(c["saved_model_accuracy"] == 1.0 for c in r["per_class"])
    lite = sum(c["export_accuracy"] * c["images"] for c in r["per_class"]) / r["parity_images"]
    assert lite == pytest.approx(r["export_accuracy"])
    assert per_class["blue"]["export_accuracy"] == 1.0
    assert r["max_accuracy_drop"] is None and r["accuracy_drop"] is None  # no gate asked


def test_gate_options_that_cannot_work_are_usage_errors(gated, tmp_path):
    bundle, folder = gated
    bad = export(bundle, folder, "--max-accuracy-drop", "-1")
    assert bad.exit_code == 2 and "--max-accuracy-drop -1" in bad.stderr
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare)
    (bare / "splits.json").unlink()
    nothing = run_cli("export", "--tflite", "--model", bare, "--max-accuracy-drop", "1", "--force")
    assert nothing.exit_code == 2
    assert "no labelled images" in nothing.stderr and "--data DIR" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1
