"""A shared bundle is untrusted input: its SavedModel may run only image-classification ops,
its metadata is validated once at load, every file it names is opened only if it is a regular
file, labels are written from the validated metadata, and another bundle's model.tflite is
recognised and refused."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import tlcli
from tests.helpers import deadline, install_saved_model
from tests.helpers import run_cli as run
from tlcli import bundle
from tlcli.errors import BundleError

SECRET = "TOP SECRET: do not leak"


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text(SECRET)
    p.chmod(0o600)
    return p


def make_leaking_model(path, secret, target, size=32, classes=3):
    """A SavedModel whose serving_default looks like a classifier's (images [b, size, size, 3] ->
    probabilities [b, classes]) but, inside a tf.cond branch (a nested function), reads
    ``secret`` with tf.io.read_file and copies it to ``target`` with tf.io.write_file."""
    import tensorflow as tf

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def serve(images):
        def leak():
            data = tf.io.read_file(str(secret))
            with tf.control_dependencies([tf.io.write_file(str(target), data)]):
                return tf.strings.length(data)

        n = tf.cond(tf.shape(images)[0] > 0, leak, lambda: tf.constant(0))
        probs = tf.ones([tf.shape(images)[0], classes]) / classes
        return {"probabilities": probs + 0.0 * tf.cast(n, tf.float32)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def make_load_time_writer(path, target, size=32, classes=3):
    """A SavedModel with an honest-looking signature and a resource whose initializer, which
    tf.saved_model.load runs, writes ``target``."""
    import tensorflow as tf

    class Resource(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="tlcli_test_res")

        def _initialize(self):
            tf.io.write_file(str(target), "written at load time")

    module = tf.Module()
    module.resource = Resource()

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def serve(images):
        return {"probabilities": tf.ones([tf.shape(images)[0], classes]) / classes}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    if target.exists():
        target.unlink()
    return path


# ---- item 3: the SavedModel is checked against an op allowlist before TensorFlow runs it ----

def test_a_real_tlcli_bundle_passes_the_op_check(trained_bundle):
    from tlcli.bundle import graphcheck

    proto = graphcheck.check_saved_model(trained_bundle)
    ops = graphcheck.reachable_ops(proto.meta_graphs[0])
    assert set(ops) <= graphcheck.ALLOWED_OPS
    # The bytes signature's decoder (nested If / Case / While / map_fn functions) is walked...
    assert {"DecodeJpeg", "DecodePng", "ScaleAndTranslate", "TensorListGetItem", "While"} <= set(ops)
    # ...and the saver's checkpoint functions, which TensorFlow 2 never runs at load, are not.
    library = {n.op for f in proto.meta_graphs[0].graph_def.library.function for n in f.node_def}
    assert {"RestoreV2", "SaveV2"} <= library
    assert not {"RestoreV2", "SaveV2", "MergeV2Checkpoints"} & set(ops)


def test_a_signature_that_reads_and_writes_files_is_refused_everywhere(bundle_copy, colour_data, secret,
                                                                        tmp_path):
    from tlcli.deploy.export import export_tflite

    target = tmp_path / "outside" / "stolen.txt"
    target.parent.mkdir()
    install_saved_model(make_leaking_model(tmp_path / "evil", secret, target), bundle_copy)
    image = colour_data / "red" / "red_0.jpg"
    calls = {
        "predict": lambda: tlcli.predict([image], model_dir=bundle_copy, engine="tf"),
        "evaluate": lambda: tlcli.evaluate(colour_data, model_dir=bundle_copy),
        "export": lambda: export_tflite(bundle_copy, output=tmp_path / "out.tflite"),
    }
    for name, call in calls.items():
        with pytest.raises(BundleError) as info:
            call()
        message = str(info.value)
        assert "ReadFile" in message and "WriteFile" in message and "refused" in message, name
        assert "\n" not in message
        assert not target.exists(), f"{name} ran the bundle's graph"
    assert not (tmp_path / "out.tflite").exists() and not (bundle_copy / "model.tflite").exists()
    result = run("predict", image, "--model", bundle_copy, "--engine", "tf")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "WriteFile" in result.output
    assert not target.exists()


def test_a_resource_that_writes_a_file_at_load_time_is_refused_before_loading(bundle_copy, colour_data,
                                                                              tmp_path):
    target = tmp_path / "written.txt"
    evil = make_load_time_writer(tmp_path / "evil", target)
    install_saved_model(evil, bundle_copy)
    with pytest.raises(BundleError, match="WriteFile"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy, engine="tf")
    assert not target.exists()
    # The premise: loading that SavedModel does write the file.
    import tensorflow as tf

    tf.saved_model.load(str(evil))
    assert target.exists()


def test_a_tf1_style_saved_model_is_refused(bundle_copy, colour_data):
    from tensorflow.core.protobuf import saved_model_pb2

    pb = bundle_copy / "saved_model.pb"
    proto = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    proto.meta_graphs[0].ClearField("object_graph_def")  # TensorFlow would load it as TF1, running init ops
    pb.write_bytes(proto.SerializeToString())
    with pytest.raises(BundleError, match="TF1-style"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy, engine="tf")


def test_signature_and_metadata_must_agree(bundle_copy, colour_data):
    image = colour_data / "red" / "red_0.jpg"
    meta_path = bundle_copy / "tlcli.json"
    original = json.loads(meta_path.read_text())
    for change in ({"image_size": 48}, {"labels": ["blue", "green", "red", "yellow"]}):
        meta_path.write_text(json.dumps(original | change))
        with pytest.raises(BundleError, match=r"saved_model.pb: serving_default takes .*inconsistent"):
            tlcli.predict([image], model_dir=bundle_copy, engine="tf")


def test_graphcheck_and_schema_import_no_tensorflow():
    code = ("import sys, tlcli.bundle.graphcheck, tlcli.bundle.schema, tlcli.bundle, tlcli.deploy.inference; "
            "print([m for m in ('tensorflow', 'tf_keras') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- item 4: the whole metadata schema is validated once, at load ----------------------------

META_CASES = {
    "labels not a list": {"labels": "blue,green,red"},
    "labels with a duplicate": {"labels": ["blue", "green", "blue"]},
    "labels with a newline": {"labels": ["blue", "gre\nen", "red"]},
    "labels with U+2028": {"labels": ["blue", "gre\u2028en", "red"]},
    "labels with an escape": {"labels": ["blue", "\x1b]0;pwned\x07", "red"]},
    "labels not strings": {"labels": ["blue", 2, "red"]},
    "labels empty string": {"labels": ["blue", "", "red"]},
    "a single label": {"labels": ["blue"]},
    "image_size a string": {"image_size": "32"},
    "image_size negative": {"image_size": -32},
    "image_size huge": {"image_size": 100000},
    "image_size a bool": {"image_size": True},
    "config not an object": {"config": ["epochs", 60]},
    "max_pixels negative": {"config": {"max_pixels": -1}},
    "max_pixels a string": {"config": {"max_pixels": "x"}},
    "config field of the wrong type": {"config": {"epochs": "sixty"}},
    "exports a list": {"exports": ["model.tflite"]},
    "exports of non-objects": {"exports": {"model.tflite": 3}},
    "format_version a string": {"format_version": "1"},
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_wrong_metadata_types_and_ranges_are_one_line_errors(bundle_copy, case):
    meta_path = bundle_copy / "tlcli.json"
    meta = json.loads(meta_path.read_text())
    change = dict(META_CASES[case])
    if "config" in change and isinstance(change["config"], dict):
        change["config"] = meta["config"] | change["config"]
    meta_path.write_text(json.dumps(meta | change))
    with pytest.raises(BundleError) as info:
        bundle.load(bundle_copy)
    message = str(info.value)
    assert str(meta_path) in message and "retrain or restore" in message
    assert message.isprintable(), message


@pytest.mark.parametrize("payload", [b"[1, 2, 3]", b"\xff\xfe{}", b"{\"labels\": ", b"null"])
def test_metadata_that_is_not_a_json_object_is_a_one_line_error(bundle_copy, payload):
    (bundle_copy / "tlcli.json").write_bytes(payload)
    result = run("predict", bundle_copy / "labels.txt", "--model", bundle_copy)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tlcli.json" in lines[0] and "corrupt bundle metadata" in lines[0]


SPLITS_CASES = {
    "not an object": [["a.jpg", 0]],
    "train not a list": {"train": "all", "val": []},
    "a non-int label": {"train": [["a.jpg", "0"]], "val": []},
    "a bool label": {"train": [["a.jpg", True]], "val": []},
    "a label out of range": {"train": [["a.jpg", 3]], "val": []},
    "a negative label": {"train": [], "val": [["a.jpg", -1]]},
    "a path that is not a string": {"train": [[7, 0]], "val": []},
    "an entry that is not a pair": {"train": [["a.jpg", 0, 1]], "val": []},
}


@pytest.mark.parametrize("case", sorted(SPLITS_CASES))
def test_wrong_splits_are_one_line_errors(bundle_copy, case):
    path = bundle_copy / "splits.json"
    path.write_text(json.dumps(SPLITS_CASES[case]))
    with pytest.raises(BundleError) as info:
        bundle.load(bundle_copy)
    message = str(info.value)
    assert str(path) in message and "--data DIR" in message and message.isprintable()


def test_a_valid_bundle_still_loads_with_its_splits(trained_bundle):
    b = bundle.load(trained_bundle)
    assert len(b.splits()["train"]) == 18 and len(b.splits()["val"]) == 6
    assert b.labels_text() == "blue\ngreen\nred\n"


def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("name, make", [
    ("tlcli.json", _fifo),
    ("splits.json", _fifo),
    ("splits.json", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
    ("model.tflite", _fifo),
    ("model.tflite", lambda p: p.symlink_to("/dev/zero")),
])
def test_a_fifo_or_device_in_the_bundle_is_an_error_not_a_hang(bundle_copy, colour_data, name, make):
    make(bundle_copy / name)
    with deadline(30):
        result = run("predict", colour_data / "red" / "red_0.jpg", "--model", bundle_copy)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "not a regular file" in lines[0], result.output


@pytest.mark.parametrize("name", ["saved_model.pb", "variables/variables.index"])
def test_a_fifo_in_the_saved_model_is_an_error_not_a_hang(bundle_copy, colour_data, name):
    _fifo(bundle_copy / name)
    with deadline(60), pytest.raises(BundleError, match="not a regular file"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy, engine="tf")


# ---- items 5, 14, 15: labels written from metadata; another bundle's .tflite is refused -------

@pytest.fixture(scope="module")
def exported_bundle(trained_bundle, tmp_path_factory):
    """A copy of the trained bundle with its own model.tflite, exported once."""
    from tlcli.deploy.export import export_tflite

    path = tmp_path_factory.mktemp("trust-export") / "model"
    shutil.copytree(trained_bundle, path)
    (path / "labels.txt").unlink()  # a missing labels.txt is regenerated, not a crash
    result = export_tflite(path)
    return path, result


def test_export_regenerates_a_missing_labels_txt_from_the_metadata(exported_bundle):
    path, result = exported_bundle
    assert result.labels_path == str(path / "labels.txt")
    assert (path / "labels.txt").read_text() == "blue\ngreen\nred\n"


def test_a_labels_txt_link_is_never_copied_out(bundle_copy, secret, tmp_path):
    from tlcli.deploy.export import export_tflite

    (bundle_copy / "labels.txt").unlink()
    (bundle_copy / "labels.txt").symlink_to(secret)
    from tlcli.deploy.tflite_meta import labels_in

    result = export_tflite(bundle_copy, output=tmp_path / "phone.tflite")
    assert result.labels_path is None and not (tmp_path / "phone.labels.txt").exists()
    assert labels_in(tmp_path / "phone.tflite") == ["blue", "green", "red"]
    assert SECRET.encode() not in (tmp_path / "phone.tflite").read_bytes()
    assert secret.read_text() == SECRET  # the link's target is untouched


def test_a_tflite_with_other_labels_is_refused(bundle_copy, exported_bundle, colour_data):
    shutil.copyfile(exported_bundle[0] / "model.tflite", bundle_copy / "model.tflite")
    assert tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy)[0].error is None
    meta = json.loads((bundle_copy / "tlcli.json").read_text())
    meta["labels"] = ["cat", "dog", "fox"]  # another bundle: same size, same number of classes
    (bundle_copy / "tlcli.json").write_text(json.dumps(meta))
    result = run("predict", colour_data / "red" / "red_0.jpg", "--model", bundle_copy)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "made for another model" in lines[0] and "labels" in lines[0]
    assert "re-export" in lines[0]


def test_a_tflite_from_another_bundle_with_the_same_labels_is_refused(bundle_copy, exported_bundle,
                                                                     colour_data):
    shutil.copyfile(exported_bundle[0] / "model.tflite", bundle_copy / "model.tflite")
    # Another training: same labels, size and classes, another SavedModel (fingerprint).
    fp = bundle_copy / "fingerprint.pb"
    fp.write_bytes(fp.read_bytes() + b"\x00")
    with pytest.raises(BundleError, match="made for another model.*re-export"):
        tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=bundle_copy)


def test_embedded_labels_split_on_newline_only(exported_bundle, tmp_path):
    from tensorflow.lite.tools import flatbuffer_utils

    from tlcli.deploy.tflite_meta import labels_in as tflite_labels

    model = flatbuffer_utils.read_model(str(exported_bundle[0] / "model.tflite"))
    entry = next(m for m in model.metadata if m.name == b"labels")
    import numpy as np

    model.buffers[entry.buffer].data = np.frombuffer("a\u2028b\nc\x85d\ne\n".encode(), np.uint8)
    flatbuffer_utils.write_model(model, str(tmp_path / "odd.tflite"))
    assert tflite_labels(tmp_path / "odd.tflite") == ["a\u2028b", "c\x85d", "e"]


def test_a_fifo_or_device_named_in_splits_is_skipped_by_export(bundle_copy, tmp_path):
    from tlcli.deploy.export import export_tflite

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    splits_path = bundle_copy / "splits.json"
    splits = json.loads(splits_path.read_text())
    splits["val"] = [[str(fifo), 0], ["/dev/zero", 1]] + splits["val"]
    splits_path.write_text(json.dumps(splits))
    with deadline(120):
        result = export_tflite(bundle_copy, output=tmp_path / "m.tflite")
    assert result.parity_images == 6 and result.agreement == 1.0
