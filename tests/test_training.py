"""The training recipe: feature cache, class weights, early stopping, fine-tuning, seeds, resume."""

import json
import shutil

import numpy as np
import pytest

import tlcli
from tests.helpers import make_colour_dataset, solid_image
from tlcli import data
from tlcli.errors import Interrupted
from tlcli.model import head


@pytest.fixture
def dataset(tmp_path):
    return make_colour_dataset(tmp_path / "images", per_class=6)


def test_second_run_extracts_nothing_and_a_changed_image_is_extracted_again(tmp_path, dataset, train_args):
    cache = tmp_path / "cache"
    first = tlcli.train(dataset, out=str(tmp_path / "a"), cache_dir=str(cache), **train_args)
    assert (first.extracted, first.cached) == (18, 0)
    # New head settings reuse the cache too.
    second = tlcli.train(dataset, out=str(tmp_path / "b"), cache_dir=str(cache), l2=0.01, **train_args)
    assert (second.extracted, second.cached) == (0, 18)
    solid_image((250, 250, 0), seed=99).save(dataset / "red" / "red_0.jpg")
    third = tlcli.train(dataset, out=str(tmp_path / "c"), cache_dir=str(cache), **train_args)
    assert (third.extracted, third.cached) == (1, 17)


def test_class_weights_are_balanced_inverse_frequencies():
    weights = data.class_weights([0] * 6 + [1] * 3 + [2] * 1, 3)
    assert weights == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    # Weighted counts are equal: every class contributes the same total to the loss.
    assert 6 * weights[0] == pytest.approx(3 * weights[1]) == pytest.approx(1 * weights[2])


def test_class_weights_reach_the_head_loss():
    rng = np.random.default_rng(0)
    # Two overlapping classes, 40 vs 4 samples: unweighted, the minority is mostly ignored.
    X = np.vstack([rng.normal(0, 1, (40, 5)), rng.normal(0.8, 1, (4, 5))])
    y = np.array([0] * 40 + [1] * 4)
    plain = head.fit_head(X, y, 2, epochs=200, l2=1e-3)
    weighted = head.fit_head(X, y, 2, epochs=200, l2=1e-3, class_weight=data.class_weights(list(y), 2))
    share = lambda fit: float(np.mean((X @ fit.kernel + fit.bias).argmax(1) == 1))  # noqa: E731
    assert share(weighted) > share(plain)


def test_head_early_stopping_picks_the_epoch_with_the_lowest_held_out_loss():
    rng = np.random.default_rng(1)
    X = rng.normal(0, 1, (60, 40))
    y = rng.integers(0, 2, 60)  # pure noise: held-out loss rises once the head starts to memorise
    fit = head.fit_head(X, y, 2, epochs=300, patience=15, l2=1e-4)
    val = [row["val_loss"] for row in fit.history if "val_loss" in row]
    assert fit.epochs == int(np.argmin(val)) + 1
    assert len(val) > fit.epochs, "training should have gone on past the best epoch, then stopped"
    assert len(val) < 300, "every fold should have stopped early, long before the epoch cap"
    train_rows = [row for row in fit.history if "loss" in row]
    assert len(train_rows) == fit.epochs  # the refit runs exactly the chosen number of epochs


def test_views_of_one_image_stay_in_one_cross_validation_fold():
    rng = np.random.default_rng(2)
    X = rng.normal(0, 1, (60, 40))
    y = rng.integers(0, 2, 60)  # pure noise, as above: the best held-out epoch is an early one
    views = np.vstack([X, X + rng.normal(0, 0.01, X.shape)])  # two near-identical views per image
    labels, groups = np.r_[y, y], np.r_[np.arange(60), np.arange(60)]
    leaky = head.fit_head(views, labels, 2, epochs=300, patience=15, l2=1e-4)
    grouped = head.fit_head(views, labels, 2, epochs=300, patience=15, l2=1e-4, groups=groups)
    # Scored on copies of their own training rows, leaky folds keep "improving" as the head
    # memorises; grouped folds see only unseen images and stop where the noise fit starts.
    assert leaky.epochs > 2 * grouped.epochs
    best = lambda fit: min(row["val_loss"] for row in fit.history if "val_loss" in row)  # noqa: E731
    assert best(leaky) < best(grouped)


