"""ONNX and OpenVINO exports (tlcli/deploy/formats): exported from the tiny trained bundle once
per module, run by predict, evaluate and serve without TensorFlow, equal to the SavedModel to
the float tolerance, labels and fingerprint inside the files, and crafted files refused in one
line. CI installs the extras (tlcli[onnx], tlcli[openvino]); without them these tests skip."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import run_cli as run

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("tf2onnx")

NEW = ("onnx", "openvino")


@pytest.fixture(scope="module")
def exported(trained_bundle, tmp_path_factory):
    """A copy of the trained bundle with model.onnx and openvino/model.xml, written by
    ``tlcli export --format all`` while LiteRT is hidden (so TFLite is skipped, not converted),
    and the command's JSON."""
    path = tmp_path_factory.mktemp("formats") / "model"
    shutil.copytree(trained_bundle, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ai_edge_litert", None)
        result = run("export", "--format", "all", "--model", path, "--json")
    assert result.exit_code == 0, result.output
    return path, json.loads(result.stdout)


def _only(src, tmp_path, fmt):
    """A copy of bundle ``src`` holding one exported format (no model.tflite)."""
    dst = tmp_path / f"{fmt}-only"
    others = {"onnx": "openvino", "openvino": "model.onnx"}
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.tflite", others[fmt]))
    return dst


def test_export_all_writes_each_format_with_parity_and_skips_a_missing_runtime(exported, trained_bundle):
    path, r = exported
    done = {x["format"]: x for x in r["results"]}
    assert set(done) == set(NEW)
    assert r["skipped"] == [{"format": "tflite", "reason": "ai_edge_litert is not installed: reinstall tlcli "
                                                           "(pip install --force-reinstall tlcli)"}]
    for x in done.values():
        assert x["agreement"] == 1.0 and x["export_accuracy"] == x["saved_model_accuracy"] == 1.0
        assert x["max_abs_diff"] <= 1e-4 and x["ms_per_image"] > 0 and x["parity_images"] == 6
        assert all(c["export_accuracy"] == 1.0 for c in x["per_class"])
    assert done["openvino"]["files"] == [str(path / "openvino" / "model.xml"), str(path / "openvino" / "model.bin")]
    assert done["onnx"]["size_bytes"] == (path / "model.onnx").stat().st_size
    recorded = json.loads((path / "tlcli.json").read_text())["exports"]
    assert recorded["model.onnx"]["format"] == "onnx" and recorded["openvino/model.xml"]["format"] == "openvino"


def test_every_engine_gives_the_savedmodels_probabilities(exported, colour_data):
    import tlcli
    from tlcli.data import images
    from tlcli.deploy import inference

    path, _ = exported
    b = tlcli.load_bundle(path)
    files = sorted(str(p) for p in colour_data.rglob("*.*"))
    x = np.stack([images.load_for_model(f, b.image_size) for f in files])
    want = inference.open_engine(b, "tf").outputs(x)  # with the unknown score: the bundle has a detector
    ref = want["probabilities"]
    assert set(want) == {"probabilities", "unknown_score"}
    for fmt in NEW:
        engine = inference.open_engine(b, fmt)
        assert engine.name == fmt
        out = engine.outputs(x)
        assert set(out) == set(want) and np.abs(out["probabilities"] - ref).max() <= 1e-4
        # The score is a difference of large float32 sums (|f|^2 - 2 f.mu + |mu|^2): compare it on
        # the scale of the threshold that decides with it.
        gap = np.abs(out["unknown_score"] - want["unknown_score"]).max()
        assert gap <= 0.01 * b.meta.unknown["threshold"], (fmt, gap, b.meta.unknown["threshold"])
        answers = [p.predictions[0]["label"] for p in tlcli.predict(files, model_dir=path, engine=fmt)]
        assert answers == [b.labels[i] for i in ref.argmax(1)]


def test_labels_and_fingerprint_travel_inside_the_files(exported):
    import tlcli
    from tlcli.deploy import formats

    path, _ = exported
    b = tlcli.load_bundle(path)
    for fmt in NEW:
        meta = formats.get(fmt).module.metadata_in(formats.get(fmt).path_in(path))
        assert meta["labels"].decode() == "blue\ngreen\nred\n" == b.labels_text()
        assert meta["tlcli_bundle"].decode() == b.fingerprint()


def test_auto_runs_the_one_format_a_bundle_holds_and_evaluate_and_serve_take_an_engine(exported, tmp_path,
                                                                                      colour_data):
    import tlcli
    from tlcli.deploy import formats, inference
    from tlcli.deploy.server import ServedModel

    path, _ = exported
    fastest = next(f for f in formats.AUTO_ORDER if f in NEW)  # of the two the bundle holds
    assert inference.resolve_engine(tlcli.load_bundle(path), "auto") == fastest
    for fmt in NEW:
        b = tlcli.load_bundle(_only(path, tmp_path, fmt))
        assert inference.resolve_engine(b, "auto") == fmt
        r = tlcli.evaluate(colour_data, model_dir=b.path, engine=fmt)
        assert r.engine == fmt and r.report.accuracy == 1.0
        served = ServedModel(b, name="m", engine=fmt, workers=2, max_pixels=None)
        red = next((colour_data / "red").glob("*.png"))
        assert served.predict_files([("a.png", red.read_bytes())], 1)[0].predictions[0]["label"] == "red"


@pytest.mark.parametrize("fmt", NEW)
def test_predict_with_one_format_never_imports_tensorflow(exported, tmp_path, colour_data, fmt):
    only = _only(exported[0], tmp_path, fmt)
    red = next((colour_data / "red").glob("*.png"))
    code = ("import sys\nfrom tlcli.cli import run\nsys.argv = ['tlcli', 'predict', '--json', '--model', "
            f"{str(only)!r}, {str(red)!r}]\ntry:\n    run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TF' if 'tensorflow' in sys.modules else 'no TF')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert json.loads(lines[0])["predictions"][0]["label"] == "red" and lines[-1] == "no TF"


def test_a_missing_extra_is_refused_in_one_line_naming_it(exported, monkeypatch, colour_data):
    path, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = run("predict", "--engine", "onnx", "--model", path, colour_data / "red")
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "pip install 'tlcli[onnx]'" in result.output
    monkeypatch.setitem(sys.modules, "openvino", None)
    result = run("export", "--format", "openvino", "--model", path, "--force")
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "pip install 'tlcli[openvino]'" in result.output
    import tlcli
    from tlcli.deploy import inference

    assert inference.resolve_engine(tlcli.load_bundle(path), "auto") == "tf"  # neither runtime: the SavedModel


def test_a_quantization_a_format_lacks_is_a_usage_error(exported):
    result = run("export", "--format", "openvino", "--quantize", "int8", "--model", exported[0])
    assert result.exit_code == 2 and result.output.strip() == "error: --quantize int8: --format openvino has none, " \
                                                              "float16"


def test_a_float_export_outside_the_tolerance_is_not_written(bundle_copy, monkeypatch):
    from tlcli.deploy import parity

    monkeypatch.setattr(parity, "FLOAT_TOLERANCE", -1.0)
    result = run("export", "--format", "onnx", "--model", bundle_copy)
    assert result.exit_code == 1 and "(more than -1);" in result.output
    assert not (bundle_copy / "model.onnx").exists()


def _graph(body, out_shape):
    """A crafted ONNX model: images [N, 32, 32, 3] -> probabilities ``out_shape`` through ``body``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(body, "crafted", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                               ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, out_shape)],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _crafted_onnx(kind, exported_onnx: bytes) -> bytes:
    import onnx
    from onnx import helper

    mean = helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2], keepdims=0)
    if kind == "garbage":
        return b"\x08\x07not a model at all"
    if kind == "wrong labels":
        model = onnx.load_model_from_string(exported_onnx)
        next(p for p in model.metadata_props if p.key == "labels").value = "blue\nred\ngreen\n"
        return model.SerializeToString()
    if kind == "wrong output shape":
        return _graph([helper.make_node("Concat", ["images", "images"], ["probabilities"], axis=3)],
                      ["N", 32, 32, 6]).SerializeToString()
    if kind == "too many classes":
        return _graph([mean, helper.make_node("Concat", ["m", "m"], ["probabilities"], axis=1)],
                      ["N", 6]).SerializeToString()
    assert kind == "non-finite"
    return _graph([mean, helper.make_node("Div", ["m", "zero"], ["probabilities"])], ["N", 3]).SerializeToString()


CRAFTED = {"garbage": "cannot load", "wrong labels": "embedded labels differ",
           "wrong output shape": "not a tlcli model", "too many classes": "6 classes",
           "non-finite": "NaN, infinite"}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_crafted_onnx_or_openvino_file_is_refused_in_one_line(exported, tmp_path, colour_data, kind):
    import openvino as ov

    onnx_bundle = _only(exported[0], tmp_path, "onnx")
    crafted = _crafted_onnx(kind, (onnx_bundle / "model.onnx").read_bytes())
    (onnx_bundle / "model.onnx").write_bytes(crafted)
    ov_bundle = _only(exported[0], tmp_path, "openvino")
    xml = ov_bundle / "openvino" / "model.xml"
    if kind == "garbage":
        xml.write_bytes(b"<net><layers><layer id='0' type='Nonsense'/></layers></net>")
    else:  # written beside, then moved in place: the model read from xml maps its .bin
        if kind == "wrong labels":
            model = ov.Core().read_model(xml)
            model.set_rt_info("blue\nred\ngreen\n", ["tlcli", "labels"])
        else:
            (tmp_path / "crafted.onnx").write_bytes(crafted)
            model = ov.convert_model(tmp_path / "crafted.onnx")
        ov.save_model(model, tmp_path / "crafted.xml", compress_to_fp16=False)
        del model
        for suffix in (".xml", ".bin"):
            shutil.move(tmp_path / f"crafted{suffix}", xml.with_suffix(suffix))
    for bundle, fmt in ((onnx_bundle, "onnx"), (ov_bundle, "openvino")):
        result = run("predict", "--engine", fmt, "--model", bundle, colour_data / "red")
        assert result.exit_code == 1, (fmt, result.output)
        assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, (fmt, result.output)
        assert CRAFTED[kind] in result.output, (fmt, result.output)


def test_the_exported_files_belong_to_the_bundle_and_travel_with_share(exported, tmp_path):
    import tlcli
    from tlcli import bundle as bundles

    path, _ = exported
    assert bundles.foreign_entries(path) == []  # so train --force may replace the bundle
    shared = tlcli.share_bundle(path, out=str(tmp_path / "shared"))
    for name in ("model.onnx", "openvino/model.xml", "openvino/model.bin"):
        assert (tmp_path / "shared" / name).read_bytes() == (path / name).read_bytes(), shared


def test_an_onnx_file_whose_weights_point_at_another_file_is_refused(exported, tmp_path, colour_data):
    from onnx import TensorProto, helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 12)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(secret)), ("offset", "0"), ("length", "12")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    model = _graph([helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2], keepdims=0),
                    helper.make_node("Add", ["m", "w"], ["probabilities"])], ["N", 3])
    model.graph.initializer.append(weights)
    bundle = _only(exported[0], tmp_path, "onnx")
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    result = run("predict", "--engine", "onnx", "--model", bundle, colour_data / "red")
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "cannot load the ONNX model" in result.output and "External data path" in result.output


def test_the_export_all_table_fits_80_columns_with_every_figure(exported):
    from rich.console import Console

    from tlcli.cli import reports
    from tlcli.deploy.export import ExportAllResult, ExportResult

    r = exported[1]
    table = ExportAllResult([ExportResult(**x) for x in r["results"]], r["skipped"])
    console = Console(width=80, record=True, color_system=None)
    console.print(reports.exports_table(table))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("ONNX", "OpenVINO")}
    for fmt, x in zip(("ONNX", "OpenVINO"), r["results"]):
        assert f"{x['ms_per_image']:.2f}" in rows[fmt] and "100.0%" in rows[fmt]
    assert "TFLite skipped: ai_edge_litert is not installed" in " ".join(lines)
