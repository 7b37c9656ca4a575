"""The Python API: ``import tlcli`` is cheap, and the functions and result types the README shows
are names of the package."""

import subprocess
import sys

API = ["train", "predict", "export_tflite", "evaluate", "load_bundle", "TrainConfig", "TrainResult",
       "Prediction", "ExportResult", "EvaluateResult", "Bundle", "BundleMeta", "TlcliError"]


def test_import_tlcli_resolves_the_api_without_importing_tensorflow():
    code = ("import sys, tlcli\n"
            f"names = {API!r}\n"
            "missing = [n for n in names if getattr(tlcli, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert set(names) <= set(tlcli.__all__)\n"
            "heavy = sorted(m for m in ('tensorflow', 'tf_keras', 'tensorflow_hub') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_readme_calls_return_the_exported_types(bundle_copy, colour_data, tmp_path):
    import tlcli

    b = tlcli.load_bundle(bundle_copy)
    assert isinstance(b, tlcli.Bundle) and isinstance(b.meta, tlcli.BundleMeta)
    assert b.meta.metrics.val_accuracy == 1.0 and b.meta.labels == ["blue", "green", "red"]
    preds = tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy)
    assert isinstance(preds[0], tlcli.Prediction) and preds[0].predictions[0]["label"] == "red"
    exported = tlcli.export_tflite(bundle_copy, quantize="float16")
    assert isinstance(exported, tlcli.ExportResult) and exported.agreement == 1.0 and exported.warnings == []
    ev = tlcli.evaluate(colour_data, model_dir=bundle_copy, report_dir=tmp_path / "report")
    assert isinstance(ev, tlcli.EvaluateResult) and ev.report.accuracy == 1.0
    assert (tmp_path / "report" / "mistakes.csv").exists()
    assert tlcli.TrainResult.__name__ == "TrainResult" and "model.tflite" in tlcli.load_bundle(bundle_copy).meta.exports
