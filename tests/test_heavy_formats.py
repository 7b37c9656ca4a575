"""Every export format against the SavedModel with real weights (opt-in: pytest -m heavy): on
hymenoptera with MobileNetV2, the float ONNX and OpenVINO exports agree top-1 on all 153
validation images and to 1e-4 in probability, and predict gives the same answers with each.
Skips when ../shared or an extra is absent."""

import pytest

import tlcli
from bench._common import HYMENOPTERA, MOBILENET_V2

pytestmark = pytest.mark.heavy


def test_hymenoptera_onnx_and_openvino_agree_with_the_savedmodel_on_every_image(tmp_path):
    for path in (MOBILENET_V2, HYMENOPTERA):
        if not path.exists():
            pytest.skip(f"needs {path}")
    for module in ("onnxruntime", "tf2onnx", "openvino"):
        pytest.importorskip(module)
    out = tmp_path / "model"
    tlcli.train(HYMENOPTERA / "train", val_dir=str(HYMENOPTERA / "val"), backbone=str(MOBILENET_V2),
                image_size=224, out=str(out), cache_dir=str(tmp_path / "cache"), tensorboard=None)
    results = {r.format: r for r in tlcli.export_all(out).results}
    for fmt in ("onnx", "openvino"):
        r = results[fmt]
        assert r.parity_images == 153 and r.agreement == 1.0, (fmt, r.agreement)
        assert r.max_abs_diff <= 1e-4, (fmt, r.max_abs_diff)
    answers = {engine: [p.predictions[0]["label"] for p in tlcli.predict([HYMENOPTERA / "val"], model_dir=out,
                                                                          engine=engine)]
               for engine in ("tf", "onnx", "openvino")}
    assert answers["onnx"] == answers["openvino"] == answers["tf"]
