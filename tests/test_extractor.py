"""--extractor: the frozen backbone's features through LiteRT (a cached conversion, checked against
TensorFlow on each run's first batch) or TensorFlow, on the tiny test backbone."""

import json
import os

import numpy as np
import pytest

import tlcli
from tests.helpers import run_cli
from tlcli import bundle, data, features
from tlcli.config import TrainConfig
from tlcli.data import image_files, images
from tlcli.errors import UsageError
from tlcli.features import store as feature_store
from tlcli.model import backbone
from tlcli.model import classifier as model
from tlcli.model import litert as litert_backbone
from tlcli.progress import Start, Warn

SIZE = 32


def events(kind):
    """A progress callback and the list it fills with the events of type ``kind``."""
    seen = []
    return (lambda e: seen.append(e) if isinstance(e, kind) else None), seen


@pytest.fixture(scope="module")
def loaded(tiny_backbone):
    spec = backbone.resolve_spec(str(tiny_backbone), SIZE)
    return spec, backbone.load(spec)


def predictions(bundle, folder):
    return {p.path: (p.predictions[0]["label"], {d["label"]: d["probability"] for d in p.predictions})
            for p in tlcli.predict([folder], model_dir=bundle, engine="tf", top_k=3)}


def test_litert_and_tf_extractors_give_the_same_labels_and_predictions(tmp_path, tiny_backbone, colour_data,
                                                                      train_args):
    result = run_cli("train", colour_data, "--backbone", tiny_backbone, "--image-size", SIZE, "--epochs", 60,
                     "--batch-size", 8, "--tensorboard", "none", "--extractor", "tf", "--out", tmp_path / "tf",
                     "--cache-dir", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extractor"] == "tf"
    lite = tlcli.train(colour_data, out=str(tmp_path / "litert"), extractor="litert", cache_dir=str(tmp_path / "cache"),
                       **train_args)
    assert lite.extractor == "litert" and lite.extracted == 24
    warm = tlcli.train(colour_data, out=str(tmp_path / "warm"), extractor="litert", cache_dir=str(tmp_path / "cache"),
                       **train_args)
    assert (warm.extracted, warm.cached, warm.val_loss) == (0, 24, lite.val_loss)  # LiteRT's features were stored
    # The two engines' features are cached apart, and the converted backbone once.
    key = backbone.cache_key(backbone.resolve_spec(str(tiny_backbone), SIZE), SIZE)
    stored = sorted(p.name for p in (tmp_path / "cache" / "store").iterdir())
    assert [n for n in stored if "-copy" not in n] == \
        [f"{key}-d{feature_store.DECODER_VERSION}", f"{key}-litert-d{feature_store.DECODER_VERSION}"]
    # train's audit check caches its calibration copies beside each engine's features, apart too
    assert [n for n in stored if "-copy0" in n] == \
        [f"{key}-copy0-d{feature_store.DECODER_VERSION}", f"{key}-litert-copy0-d{feature_store.DECODER_VERSION}"]
    assert [p.name for p in (tmp_path / "cache" / "backbones").iterdir()] == [f"{key}.tflite"]

    tf_preds, lite_preds = predictions(tmp_path / "tf", colour_data), predictions(tmp_path / "litert", colour_data)
    assert len(tf_preds) == 24
    assert {p: label for p, (label, _) in tf_preds.items()} == {p: label for p, (label, _) in lite_preds.items()}
    for path, (_, probs) in tf_preds.items():
        assert probs == pytest.approx(lite_preds[path][1], abs=1e-4)
    metas = [json.loads((tmp_path / name / "tlcli.json").read_text()) for name in ("tf", "litert")]
    assert [m["config"]["extractor"] for m in metas] == ["tf", "litert"]
    assert [m["training"]["extractor"] for m in metas] == ["tf", "litert"]
    assert metas[0]["metrics"]["val_accuracy"] == metas[1]["metrics"]["val_accuracy"]

    # Reproducible: the same command, from a cold cache again, gives the same model.
    again = tlcli.train(colour_data, out=str(tmp_path / "again"), extractor="litert",
                        cache_dir=str(tmp_path / "cache2"), **train_args)
    assert again.extracted == 24 and again.val_loss == lite.val_loss
    assert json.loads((tmp_path / "again" / "tlcli.json").read_text())["metrics"] == metas[1]["metrics"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another backbone", "folder"])
def test_a_damaged_cached_conversion_is_converted_again(tmp_path, loaded, damage):
    spec, backbone_ = loaded
    first = litert_backbone.prepare(backbone_, spec, cache_dir=tmp_path)
    path = litert_backbone.cached_path(tmp_path, backbone.cache_key(spec, SIZE))
    good = path.read_bytes()
    assert good[4:8] == b"TFL3"
    if damage == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(good[:8] + os.urandom(len(good) - 8))
    elif damage == "another backbone":  # a valid .tflite of another output size
        path.write_bytes(litert_backbone.convert(_keras_backbone(5), SIZE))
    else:
        path.unlink()
        path.mkdir()
    progress, starts = events(Start)
    again = litert_backbone.prepare(backbone_, spec, cache_dir=tmp_path, progress=progress)
    assert [s.task for s in starts] == ["convert"]
    batch = np.random.default_rng(0).random((3, SIZE, SIZE, 3), np.float32)
    np.testing.assert_array_equal(again(batch), first(batch))
    if damage != "folder":  # a folder in its place cannot be replaced; the run still converts
        assert path.read_bytes() == good
        progress, starts = events(Start)
        litert_backbone.prepare(backbone_, spec, cache_dir=tmp_path, progress=progress)
        assert starts == []  # valid now: read, not converted


def test_the_backbone_is_converted_frozen_in_memory_and_through_a_savedmodel_only_when_that_fails(
        loaded, monkeypatch):
    _, backbone_ = loaded
    batch = np.random.default_rng(0).random((3, SIZE, SIZE, 3), np.float32)
    want = np.asarray(backbone_.layer(batch, training=False))
    converted, tried = litert_backbone._converted, []

    def recording(converter, *, frozen):
        tried.append(frozen)
        return converted(converter, frozen=frozen)

    monkeypatch.setattr(litert_backbone, "_converted", recording)
    frozen = litert_backbone.LiteRTBackbone(litert_backbone.convert(backbone_.layer, SIZE), image_size=SIZE)
    assert tried == [True]

    def freezing_fails(converter, *, frozen):
        tried.append(frozen)
        if frozen:
            raise ValueError("cannot freeze")
        return converted(converter, frozen=frozen)

    tried.clear()
    monkeypatch.setattr(litert_backbone, "_converted", freezing_fails)
    saved = litert_backbone.LiteRTBackbone(litert_backbone.convert(backbone_.layer, SIZE), image_size=SIZE)
    assert tried == [True, False]
    np.testing.assert_array_equal(frozen(batch), saved(batch))
    assert litert_backbone.parity_error(want, frozen(batch)) <= litert_backbone.PARITY_TOLERANCE


def _keras_backbone(dim):
    """A Keras model from images to ``dim`` features (not the tiny backbone's)."""
    import tf_keras as k

    inp = k.Input((SIZE, SIZE, 3))
    return k.Model(inp, k.layers.Dense(dim, kernel_initializer="ones")(k.layers.GlobalAveragePooling2D()(inp)))


def _unconvertible_backbone(path):
    """A hub-format feature vector using an op LiteRT has no builtin for (bessel_i0e)."""
    import tensorflow as tf

    root = tf.train.Checkpoint()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def call(x):
        return tf.concat([tf.reduce_mean(x, [1, 2]), tf.reduce_mean(tf.math.bessel_i0e(x * 4.0), [1, 2])], -1)

    root.__call__ = call
    tf.saved_model.save(root, str(path))
    return path


def test_a_backbone_that_cannot_be_converted_falls_back_to_tensorflow_with_a_warning(tmp_path, colour_data,
                                                                                     train_args, monkeypatch):
    converted, tried = litert_backbone._converted, []
    monkeypatch.setattr(litert_backbone, "_converted",
                        lambda converter, *, frozen: tried.append(frozen) or converted(converter, frozen=frozen))
    progress, warnings = events(Warn)
    args = dict(train_args, backbone=str(_unconvertible_backbone(tmp_path / "bessel")))
    result = tlcli.train(colour_data, out=str(tmp_path / "m"), extractor="litert", cache_dir=str(tmp_path / "cache"),
                         progress=progress, **args)
    assert result.extractor == "tf" and result.extracted == 24 and result.val_accuracy == 1.0
    warnings = [w for w in warnings if w.message.startswith("--extractor")]  # not train's audit line
    assert len(warnings) == 1 and "\n" not in warnings[0].message
    assert warnings[0].message.startswith("--extractor litert: the backbone cannot be converted to LiteRT")
    assert warnings[0].message.endswith("its features come from TensorFlow")
    assert not (tmp_path / "cache" / "backbones").exists() or not any((tmp_path / "cache" / "backbones").iterdir())
    assert tried == [True]  # an op LiteRT lacks is not tried a second time through a SavedModel


def test_auto_picks_tensorflow_when_a_gpu_is_listed(tmp_path, colour_data, train_args, monkeypatch):
    import tensorflow as tf

    assert litert_backbone.engine_for("auto") == "litert"  # this machine lists no GPU
    listed = tf.config.list_physical_devices()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: listed + [
        tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")])
    assert litert_backbone.engine_for("auto") == "tf"
    assert (litert_backbone.engine_for("litert"), litert_backbone.engine_for("tf")) == ("litert", "tf")
    result = tlcli.train(colour_data, out=str(tmp_path / "m"), cache_dir=str(tmp_path / "cache"), **train_args)
    assert result.extractor == "tf"
    assert not (tmp_path / "cache" / "backbones").exists()


def test_engines_that_disagree_on_the_first_batch_fall_back_to_tensorflow(tmp_path, loaded, colour_data):
    spec, backbone_ = loaded
    extractors = (model.build_extractor(backbone_.layer, SIZE), model.build_extractor(backbone_.layer, SIZE, flip=True))
    samples = data.scan(colour_data, image_size=SIZE).samples
    common = dict(extractors=extractors, cache_key="tiny", cache_dir=tmp_path, image_size=SIZE, batch_size=8,
                  max_pixels=TrainConfig().max_pixels, mirror=True)
    right = litert_backbone.prepare(backbone_, spec, cache_dir=tmp_path)
    views = features.compute_views(samples, litert=right, **common)
    assert views.engine == "litert" and right.parity <= litert_backbone.PARITY_TOLERANCE

    wrong = litert_backbone.LiteRTBackbone(litert_backbone.convert(_keras_backbone(backbone_.feature_dim), SIZE),
                                           image_size=SIZE, feature_dim=backbone_.feature_dim)
    progress, warnings = events(Warn)
    fallback = features.compute_views(samples, litert=wrong, progress=progress, **common)
    assert fallback.engine == "tf" and fallback.extracted == 2 * len(samples)  # TF's entries: none cached yet
    assert len(warnings) == 1 and "using TensorFlow" in warnings[0].message
    tf_only = features.compute_views(samples, **common)
    assert tf_only.cached == 2 * len(samples)
    np.testing.assert_array_equal(fallback.plain, tf_only.plain)
    np.testing.assert_allclose(views.plain, tf_only.plain, atol=1e-5)
    np.testing.assert_allclose(views.mirror, tf_only.mirror, atol=1e-5)


def test_the_file_check_keeps_the_model_inputs_it_decoded(colour_data):
    kept = images.KeptPixels(SIZE)
    samples = data.scan(colour_data, image_size=SIZE, keep=kept).samples
    assert kept.used == len(samples) * SIZE * SIZE * 3
    for s in samples:
        np.testing.assert_array_equal(images.as_model_input(kept.peek(s.digest)), images.load_for_model(s.path, SIZE))
    small = images.KeptPixels(SIZE, budget=5 * SIZE * SIZE * 3)
    data.scan(colour_data, image_size=SIZE, keep=small)
    assert small.used == 5 * SIZE * SIZE * 3  # within its budget; the rest decode again when extracted
    small.clear()
    assert small.used == 0 and small.peek(samples[0].digest) is None


def test_a_bundle_without_the_extractor_fields_still_loads(bundle_copy, colour_data):
    meta_path = bundle_copy / "tlcli.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["extractor"], meta["training"]["extractor"]
    meta_path.write_text(json.dumps(meta))
    loaded = bundle.load(bundle_copy)
    assert loaded.meta.training.extractor is None
    assert len(tlcli.predict([colour_data], model_dir=bundle_copy)) == 24


def test_an_unknown_extractor_is_a_one_line_usage_error(tmp_path, colour_data):
    result = run_cli("train", colour_data, "--extractor", "gpu", "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--extractor" in result.stderr
    with pytest.raises(UsageError, match=r"^--extractor gpu: must be one of auto, tf, litert$"):
        tlcli.train(colour_data, out=str(tmp_path / "m"), extractor="gpu")


@pytest.mark.parametrize("kept", [True, False])
def test_a_file_unreadable_after_the_check_is_named_unless_the_check_kept_its_input(tmp_path, colour_data, train_args,
                                                                                  monkeypatch, kept):
    victim, real = str(colour_data / "green" / "green_1.png"), images.load_for_model

    def flaky(path, size, **kw):  # passes the file check, then fails whenever the image is read again
        if str(path) == victim:
            raise images.ImageError(path, image_files.TRUNCATED)
        return real(path, size, **kw)

    monkeypatch.setattr(images, "load_for_model", flaky)
    monkeypatch.setattr(images, "KEPT_PIXELS_BUDGET", images.KEPT_PIXELS_BUDGET if kept else 0)
    run = dict(out=str(tmp_path / "m"), extractor="litert", cache_dir=str(tmp_path / "cache"), **train_args)
    if kept:  # trained on the bytes the check decoded and hashed, which the file is not read for again
        assert tlcli.train(colour_data, **run).extracted == 24
    else:
        with pytest.raises(tlcli.TlcliError, match="green_1.png: became unreadable"):
            tlcli.train(colour_data, **run)
        assert not (tmp_path / "m").exists()
