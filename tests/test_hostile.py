"""Variants of the hostile cases that the first fixes missed: each test failed before
its fix."""

import os
import shutil
import time

import pytest

import tlcli
from tests.helpers import deadline, install_saved_model
from tlcli import bundle
from tlcli.deploy import export
from tlcli.errors import BundleError, UsageError
from tlcli.insight import evaluation


def _replace(path, make):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    make(path)


@pytest.mark.parametrize("name", ["tlcli.json", "splits.json", "model.tflite"])
def test_a_folder_in_place_of_a_bundle_file_is_a_one_line_error(bundle_copy, colour_data, name):
    _replace(bundle_copy / name, lambda p: p.mkdir())
    with pytest.raises(BundleError, match=f"{name}: not a regular file"):
        tlcli.predict([colour_data / "red" / "red_1.png"], model_dir=bundle_copy, engine="tflite")


def test_a_folder_in_place_of_fingerprint_pb_is_a_one_line_error(bundle_copy):
    _replace(bundle_copy / "fingerprint.pb", lambda p: p.mkdir())
    with pytest.raises(BundleError, match="fingerprint.pb: not a regular file"):
        bundle.load(bundle_copy).fingerprint()


def test_a_folder_in_place_of_saved_model_pb_is_a_one_line_error(bundle_copy, colour_data):
    _replace(bundle_copy / "saved_model.pb", lambda p: p.mkdir())
    with pytest.raises(BundleError, match="saved_model.pb: not a regular file"):
        tlcli.predict([colour_data / "red" / "red_1.png"], model_dir=bundle_copy, engine="tf")


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.symlink("/dev/zero", p)], ids=["fifo", "dev-zero"])
def test_a_fifo_fingerprint_does_not_hang_the_tensorflow_engine(bundle_copy, colour_data, make):
    # TensorFlow's SavedModel loader opens fingerprint.pb itself: a FIFO blocked it forever.
    _replace(bundle_copy / "fingerprint.pb", make)
    with deadline(60), pytest.raises(BundleError, match="fingerprint.pb: not a regular file"):
        evaluation.evaluate(colour_data, model_dir=bundle_copy, engine="tf")


def _crafted_model(path, output, score=lambda tf, x: tf.zeros([tf.shape(x)[0]])):
    """A SavedModel with only allowed ops whose serving_default and tlcli signatures have the
    declared shapes (images [b, 32, 32, 3] -> probabilities [b, 3], and unknown_score [b]) but
    ``output(images)`` and ``score(images)`` give other values."""
    import tensorflow as tf

    module = tf.Module()
    spec = [tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")]

    @tf.function(input_signature=spec)
    def serve(images):
        return {"probabilities": tf.ensure_shape(output(tf, images), [None, 3])}

    @tf.function(input_signature=spec)
    def serve_tlcli(images):
        return {**serve(images), "unknown_score": tf.ensure_shape(score(tf, images), [None])}

    module.serve, module.serve_tlcli = serve, serve_tlcli
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve, "tlcli": serve_tlcli})
    return path


CRAFTED_OUTPUTS = {
    "nan": lambda tf, x: tf.fill([tf.shape(x)[0], 3], float("nan")),
    "negative": lambda tf, x: tf.ones([tf.shape(x)[0], 3]) * -5.0,
    # one row whatever the batch: every image after the first would get no result, or another's
    "one-row": lambda tf, x: tf.ones([1, 3]) / 3,
    # fails at run time with an InvalidArgumentError
    "run-time-error": lambda tf, x: tf.reshape(x, [7, -1, 3])[:, :3, 0],
}


@pytest.mark.parametrize("case", sorted(CRAFTED_OUTPUTS))
def test_a_crafted_model_whose_output_is_not_probabilities_is_refused(bundle_copy, colour_data, tmp_path, case):
    install_saved_model(_crafted_model(tmp_path / "sm", CRAFTED_OUTPUTS[case]), bundle_copy)
    with pytest.raises(BundleError, match="saved_model.pb: the model"):
        evaluation.evaluate(colour_data, model_dir=bundle_copy, engine="tf")


def test_a_crafted_unknown_score_that_is_not_one_finite_number_an_image_is_refused(bundle_copy, colour_data,
                                                                                   tmp_path):
    uniform = CRAFTED_OUTPUTS["negative"]
    for name, score in {"nan": lambda tf, x: tf.fill([tf.shape(x)[0]], float("nan")),
                        "one": lambda tf, x: tf.zeros([1])}.items():
        install_saved_model(_crafted_model(tmp_path / name, lambda tf, x: uniform(tf, x) * 0 + 1 / 3, score),
                            bundle_copy)
        with pytest.raises(BundleError, match="saved_model.pb: the model gave unknown scores"):
            tlcli.predict([colour_data / "red"], model_dir=bundle_copy, engine="tf")


def test_a_crafted_model_failing_at_run_time_is_one_line_on_the_command_line(bundle_copy, colour_data, tmp_path):
    from tests.helpers import run_cli

    install_saved_model(_crafted_model(tmp_path / "sm", CRAFTED_OUTPUTS["run-time-error"]), bundle_copy)
    r = run_cli("predict", colour_data / "red" / "red_1.png", "--model", bundle_copy, "--engine", "tf")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "the model failed on a batch" in r.output


def test_export_refuses_an_image_renamed_to_tflite(bundle_copy, colour_data, tmp_path):
    target = tmp_path / "holiday.tflite"
    shutil.copyfile(colour_data / "red" / "red_1.png", target)
    before = target.read_bytes()
    with pytest.raises(UsageError, match="not a .tflite file"):
        export.export_tflite(bundle_copy, output=target)
    assert target.read_bytes() == before