def test_views_of_one_image_must_share_its_label():
    X = np.random.default_rng(3).normal(0, 1, (8, 4))
    with pytest.raises(ValueError, match="same label"):
        head.fit_head(X, [0, 1, 0, 1, 1, 1, 0, 1], 2, groups=[0, 1, 2, 3, 0, 1, 2, 3])


def test_epoch_callback_restores_the_best_weights(tmp_path):
    """Keras phases (fine-tuning) restore the weights of the epoch with the lowest val_loss."""
    import tf_keras

    from tlcli.config import TrainConfig
    from tlcli.training import finetuning
    from tlcli.training.run_state import RunState

    k = tf_keras
    k.utils.set_random_seed(0)
    model = k.Sequential([k.layers.InputLayer(input_shape=(4,)), k.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=k.optimizers.SGD(0.5), loss="categorical_crossentropy")
    x = np.eye(4, dtype=np.float32)
    y_train = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    y_val = 1 - y_train  # the better it fits train, the worse val gets (after the first steps)
    seen, saved, events = [], [], []

    class Record(k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((logs["val_loss"], [w.copy() for w in self.model.get_weights()]))

    state = RunState(TrainConfig())
    scalars = type("Scalars", (), {"write": lambda *a: None})()
    cb = finetuning.EpochCallback(model, state, phase="fine-tune", epochs=8, checkpoint_dir=tmp_path / "ckpt",
                                  patience=3, monitor=True, save_state=lambda: saved.append(state.fine_tune.epochs_run),
                                  progress=events.append, scalars=scalars)
    model.fit(x, y_train, validation_data=(x, y_val), epochs=8, verbose=0, callbacks=[Record(), cb],
              shuffle=False)
    cb.finish()
    best = min(range(len(seen)), key=lambda i: seen[i][0])
    assert best < len(seen) - 1, "val loss should have got worse after its best epoch"
    for got, want in zip(model.get_weights(), seen[best][1]):
        np.testing.assert_array_equal(got, want)
    assert state.fine_tune.best_epoch == best
    assert saved == list(range(1, len(seen) + 1)), "the state is saved after every epoch"
    assert [e.completed for e in events if e.kind == "epoch"] == saved
    assert [row["epoch"] for row in state.history["fine-tune"]] == saved


def _backbone_kernel(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    variables = loaded.variables if hasattr(loaded, "variables") else loaded.weights
    return next(v.numpy() for v in variables if tuple(v.shape) == (3, 3, 3, 8))


def test_fine_tune_changes_the_backbone_and_head_only_does_not(tmp_path, dataset, train_args, tiny_backbone):
    original = _backbone_kernel(tiny_backbone)
    tlcli.train(dataset, out=str(tmp_path / "head"), **train_args)
    np.testing.assert_array_equal(_backbone_kernel(tmp_path / "head"), original)
    # Without a holdout nothing can veto the fine-tuning: its weights are what gets saved.
    result = tlcli.train(dataset, out=str(tmp_path / "ft"), fine_tune=True, fine_tune_epochs=2, holdout=0.0,
                         fine_tune_learning_rate=0.05, **train_args)
    assert result.fine_tune_epochs == 2
    assert np.abs(_backbone_kernel(tmp_path / "ft") - original).max() > 1e-4
    assert set(result.history) == {"head", "fine-tune", "head refit"}
    # The head phase read the features cached by the head-only run; with changed weights every
    # image and its mirror image go through the adapted backbone again.
    assert result.mirror, "--fine-tune turns mirror averaging on by default"
    assert result.fine_tune_improved is True
    assert (result.extracted, result.cached) == (2 * 18, 18)


def test_fine_tune_that_only_hurts_the_holdout_is_undone(tmp_path, dataset, train_args, tiny_backbone,
                                                        monkeypatch):
    from tlcli.features.store import FeatureStore
    from tlcli.features.tta import CROP_KEY

    reads = []  # of the plain views' store (the crop views' test reads its own: features.tta)
    real_get = FeatureStore.get

    def get(self, digest):
        if CROP_KEY not in self.dir.name:
            reads.append(digest)
        return real_get(self, digest)

    monkeypatch.setattr(FeatureStore, "get", get)
    original = _backbone_kernel(tiny_backbone)
    result = tlcli.train(dataset, out=str(tmp_path / "ft"), fine_tune=True, fine_tune_epochs=2,
                         fine_tune_learning_rate=50.0, mirror=False, **train_args)  # a step size that wrecks the model
    history = result.history["fine-tune"]
    assert len(history) == 2
    np.testing.assert_array_equal(_backbone_kernel(tmp_path / "ft"), original)
    assert result.val_accuracy == 1.0
    # The backbone kept its starting weights, so the head refit keeps the features it has.
    assert (result.extracted, result.cached) == (18, 18)
    assert len(reads) == 18, "the cache is read by the head phase only, not again after fine-tuning"
    assert result.fine_tune_improved is False
    assert not result.mirror


def test_undone_fine_tune_extracts_only_the_mirror_views(tmp_path, dataset, train_args):
    result = tlcli.train(dataset, out=str(tmp_path / "ft"), fine_tune=True, fine_tune_epochs=1,
                         fine_tune_learning_rate=50.0, **train_args)
    assert result.mirror
    # 18 for the head, then after the undone fine-tuning: 18 cached + 18 mirror views extracted.
    assert (result.extracted, result.cached) == (36, 18)


def test_same_seed_gives_identical_split_and_metrics(tmp_path, dataset, train_args):
    runs = []
    for name in ("a", "b"):
        r = tlcli.train(dataset, out=str(tmp_path / name), seed=3, fine_tune=True, fine_tune_epochs=2,
                        cache_dir=str(tmp_path / f"cache-{name}"), **train_args)
        meta = json.loads((tmp_path / name / "tlcli.json").read_text())
        runs.append((json.loads((tmp_path / name / "splits.json").read_text()), meta["metrics"], r.history))
    (split_a, metrics_a, hist_a), (split_b, metrics_b, hist_b) = runs
    assert split_a == split_b
    assert metrics_a == metrics_b
    assert hist_a == hist_b
    other = tlcli.train(dataset, out=str(tmp_path / "c"), seed=4, **train_args)
    split_c = json.loads((tmp_path / "c" / "splits.json").read_text())
    assert split_c["val"] != split_a["val"]
    assert other.val_counts == {"blue": 1, "green": 1, "red": 1}  # stratified: 1 of 6 per class


def test_interrupted_run_keeps_the_old_bundle_and_resume_finishes_it(tmp_path, dataset, train_args,
                                                                    trained_bundle):
    out = tmp_path / "model"
    shutil.copytree(trained_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    epochs_seen = []

    def ctrl_c_at_second_epoch(event):
        if event.kind == "epoch" and event.task == "fine-tune":
            epochs_seen.append(event.completed)
            if event.completed == 2:
                raise KeyboardInterrupt

    options = dict(train_args, fine_tune=True, fine_tune_epochs=4, fine_tune_patience=10)
    with pytest.raises(Interrupted, match="--resume"):
        tlcli.train(dataset, out=str(out), force=True, progress=ctrl_c_at_second_epoch, **options)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model"))
    assert leftovers == [".model.partial"], leftovers  # no staging directory, only the resume state

    resumed_epochs = []
    result = tlcli.train(out=str(out), resume=True,
                         progress=lambda e: e.kind == "epoch" and e.task == "fine-tune"
                         and resumed_epochs.append(e.completed))
    assert resumed_epochs == [3, 4]  # continued after the checkpoint of epoch 2
    assert result.fine_tune_epochs == 4
    assert [row["epoch"] for row in result.history["fine-tune"]] == [1, 2, 3, 4]
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["config"]["fine_tune"] is True and meta["training"]["fine_tune_epochs"] == 4
    assert not (tmp_path / ".model.partial").exists()


def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    with pytest.raises(tlcli.TlcliError, match="no interrupted run"):
        tlcli.train(out=str(tmp_path / "model"), resume=True)


def test_a_file_unreadable_after_the_check_is_named_not_cached(tmp_path, dataset, train_args, monkeypatch):
    from tlcli.data import image_files, images

    victim = str(dataset / "green" / "green_1.png")
    real = images.load_for_model

    def flaky(path, size, **kw):  # passes the pre-pass check, then fails when extraction decodes it
        if str(path) == victim:
            raise images.ImageError(path, image_files.TRUNCATED)
        return real(path, size, **kw)

    monkeypatch.setattr(images, "load_for_model", flaky)
    cache = tmp_path / "cache"
    with pytest.raises(tlcli.TlcliError, match="green_1.png: became unreadable"):
        # TensorFlow's extraction decodes every file again (LiteRT's: see tests/test_extractor.py).
        tlcli.train(dataset, out=str(tmp_path / "m"), cache_dir=str(cache), extractor="tf", **train_args)
    assert not (tmp_path / "m").exists()
    monkeypatch.undo()
    again = tlcli.train(dataset, out=str(tmp_path / "m"), cache_dir=str(cache), **train_args)
    assert again.extracted >= 1  # the failed file was not cached as a grey image


def test_resume_with_a_damaged_state_file_is_a_clear_error(tmp_path):
    partial = tmp_path / ".model.partial"
    partial.mkdir()
    (partial / "state.json").write_text("{half")
    with pytest.raises(tlcli.TlcliError, match=r"--resume: .*state.json is unreadable.*without --resume"):
        tlcli.train(out=str(tmp_path / "model"), resume=True)


def test_micro_batches_make_the_same_update_as_the_whole_batch():
    import tf_keras as k

    from tlcli.training import finetuning

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]

    def make(micro_batch):
        k.utils.set_random_seed(0)
        inp = k.Input((5,))
        hidden = k.layers.Dense(4, activation="relu")(inp)
        out = k.layers.Dense(3, activation="softmax", kernel_regularizer=k.regularizers.l2(0.01))(hidden)
        m = finetuning.MicroBatchModel(inp, out, micro_batch=micro_batch) if micro_batch else k.Model(inp, out)
        m.compile(optimizer=k.optimizers.Adam(0.05), metrics=["accuracy"],
                  loss=k.losses.CategoricalCrossentropy(label_smoothing=0.1))
        return m

    runs = []
    for micro_batch in (None, 3):  # 3 does not divide 8: slices of 3, 3 and 2
        m = make(micro_batch)
        start = [w.copy() for w in m.get_weights()]
        hist = m.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, class_weight={0: 1.0, 1: 2.0, 2: 0.5})
        runs.append((start, m.get_weights(), hist.history))
    (start, whole, whole_hist), (_, sliced, sliced_hist) = runs
    assert max(np.abs(a - b).max() for a, b in zip(start, whole)) > 1e-2  # training moved the weights
    for a, b in zip(whole, sliced):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whole_hist["loss"], sliced_hist["loss"], rtol=1e-4)
    assert whole_hist["accuracy"] == sliced_hist["accuracy"]


def test_fine_tuning_in_micro_batches_ends_where_whole_batches_do(tmp_path, dataset, train_args, tiny_backbone,
                                                                  monkeypatch):
    from tlcli.training import finetuning

    sliced = []
    real_step = finetuning.MicroBatchModel.train_step
    monkeypatch.setattr(finetuning.MicroBatchModel, "train_step",
                        lambda self, data: sliced.append(self.micro_batch) or real_step(self, data))
    kernels = []
    for micro in (0, 3):  # 0 = whole batches of 8; 3 = slices of 3, 3 and 2
        out = tmp_path / f"ft{micro}"
        # No holdout (nothing vetoes the update) and no dropout (no randomness that depends on
        # how the batch is sliced): both runs must take the same steps.
        tlcli.train(dataset, out=str(out), fine_tune=True, fine_tune_epochs=2, holdout=0.0, dropout=0.0,
                    fine_tune_learning_rate=0.05, fine_tune_micro_batch=micro, mirror=False, **train_args)
        kernels.append(_backbone_kernel(out))
    moved = np.abs(kernels[0] - _backbone_kernel(tiny_backbone)).max()
    assert moved > 1e-4  # fine-tuning moved it
    # The same steps, up to float32 summation order (oneDNN's, which varies with the machine's
    # load: 6e-5 seen once under a parallel suite): within 1% of how far fine-tuning moved it.
    assert np.abs(kernels[0] - kernels[1]).max() <= 0.01 * moved
    assert sliced and set(sliced) == {3}, "the sliced run used the micro-batch model, the other did not"


def test_micro_batch_is_8_on_the_cpu_and_off_for_small_batches():
    from tlcli.config import TrainConfig
    from tlcli.training.finetuning import micro_batch_size

    def micro(accelerator=False, **kw):
        return micro_batch_size(TrainConfig(fine_tune=True, **kw), accelerator=accelerator)

    assert micro() == 8              # the default batch of 32, on the CPU
    assert micro(accelerator=True) is None  # a GPU or TPU takes whole batches
    assert micro(batch_size=8) is None  # a slice as large as the batch is the batch
    assert micro(fine_tune_micro_batch=0) is None
    assert micro(fine_tune_micro_batch=4) == 4
    assert micro_batch_size(TrainConfig(), accelerator=False) is None  # no fine-tuning, no slices


def test_an_interrupt_between_an_epochs_checkpoint_and_its_state_leaves_the_state_on_its_own_checkpoint(
        tmp_path, dataset, train_args, monkeypatch):
    """Epoch 2's checkpoint is written, then Ctrl-C comes before the state says so: the state still
    names epoch 1's checkpoint, and those files still hold epoch 1 (they were not overwritten)."""
    from pathlib import Path

    from tlcli.training import run_state

    out = tmp_path / "model"
    state_file = run_state.partial_dir(out) / run_state.STATE_FILE
    real_save, at_epoch_1 = run_state.RunState.save, {}

    def save_then_stop(self, partial):
        if self.fine_tune.epochs_run == 2:
            raise KeyboardInterrupt
        real_save(self, partial)

    def keep_epoch_1(event):
        if event.kind == "epoch" and event.task == "fine-tune" and event.completed == 1:
            named = Path(json.loads(state_file.read_text())["fine_tune"]["last_checkpoint"])
            at_epoch_1.update({f.name: f.read_bytes() for f in named.parent.glob(named.name + ".*")})

    monkeypatch.setattr(run_state.RunState, "save", save_then_stop)
    with pytest.raises(Interrupted, match="--resume"):
        tlcli.train(dataset, out=str(out), progress=keep_epoch_1, fine_tune=True, fine_tune_epochs=3,
                    fine_tune_patience=10, mirror=False, **train_args)
    st = json.loads(state_file.read_text())["fine_tune"]
    assert st["epochs_run"] == 1 and at_epoch_1
    named = Path(st["last_checkpoint"])
    assert {f.name: f.read_bytes() for f in named.parent.glob(named.name + ".*")} == at_epoch_1
