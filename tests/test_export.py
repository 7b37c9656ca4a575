"""TFLite export: every quantization mode, labels inside the file, integer I/O through predict, an
existing file replaced only with --force, option errors, and predicting through LiteRT without
importing TensorFlow."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli as run

MODES = [("none", "float32"), ("float16", "float32"), ("dynamic", "float32"),
         ("int8", "float32"), ("int8", "int8"), ("int8", "uint8")]
# The converter's own record of what it did (tensorflow/lite/python/conversion_metadata.fbs).
OPTIMIZATION = {"none": set(), "float16": {1001}, "dynamic": {1002}, "int8": {1003}}


def colour_images(colour_data):
    """Every test image with its true label index (labels are the sorted class folders)."""
    classes = sorted(p.name for p in colour_data.iterdir())
    return [(p, classes.index(p.parent.name)) for p in sorted(colour_data.glob("*/*"))]


@pytest.fixture(scope="module")
def exported(trained_bundle, tmp_path_factory):
    """A writable copy of the trained bundle, exported once in every mode to a folder outside it."""
    import tlcli

    root = tmp_path_factory.mktemp("export")
    bundle = root / "model"
    shutil.copytree(trained_bundle, bundle)
    (root / "out").mkdir()
    results = {(q, io): tlcli.export_tflite(bundle, output=root / "out" / f"{q}-{io}.tflite", quantize=q, io_type=io)
               for q, io in MODES}
    return bundle, results


@pytest.fixture(scope="module")
def reference(exported, colour_data):
    """SavedModel probabilities on every colour image, and the inputs and labels."""
    from tlcli import bundle as bundles
    from tlcli.data import images
    from tlcli.deploy.inference import TFEngine

    b = bundles.load(exported[0])
    items = colour_images(colour_data)
    x = np.stack([images.load_for_model(p, b.image_size) for p, _ in items])
    return x, np.array([y for _, y in items]), TFEngine(b)(x)


@pytest.mark.parametrize("quantize,io_type", MODES)
def test_each_quantization_mode_agrees_with_the_saved_model(exported, reference, quantize, io_type):
    from tensorflow.lite.python.util import get_conversion_metadata

    from tlcli import bundle as bundles
    from tlcli.deploy.inference import TFLiteEngine

    bundle, results = exported
    r = results[(quantize, io_type)]
    # The parity the export measured and reported, on the bundle's validation images.
    assert r.parity_data == "validation images" and r.parity_images == 6
    assert r.agreement == 1.0 and r.saved_model_accuracy == 1.0 and r.export_accuracy == 1.0
    # Checked independently on all 24 images, through the same engine predict uses.
    x, y, p_ref = reference
    engine = TFLiteEngine(bundles.load(bundle), r.path)
    p_lite = engine(x)
    assert (p_lite.argmax(1) == p_ref.argmax(1)).all() and (p_lite.argmax(1) == y).all()
    assert np.abs(p_lite - p_ref).max() < (0.02 if quantize == "int8" else 1e-3)
    # The file is what the mode says.
    modes = set(get_conversion_metadata(open(r.path, "rb").read()).options.modelOptimizationModes)
    assert modes == OPTIMIZATION[quantize]
    tensor_types = {d["dtype"] for d in engine.interp.get_tensor_details()}
    assert (np.float16 in tensor_types) == (quantize == "float16")
    assert (np.int8 in tensor_types) == (quantize == "int8")
    assert engine.inp["dtype"] == np.dtype(io_type) and engine.out["dtype"] == np.dtype(io_type)
    assert r.size_bytes == len(open(r.path, "rb").read()) and r.quantize == quantize and r.io_type == io_type


def test_integer_input_is_the_raw_8_bit_pixels(exported):
    """Calibration pins the input range to [0, 1], so integer inputs need no rescaling by apps."""
    from tlcli import bundle as bundles
    from tlcli.deploy.inference import TFLiteEngine

    bundle, results = exported
    b = bundles.load(bundle)
    for io_type, zero in (("uint8", 0), ("int8", -128)):
        scale, zero_point = TFLiteEngine(b, results[("int8", io_type)].path).inp["quantization"]
        assert scale == pytest.approx(1 / 255) and zero_point == zero


def test_labels_travel_inside_every_exported_file_and_nothing_unasked_is_written_beside_it(exported):
    from tlcli import bundle as bundles
    from tlcli.deploy.tflite_meta import labels_in as tflite_labels

    bundle, results = exported
    labels = bundles.load(bundle).labels
    assert labels == ["blue", "green", "red"]
    for r in results.values():
        assert r.labels_path is None and r.labels_embedded and tflite_labels(r.path) == labels
    out = Path(next(iter(results.values())).path).parent
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{q}-{io}.tflite" for q, io in MODES)
    # Every export is recorded in the bundle, by absolute path when outside it.
    recorded = json.loads((bundle / "tlcli.json").read_text())["exports"]
    assert set(recorded) == {r.path for r in results.values()}
    assert recorded[results[("int8", "uint8")].path]["agreement"] == 1.0


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_int8_with_integer_io_exports_and_predicts_end_to_end(bundle_copy, colour_data, io_type):
    from tlcli.deploy.tflite_meta import labels_in as tflite_labels

    result = run("export", "--tflite", "--model", bundle_copy, "--quantize", "int8", "--io-type", io_type, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["path"] == str(bundle_copy / "model.tflite") and r["labels_path"] == str(bundle_copy / "labels.txt")
    assert r["agreement"] == 1.0 and r["io_type"] == io_type
    assert tflite_labels(bundle_copy / "model.tflite") == ["blue", "green", "red"]

    rows = {}
    for engine in ("tflite", "tf"):
        result = run("predict", colour_data, "--model", bundle_copy, "--engine", engine, "--json")
        assert result.exit_code == 0, result.output
        rows[engine] = [json.loads(line) for line in result.stdout.splitlines()]
        assert "24 images classified" in result.stderr and f"engine {engine}" in result.stderr
    assert len(rows["tflite"]) == 24
    for lite, ref in zip(rows["tflite"], rows["tf"]):
        assert lite["path"] == ref["path"] and lite["error"] is None
        assert lite["predictions"][0]["label"] == ref["predictions"][0]["label"] == ref["path"].split("/")[-2]
        assert lite["predictions"][0]["probability"] == pytest.approx(ref["predictions"][0]["probability"], abs=0.02)


def test_output_inside_the_bundle_under_another_name_holds_its_labels_inside(bundle_copy):
    result = run("export", "--tflite", "--model", bundle_copy, "--output", bundle_copy / "small.tflite",
                 "--quantize", "float16")
    assert result.exit_code == 0, result.output
    assert not (bundle_copy / "small.labels.txt").exists()
    assert "labels inside the .tflite" in " ".join(result.output.replace("│", " ").split())
    assert "100.0% on 6 validation images" in result.output
    assert not (bundle_copy / "model.tflite").exists()
    assert not list(bundle_copy.glob(".small.tflite.*")), "temporary file left behind"
    assert "small.tflite" in json.loads((bundle_copy / "tlcli.json").read_text())["exports"]


def test_int8_without_recorded_images_asks_for_data_then_calibrates_on_it(bundle_copy, colour_data,
                                                                        monkeypatch):
    from tlcli.deploy import parity

    scans = []
    real_scan = parity.data.scan
    monkeypatch.setattr(parity.data, "scan", lambda *a, **kw: scans.append(a) or real_scan(*a, **kw))
    (bundle_copy / "splits.json").unlink()
    result = run("export", "--tflite", "--model", bundle_copy, "--quantize", "int8")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--data" in result.output
    assert not (bundle_copy / "model.tflite").exists()

    result = run("export", "--tflite", "--model", bundle_copy, "--quantize", "int8", "--data", colour_data, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["parity_images"] == 24 and r["parity_data"] == f"images in {colour_data}"
    assert r["agreement"] == 1.0 and r["export_accuracy"] == 1.0
    assert len(scans) == 1, "calibration and parity share one scan of --data"


def test_an_existing_export_is_replaced_only_with_force_naming_its_quantization(bundle_copy, tmp_path):
    assert run("export", "--tflite", "--model", bundle_copy, "--quantize", "float16").exit_code == 0
    before = (bundle_copy / "model.tflite").read_bytes()
    refused = run("export", "--tflite", "--model", bundle_copy, "--quantize", "dynamic")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.stderr.strip() == f"error: --model {bundle_copy}: its model.tflite already exists (exported with " \
                                     "--quantize float16); pass --force to replace it, or choose another --output"
    assert (bundle_copy / "model.tflite").read_bytes() == before
    forced = run("export", "--tflite", "--model", bundle_copy, "--quantize", "dynamic", "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads((bundle_copy / "tlcli.json").read_text())["exports"]["model.tflite"]["quantize"] == "dynamic"
    elsewhere = tmp_path / "phone.tflite"
    assert run("export", "--tflite", "--model", bundle_copy, "--output", elsewhere).exit_code == 0
    again = run("export", "--tflite", "--model", bundle_copy, "--output", elsewhere)
    assert again.exit_code == 1
    assert again.stderr.strip() == f"error: --output {elsewhere}: already exists (exported with --quantize none); " \
                                   "pass --force to replace it, or choose another --output"


@pytest.mark.parametrize("args,named", [
    (["--quantize", "dynamic", "--io-type", "int8"], "--io-type int8"),
    (["--io-type", "uint8"], "--io-type uint8"),
    (["--output", "{tmp}/missing/model.tflite"], "--output"),
    (["--output", "{tmp}"], "--output"),
])
def test_bad_export_options_are_one_line_errors(bundle_copy, tmp_path, args, named):
    before = (bundle_copy / "tlcli.json").read_text()
    result = run("export", "--tflite", "--model", bundle_copy, *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (bundle_copy / "model.tflite").exists() and not list(tmp_path.rglob("*.tflite"))
    assert (bundle_copy / "tlcli.json").read_text() == before


def test_a_tflite_file_from_another_model_is_refused(bundle_copy, exported, colour_data):
    shutil.copyfile(exported[1][("none", "float32")].path, bundle_copy / "model.tflite")
    meta = json.loads((bundle_copy / "tlcli.json").read_text())
    meta["image_size"] = 48  # as if the bundle had been retrained at another size
    (bundle_copy / "tlcli.json").write_text(json.dumps(meta))
    result = run("predict", colour_data / "red" / "red_0.jpg", "--model", bundle_copy)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "made for another model" in result.output and "re-export" in result.output


def test_predict_through_litert_never_imports_tensorflow(bundle_copy, exported, colour_data):
    shutil.copyfile(exported[1][("int8", "uint8")].path, bundle_copy / "model.tflite")
    code = f"""