def test_export_still_replaces_a_real_tflite_and_a_damaged_model_tflite(bundle_copy, colour_data, tmp_path):
    # (a guard for the check above: what it must keep allowing)
    first = export.export_tflite(bundle_copy, output=tmp_path / "a.tflite")
    export.export_tflite(bundle_copy, output=first.path, force=True)  # a .tflite flatbuffer: replaced
    (bundle_copy / "model.tflite").write_bytes(b"truncated")  # predict says: re-export it
    export.export_tflite(bundle_copy, force=True)
    [p] = tlcli.predict([colour_data / "red" / "red_1.png"], model_dir=bundle_copy, engine="tflite")
    assert p.error is None and p.predictions[0]["label"] == "red"


def test_export_through_a_link_to_the_bundle_refreshes_its_own_labels(bundle_copy, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(bundle_copy, target_is_directory=True)
    (bundle_copy / "labels.txt").write_text("stale\n")
    r = export.export_tflite(bundle_copy, output=link / "model.tflite")
    assert os.path.realpath(r.labels_path) == os.path.realpath(bundle_copy / "labels.txt")
    assert (bundle_copy / "labels.txt").read_text() == "blue\ngreen\nred\n"
    assert not (bundle_copy / "model.labels.txt").exists()


def test_a_class_folder_whose_name_is_not_utf8_is_refused_in_one_line(tmp_path, colour_data, tiny_backbone):
    from tests.helpers import run_cli

    root = tmp_path / "ds"
    shutil.copytree(colour_data, root)
    os.rename(root / "red", os.path.join(os.fsencode(root), b"r\xe9d"))  # Latin-1 "red", not UTF-8
    r = run_cli("train", root, "--out", tmp_path / "m", "--backbone", tiny_backbone, "--image-size", 32,
                "--epochs", 60, "--batch-size", 8, "--tensorboard", "none")
    assert r.exit_code == 1 and isinstance(r.exception, (SystemExit, type(None))), r.exception
    assert "non-UTF-8" in r.output and "\\udce9" in r.output
    assert not (tmp_path / "m").exists()


def test_an_image_whose_file_name_is_not_utf8_goes_through_the_tensorflow_pipeline(tmp_path, colour_data):
    import numpy as np

    from tlcli import data
    from tlcli.data import images

    name = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))  # Latin-1, a lone surrogate
    shutil.copyfile(colour_data / "red" / "red_1.png", name)
    [batch] = list(data.image_dataset([name], 32, batch_size=1).as_numpy_iterator())
    np.testing.assert_array_equal(batch[0], images.load_for_model(name, 32))


def test_labels_reordered_in_tlcli_json_are_refused_by_the_tensorflow_engine(bundle_copy, colour_data):
    # The TFLite path compares its embedded labels; the SavedModel holds them too (serving_bytes).
    import json

    meta = json.loads((bundle_copy / "tlcli.json").read_text())
    meta["labels"] = meta["labels"][::-1]
    (bundle_copy / "tlcli.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="labels stored in the SavedModel"):
        evaluation.evaluate(colour_data, model_dir=bundle_copy, engine="tf")
    with pytest.raises(BundleError, match="labels stored in the SavedModel"):
        export.export_tflite(bundle_copy)


_INTERRUPTED_IMPORT = """
import sys

class InterruptedImport:
    # What Ctrl-C inside a compiled extension's initialisation looks like: pybind11 wraps the
    # KeyboardInterrupt in ImportError("initialization failed").
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise ImportError("initialization failed") from exc

sys.meta_path.insert(0, InterruptedImport())
sys.argv = ["tlcli", *sys.argv[1:]]
from tlcli.cli import run
run()
"""


def test_ctrl_c_inside_the_tensorflow_import_exits_130_without_a_traceback(tmp_path, colour_data, tiny_backbone,
                                                                          bundle_copy):
    import hashlib
    import subprocess
    import sys

    def digest(folder):
        return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(bundle_copy)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_IMPORT, "train", str(colour_data), "--out",
                        str(bundle_copy), "--force", "--backbone", str(tiny_backbone), "--image-size", "32",
                        "--tensorboard", "none"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert digest(bundle_copy) == before


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.symlink("/dev/zero", p), os.mkdir],
                         ids=["fifo", "dev-zero", "folder"])
def test_a_cache_entry_that_is_not_a_regular_file_reads_as_missing_without_blocking(tmp_path, make):
    import numpy as np

    from tlcli.features import store as feature_store

    cache = feature_store.model_store(tmp_path / "cache", "m", dim=3)
    digest = "ab" * 16
    cache.put(digest, np.ones(3, np.float32))
    cache.flush()
    sidecar = next(cache.dir.glob("*.json"))
    halves = {p: p.read_bytes() for p in (sidecar.with_suffix(".f32"), sidecar)}
    for entry in halves:  # either half of the shard (a damaged shard is removed: put both back)
        for p, saved in halves.items():
            p.write_bytes(saved)
        entry.unlink()
        make(entry)  # planted in a shared cache
        start = time.monotonic()
        with deadline(20):  # (get swallows the deadline's error: the time taken tells)
            assert feature_store.model_store(tmp_path / "cache", "m", dim=3).get(digest) is None
        assert time.monotonic() - start < 10, "blocked on the entry"
        entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
