"""The recipe's public steps: feature views through the cache, the head's one numpy forward pass
(equal to the saved classifier's), and the resumable run state."""

import dataclasses
import json

import numpy as np
import pytest

import tlcli
from tlcli import data, features
from tlcli.config import TrainConfig
from tlcli.errors import UsageError
from tlcli.model import head
from tlcli.training import run_state

SIZE = 32


@pytest.fixture(scope="module")
def extractors(tiny_backbone):
    from tlcli.model import backbone
    from tlcli.model import classifier as model

    loaded = backbone.load(backbone.resolve_spec(str(tiny_backbone), SIZE))
    return model.build_extractor(loaded.layer, SIZE), model.build_extractor(loaded.layer, SIZE, flip=True)


def views_of(samples, extractors, cache_dir, **options):
    return features.compute_views(samples, extractors=extractors, cache_key="tiny", cache_dir=cache_dir,
                                  image_size=SIZE, batch_size=8, max_pixels=TrainConfig().max_pixels, **options)


def head_weights(bundle):
    """The head's Dense kernel [features, classes] and bias [classes], read from the SavedModel."""
    import tensorflow as tf

    variables = [v.numpy() for v in tf.saved_model.load(str(bundle)).weights]  # serving.serving_module tracks them
    kernel = next(v for v in variables if v.shape == (3 + 8, 3))  # the tiny backbone has 3 + 8 features
    bias = next(v for v in variables if v.shape == (3,))
    return kernel, bias


@pytest.mark.parametrize("mirror", [False, True])
def test_predict_proba_on_the_feature_views_equals_the_saved_model(tmp_path, colour_data, trained_bundle,
                                                                  train_args, extractors, mirror):
    import tensorflow as tf

    from tlcli.data import images

    bundle = trained_bundle
    if mirror:
        bundle = tmp_path / "mirror"
        tlcli.train(colour_data, out=str(bundle), mirror=True, cache_dir=str(tmp_path / "cache"), **train_args)
    samples = data.scan(colour_data, image_size=SIZE).samples[::4]
    views = views_of(samples, extractors, tmp_path / "cache", mirror=mirror)
    assert (views.mirror is not None) == mirror
    kernel, bias = head_weights(bundle)
    ours = head.predict_proba(views.plain, kernel, bias, mirror_features=views.mirror)

    batch = np.stack([images.load_for_model(s.path, SIZE) for s in samples])
    served = tf.saved_model.load(str(bundle)).signatures["serving_default"]
    theirs = served(images=tf.constant(batch))["probabilities"].numpy()
    assert ours.shape == theirs.shape == (len(samples), 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert list(ours.argmax(axis=1)) == [s.label for s in samples]


def test_feature_views_come_from_the_cache_and_keep_reuses_the_plain_view(tmp_path, colour_data, extractors):
    samples = data.scan(colour_data, image_size=SIZE).samples[:6]
    first = views_of(samples, extractors, tmp_path)
    assert (first.extracted, first.cached, first.mirror) == (6, 0, None)
    again = views_of(samples, extractors, tmp_path, mirror=True)
    assert (again.extracted, again.cached) == (6, 6)  # only the mirror view was new
    np.testing.assert_array_equal(again.plain, first.plain)
    kept = views_of(samples, extractors, tmp_path, mirror=True, frozen=False, keep=first)
    assert (kept.extracted, kept.cached) == (6, 6)  # not cached (frozen=False): the mirror view ran again
    assert kept.plain is first.plain
    np.testing.assert_allclose(kept.mirror, again.mirror, atol=1e-6)
    plain, mirror = again.of(samples[4:1:-1])
    np.testing.assert_array_equal(plain, again.plain[[4, 3, 2]])
    np.testing.assert_array_equal(mirror, again.mirror[again.rows(samples[4:1:-1])])


# A state.json as tlcli 0.1 wrote it while fine-tuning (interrupted after epoch 2).
STATE_0_1 = {
    "config": TrainConfig(data_dir="/data/images", out="/models/m", fine_tune=True).to_dict(),
    "history": {"head": [{"epoch": 1, "loss": 0.9}], "fine-tune": [{"epoch": 1, "val_loss": 0.4},
                                                                   {"epoch": 2, "val_loss": 0.5}]},
    "head_epochs": 12, "head_l2": 0.001, "head_cv_loss": {"0.001": 0.21, "0.01": 0.25},
    "fine_tune": {"best": 0.4, "best_epoch": 0, "wait": 1, "best_checkpoint": "/models/.m.partial/fine-tune/best-1",
                  "epochs_run": 2, "last_checkpoint": "/models/.m.partial/fine-tune/last"},
}


def test_run_state_reads_the_layout_of_tlcli_0_1_and_writes_it_back(tmp_path):
    state = run_state.RunState.from_json(json.loads(json.dumps(STATE_0_1)))
    assert state.config.fine_tune and state.config.data_dir == "/data/images"
    assert (state.head.epochs, state.head.l2) == (12, 0.001)
    ft = state.fine_tune
    assert (ft.epochs_run, ft.best, ft.best_epoch, ft.wait, ft.stopped) == (2, 0.4, 0, 1, False)
    assert ft.last_checkpoint.endswith("last") and ft.improved is None
    state.save(tmp_path / ".m.partial")
    written = json.loads((tmp_path / ".m.partial" / "state.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(ft)}  # fields added since 0.1, at their defaults
    assert {k: v for k, v in written["fine_tune"].items()
            if v is not None and v is not False and (k in STATE_0_1["fine_tune"] or v != defaults[k])} == \
        STATE_0_1["fine_tune"]
    assert {k: v for k, v in written.items() if k != "fine_tune"} == \
        {k: v for k, v in STATE_0_1.items() if k != "fine_tune"}
    assert run_state.RunState.from_json(written) == state


@pytest.mark.parametrize("field, value", [("fine_tune", {"epochs_run": "two"}), ("fine_tune", {"stopped": 1}),
                                          ("history", {"head": 3}), ("head_epochs", 1.5), ("fine_tune", [])])
def test_a_state_of_the_wrong_types_is_a_one_line_error(tmp_path, field, value):
    out = tmp_path / "m"
    partial = run_state.partial_dir(out)
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps(dict(STATE_0_1, **{field: value})))
    with pytest.raises(UsageError, match=r"^--resume: the interrupted run's state in .*state.json is unreadable "
                                         rf"\(.*{field}.*\); run without --resume to start over$"):
        run_state.load(out)