import json, sys
from typer.testing import CliRunner
from tlcli.cli import app
import tlcli
from tlcli import bundle
from tlcli.deploy import inference

result = CliRunner().invoke(app, ["predict", {str(colour_data)!r}, "--model", {str(bundle_copy)!r}, "--json"])
assert result.exit_code == 0, result.output
rows = [json.loads(line) for line in result.stdout.splitlines()]
library = tlcli.predict([{str(colour_data / "green")!r}], model_dir={str(bundle_copy)!r}, top_k=1)
print(json.dumps({{
    "engine": inference.open_engine(bundle.load({str(bundle_copy)!r})).name,
    "cli": [(r["path"].split("/")[-2], r["predictions"][0]["label"]) for r in rows],
    "library": [p.predictions[0]["label"] for p in library],
    "heavy": [m for m in ("tensorflow", "tf_keras", "tensorflow_hub", "keras") if m in sys.modules],
}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["engine"] == "tflite"
    assert len(out["cli"]) == 24 and all(truth == label for truth, label in out["cli"])
    assert out["library"] == ["green"] * 8
    assert "XNNPACK" not in proc.stderr


def test_predict_table_shows_at_most_one_column_per_class(bundle_copy, exported, colour_data):
    shutil.copyfile(exported[1][("none", "float32")].path, bundle_copy / "model.tflite")
    result = run("predict", colour_data / "red", "--model", bundle_copy, "--top-k", 5)
    assert result.exit_code == 0, result.output
    assert "Predictions (tflite)" in result.output
    assert "#3" in result.output and "#4" not in result.output
    assert "8 images classified" in result.stderr and "images/s, engine tflite" in result.stderr
