"""The model bundle: contents, metadata round trip, atomic writes and load errors."""

import json
import os

import numpy as np
import pytest

from tlcli import bundle
from tlcli.errors import BundleError, OutputExistsError


def test_bundle_holds_savedmodel_labels_and_metadata(trained_bundle):
    files = {p.name for p in trained_bundle.iterdir()}
    assert {"saved_model.pb", "variables", "labels.txt", "tlcli.json", "splits.json"} <= files
    assert (trained_bundle / "labels.txt").read_text() == "blue\ngreen\nred\n"
    meta = json.loads((trained_bundle / "tlcli.json").read_text())
    assert meta["labels"] == ["blue", "green", "red"]
    assert meta["image_size"] == 32
    assert meta["input"]["dtype"] == "float32" and meta["input"]["range"] == [0.0, 1.0]
    assert meta["backbone"]["handle"].endswith("tiny")
    assert meta["config"]["epochs"] == 60 and meta["config"]["batch_size"] == 8
    assert meta["tlcli_version"] and meta["tensorflow_version"].startswith("2.")
    assert 0.9 <= meta["metrics"]["val_accuracy"] <= 1.0
    splits = json.loads((trained_bundle / "splits.json").read_text())
    assert len(splits["train"]) == 18 and len(splits["val"]) == 6


def test_metadata_round_trips_through_load(trained_bundle, tiny_backbone):
    from tlcli.config import TrainConfig

    b = bundle.load(trained_bundle)
    assert b.labels == ["blue", "green", "red"] and b.image_size == 32
    cfg = TrainConfig.from_dict(b.meta.config)
    # The settings the fixture trained with come back, and so do the defaults it did not set.
    assert (cfg.backbone, cfg.image_size, cfg.epochs, cfg.batch_size) == (str(tiny_backbone), 32, 60, 8)
    assert cfg.label_smoothing == TrainConfig().label_smoothing and cfg.fine_tune is False
    assert b.max_pixels == TrainConfig().max_pixels
    assert b.meta.backbone.handle == str(tiny_backbone)


def test_serving_signature_takes_images_and_returns_probabilities(trained_bundle):
    import tensorflow as tf

    from tests.helpers import COLOURS

    loaded = tf.saved_model.load(str(trained_bundle))
    fn = loaded.signatures["serving_default"]
    spec = fn.structured_input_signature[1]["images"]
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 32, 32, 3]
    batch = np.stack([np.full((32, 32, 3), c, np.float32) / 255 for c in COLOURS.values()])
    probs = fn(images=tf.constant(batch))["probabilities"].numpy()
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert list(probs.argmax(axis=1)) == [0, 1, 2]


def test_commit_refuses_to_replace_without_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "tlcli.json").write_text("old")
    staging = bundle.staging_dir(out)
    (staging / "tlcli.json").write_text("new")
    with pytest.raises(OutputExistsError):
        bundle.commit(staging, out, force=False)
    assert (out / "tlcli.json").read_text() == "old"
    bundle.commit(staging, out, force=True)
    assert (out / "tlcli.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_save_leaves_previous_bundle_and_no_staging(tmp_path, bundle_copy, tiny_backbone, colour_data,
                                                           monkeypatch, train_args):
    import tlcli
    from tlcli import bundle

    before = (bundle_copy / "tlcli.json").read_text()

    def boom(staging, meta, **parts):
        (staging / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle, "save", boom)
    with pytest.raises(tlcli.TlcliError, match="untouched"):
        tlcli.train(colour_data, out=str(bundle_copy), force=True, **train_args)
    assert (bundle_copy / "tlcli.json").read_text() == before
    assert [p.name for p in bundle_copy.parent.iterdir() if p.name.startswith(".model.tmp")] == []


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("not-bundle", "not a tlcli model"),
    ("corrupt-json", "corrupt bundle metadata"),
    ("newer", "newer tlcli"),
])
def test_bad_model_directories_get_clear_errors(tmp_path, bundle_copy, case, message):
    target = bundle_copy
    if case == "missing":
        target = tmp_path / "absent"
    elif case == "not-bundle":
        (target / "tlcli.json").unlink()
    elif case == "corrupt-json":
        (target / "tlcli.json").write_text("{not json")
    elif case == "newer":
        meta = json.loads((target / "tlcli.json").read_text())
        meta["format_version"] = bundle.FORMAT_VERSION + 1
        (target / "tlcli.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        bundle.load(target)


def test_corrupt_savedmodel_is_reported(bundle_copy, colour_data):
    import tlcli

    (bundle_copy / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="SavedModel cannot be loaded"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy, engine="tf")


def test_tflite_engine_without_tflite_file_is_reported(bundle_copy, colour_data):
    import tlcli

    with pytest.raises(BundleError, match="tlcli export --format tflite"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy, engine="tflite")


def test_output_checks_run_before_training(tmp_path, monkeypatch, colour_data, train_args):
    import shutil as sh
    from collections import namedtuple

    import tlcli

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(tlcli.TlcliError, match=r"--out .*MB free.*free some space"):
        tlcli.train(colour_data, out=str(tmp_path / "model"), **train_args)
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(tlcli.TlcliError, match="is a file"):
        tlcli.train(colour_data, out=str(tmp_path / "file"), force=True, **train_args)


def test_bundle_files_get_normal_permissions(trained_bundle):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("tlcli.json", "splits.json", "labels.txt"):
        assert (trained_bundle / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_corrupt_splits_file_is_a_one_line_error(bundle_copy):
    from tlcli.deploy.export import export_tflite

    (bundle_copy / "splits.json").write_text("{oops")
    with pytest.raises(BundleError, match=r"splits.json: unreadable or corrupt.*--data DIR"):
        export_tflite(bundle_copy, quantize="int8")
