"""--time-budget and the fine-tuning recipe: durations, the plan as a pure function of measured
rates, a budgeted run that stops in time with a valid bundle, augmentation, the learning-rate
schedule and the discriminative rates, and weight averaging that never loses to its start."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tlcli
from tests.helpers import run_cli
from tlcli.config import TrainConfig, parse_duration, validate
from tlcli.errors import UsageError
from tlcli.model import classifier as tuning
from tlcli.training import plan as budget

# ---- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("2.5m", 150), ("45", 45),
                                           (" 15M ", 900), (30, 30), (7.5, 7.5)])
def test_durations_in_seconds_minutes_and_hours(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10x", "", "m", "-5m", "+5m", "0s", "nan", "infs", "1e9h", "ten minutes", True])
def test_a_bad_duration_is_refused_naming_the_option(text):
    with pytest.raises(UsageError, match=r"^--time-budget ") as err:
        validate(TrainConfig(data_dir="x", time_budget=text))
    assert "\n" not in str(err.value)


def test_a_bad_duration_on_the_command_line_is_one_line(tmp_path):
    result = run_cli("train", str(tmp_path), "--time-budget", "10 minutes", "--out", str(tmp_path / "m"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--time-budget 10 minutes" in lines[0] and "10m" in lines[0]


# ---- the plan ---------------------------------------------------------------------------------

COUNTS = dict(n_fit=200, n_holdout=36, n_all=400, views=2)


def plan_for(budget_s, elapsed_s=30.0, train_rate=4.0, extract_rate=20.0, **kw):
    first = budget.Candidate("mobilenet", 224, extract_rate=extract_rate, train_rate=train_rate, extracted=True)
    return budget.make_plan(budget_s, elapsed_s, [first], **{**COUNTS, **kw})


@pytest.mark.parametrize("budget_s", [120, 300, 600, 900, 1800, 3600])
@pytest.mark.parametrize("train_rate", [1.5, 4.0, 12.0, 60.0])
def test_the_planned_run_fits_its_budget(budget_s, train_rate):
    plan = plan_for(budget_s, train_rate=train_rate)
    assert plan.estimated_s <= budget_s
    if plan.fine_tune:
        assert budget.MIN_EPOCHS <= plan.epochs <= budget.MAX_EPOCHS
        # Rebuilt from the cost model: the epochs plus what follows them fit what was left.
        per_epoch = budget.epoch_seconds(n_fit=200, n_holdout=36, train_rate=train_rate)
        after = budget.finish_seconds(n_all=400, n_holdout=36, views=2, epochs=plan.epochs,
                                      forward_rate=budget.FORWARD_PER_TRAIN * train_rate)
        assert 30.0 + plan.epochs * per_epoch + after <= budget_s
        # ... and one more epoch would not have (unless the cap stopped it).
        assert plan.epochs == budget.MAX_EPOCHS or 30.0 + (plan.epochs + 1) * per_epoch + after > budget_s


def test_more_time_or_a_faster_machine_never_plans_fewer_epochs():
    epochs = [plan_for(b).epochs for b in (60, 200, 400, 800, 1600)]
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] == budget.MAX_EPOCHS
    faster = [plan_for(600, train_rate=r).epochs for r in (1.0, 2.0, 4.0, 8.0)]
    assert faster == sorted(faster)


def test_no_fine_tuning_when_two_epochs_do_not_fit_or_the_rate_is_unknown():
    short = plan_for(150, train_rate=1.0)
    assert not short.fine_tune and short.epochs == 0 and "do not fit, even at" in short.reason
    unknown = plan_for(3600, train_rate=None)
    assert not unknown.fine_tune and "no rate" in unknown.reason
    assert plan_for(3600, max_epochs=3).epochs == 3  # --fine-tune-epochs caps the plan


def test_the_plan_extracts_further_candidates_only_while_they_fit():
    first = budget.Candidate("a", 224, extract_rate=20.0, train_rate=4.0, extracted=True)
    slow = budget.Candidate("b", 384, extract_rate=0.5, train_rate=1.0)
    quick = budget.Candidate("c", 224, extract_rate=8.0, train_rate=8.0)
    plan = budget.make_plan(600, 10, [first, slow, quick], **COUNTS)
    assert plan.backbones == ["a", "c"]  # b's 400 images at 0.5/s would take the whole budget
    lone = budget.make_plan(600, 10, [first], **COUNTS)
    assert plan.epochs < lone.epochs  # c's extraction (57 s) took time from fine-tuning
    assert plan.estimated_s <= 600
    assert plan.to_dict()["rates"]["a"] == {"extract": 20.0, "train": 4.0}
    assert "fine-tune" in plan.describe() and "10m" in plan.describe()


def test_durations_print_compactly():
    assert [budget.format_duration(s) for s in (0, 42.4, 90, 600, 3600, 3725)] == ["0s", "42s", "1m30s", "10m", "1h",
                                                                                  "1h2m5s"]


# ---- a budgeted run -----------------------------------------------------------------------------


def test_a_budgeted_run_plans_fine_tuning_and_records_the_plan(tmp_path, colour_data, train_args):
    out = tmp_path / "model"
    events = []
    result = tlcli.train(colour_data, out=str(out), time_budget="10m", extractor="tf", progress=events.append,
                         **train_args)
    plan = result.plan
    assert plan["fine_tune"] and plan["budget_s"] == 600.0 and plan["epochs"] == budget.MAX_EPOCHS
    said = [e.message for e in events if e.kind == "info" and e.message.startswith("plan for 10m: fine-tune 15 ")]
    assert len(said) == 1
    assert 1 <= result.fine_tune_epochs <= budget.MAX_EPOCHS and result.seconds < plan["estimated_s"]
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["time_budget"] == 600.0 and meta["plan"] == plan
    assert meta["config"]["time_budget"] == "10m"
    # Time was left for test-time augmentation's crop views: tried, and recorded whatever it decided.
    assert meta["test_time_augmentation"] == result.test_time_augmentation
    assert result.test_time_augmentation["without"] is not None
    predictions = tlcli.predict([colour_data / "red" / "red_0.jpg"], model_dir=out, engine="tf")
    assert predictions[0].predictions[0]["label"] == "red"


def test_fine_tuning_stops_at_the_deadline_with_its_best_weights(tmp_path):
    import tf_keras as k

    from tlcli._tf import tf
    from tlcli.training import finetuning
    from tlcli.training.run_state import RunState

    k.utils.set_random_seed(0)
    model = k.Sequential([k.layers.InputLayer(input_shape=(16,)), k.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=k.optimizers.SGD(0.5), loss="categorical_crossentropy", metrics=["accuracy"])
    x = np.eye(16, dtype=np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(16) % 2]
    val = tf().data.Dataset.from_tensor_slices((x, y)).batch(8)
    state = RunState(TrainConfig())
    deadline = budget.Deadline(4.0)
    cb = finetuning.EpochCallback(model, state, phase="fine-tune", epochs=100_000, checkpoint_dir=tmp_path / "ckpt",
                                  patience=None, monitor=True, save_state=lambda: None, progress=lambda e: None,
                                  scalars=type("Scalars", (), {"write": lambda *a: None})())
    stop = finetuning.DeadlineStop(deadline, 1.5)
    soup = finetuning.Averaging(state, val, keep_going=lambda: True, progress=lambda e: None)
    cb.restore(val)
    start_loss = state.fine_tune.best
    model.fit(x, y, validation_data=val, epochs=100_000, verbose=0, callbacks=[cb, stop, soup], shuffle=False)
    cb.finish()
    # It stops when the next epoch would eat into the reserve; the reserve absorbs the last one.
    assert 1 <= state.fine_tune.epochs_run < 100_000
    assert 1.0 <= deadline.elapsed() <= 4.0, "ends at the deadline, not long before or after"
    best_epoch = model.evaluate(val, verbose=0)[0]
    soup.finish()
    final = model.evaluate(val, verbose=0)[0]
    assert final <= best_epoch <= start_loss and final == pytest.approx(state.fine_tune.best, rel=1e-5)
    assert state.fine_tune.soup >= 1


def test_a_budget_too_short_to_fine_tune_gives_the_head_only_model(tmp_path, colour_data, train_args):
    result = tlcli.train(colour_data, out=str(tmp_path / "m"), time_budget="1s", **train_args)
    assert result.plan and not result.plan["fine_tune"] and result.fine_tune_epochs == 0
    assert result.history.keys() == {"head", "head refit"}, "no fine-tuning step was even timed"
    assert result.val_accuracy == 1.0 and (tmp_path / "m" / "tlcli.json").exists()
    tta = result.test_time_augmentation  # nor the crop views: no time left for them
    assert not tta["kept"] and tta["extracted"] == tta["cached"] == 0
    assert tta["summary"].startswith("crop not tried: needs about ") and tta["summary"].endswith(" left")


def test_a_budget_with_a_backbone_that_cannot_be_trained_plans_head_only(tmp_path, colour_data):
    from tests.helpers import make_keras3_backbone

    exported = make_keras3_backbone(tmp_path / "keras3")
    result = tlcli.train(colour_data, out=str(tmp_path / "m"), backbone=str(exported), image_size=32, epochs=60,
                         batch_size=8, tensorboard=None, time_budget="10m")
    assert not result.plan["fine_tune"] and "signature" in result.plan["reason"]
    assert result.fine_tune_epochs == 0 and result.val_accuracy == 1.0


# ---- augmentation ------------------------------------------------------------------------------


def _halves(size=32):
    """Left half red, right half blue: mirroring swaps them."""
    img = np.zeros((size, size, 3), np.float32)
    img[:, : size // 2, 0] = 0.9
    img[:, size // 2:, 2] = 0.9
    return img


def test_augmentation_keeps_shape_and_range_and_varies_with_the_seed():
    from tlcli import data
    from tlcli._tf import tf

    t = tf()
    aug = t.function(data.augmenter(mirror=True))
    img = t.constant(np.random.default_rng(0).random((32, 32, 3), dtype=np.float32))
    outs = [aug(img, t.constant([i, 1], t.int64)).numpy() for i in range(12)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.float32 for o in outs)
    assert min(o.min() for o in outs) >= 0.0 and max(o.max() for o in outs) <= 1.0
    assert np.array_equal(outs[0], aug(img, t.constant([0, 1], t.int64)).numpy()), "same seed, same image"
    assert len({o.tobytes() for o in outs}) == len(outs)


@pytest.mark.parametrize("mirror", [False, True])
def test_augmentation_flips_only_where_mirroring_keeps_the_class(mirror):
    from tlcli import data
    from tlcli._tf import tf

    t = tf()
    aug = t.function(data.augmenter(mirror=mirror, trivial=False))
    img = t.constant(_halves())
    flipped = 0
    for i in range(24):
        out = aug(img, t.constant([i, 5], t.int64)).numpy()
        redness = out[..., 0] - out[..., 2]
        flipped += redness[:, :16].mean() < redness[:, 16:].mean()
    assert (flipped > 0) == mirror


def test_the_pipeline_augments_each_image_before_batching(tmp_path, colour_data):
    from tlcli import data

    paths = sorted(str(p) for p in (colour_data / "red").iterdir())[:4]
    plain = next(iter(data.image_dataset(paths, 32, batch_size=4))).numpy()
    ds = data.image_dataset(paths, 32, batch_size=4, augment=data.augmenter(mirror=True), augment_seed=3)
    first, second = (next(iter(ds)).numpy() for _ in range(2))
    assert first.shape == plain.shape == (4, 32, 32, 3)
    assert not np.allclose(first, plain) and not np.allclose(first, second), "new augmentation every epoch"


# ---- learning rates ----------------------------------------------------------------------------


def test_warm_up_then_cosine_down_to_zero():

    schedule = tuning.warmup_cosine(1e-3, 100)  # 10 warm-up steps
    lr = np.array([float(schedule(s)) for s in range(100)])
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert np.all(np.diff(lr[:10]) > 0) and np.all(np.diff(lr[9:]) < 0)
    assert lr[54] == pytest.approx(0.5e-3, rel=0.05) and 0 < lr[99] < 1e-5
    schedule.set_total(20)  # a budget's plan shortens it after tracing
    assert float(schedule(1)) == pytest.approx(1e-3) and float(schedule(19)) < 1e-4


def test_early_layers_learn_slower():
    from tlcli._tf import tf

    assert tuning.layer_scales(list(range(8))) == [0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert tuning.layer_scales([1, 2]) == [0.5, 1.0]
    t = tf()
    early, late, head = (t.Variable(np.zeros(3, np.float32)) for _ in range(3))
    opt = tuning.build_optimizer(1e-2, [early, late])
    opt.apply_gradients([(t.ones(3), v) for v in (early, late, head)])
    steps = [float(-v.numpy()[0]) for v in (early, late, head)]
    assert steps[2] == pytest.approx(1e-2, rel=1e-3)
    assert steps[1] == pytest.approx(1e-2, rel=1e-3) and steps[0] == pytest.approx(0.5e-2, rel=1e-3)


# ---- weight averaging ----------------------------------------------------------------------------


def test_the_soup_is_never_worse_than_its_best_ingredient_and_keeps_what_helps():
    target = np.array([1.0, -2.0, 0.5])
    loss = lambda w: float(np.sum((w[0] - target) ** 2))  # noqa: E731
    rng = np.random.default_rng(0)
    start = [np.zeros(3)]  # the head-only model, a candidate like any epoch
    epochs = [[target + rng.normal(0, 0.5, 3)] for _ in range(4)]
    ingredients = []
    for w in [start, *epochs]:
        tuning.keep_best(ingredients, loss(w), w, limit=4)
    assert len(ingredients) == 4 and [i[0] for i in ingredients] == sorted(i[0] for i in ingredients)
    weights, soup_loss, members = tuning.greedy_soup(ingredients, loss)
    assert soup_loss == pytest.approx(loss(weights))
    assert soup_loss <= min(i[0] for i in ingredients)
    assert len(members) > 1, "averaging noisy solutions around the optimum helps"
    # Where every average is worse, the best single ingredient is kept as it was.
    far = [(0.0, [target]), (5.0, [target + 3.0])]
    weights, soup_loss, members = tuning.greedy_soup(far, loss)
    assert members == [0] and np.array_equal(weights[0], target)
    tuning.keep_best(ingredients, float("nan"), start)
    assert len(ingredients) == 4 and all(np.isfinite(i[0]) for i in ingredients)


def test_fine_tuning_is_kept_only_when_the_holdout_improves_beyond_chance():
    rng = np.random.default_rng(1)
    before = rng.uniform(0.2, 0.8, 40)
    assert tuning.significantly_better(before, before - 0.05)  # every image better
    assert not tuning.significantly_better(before, before)
    assert not tuning.significantly_better(before, before + 0.01)
    # A better mean made of noise: half the images much better, half much worse.
    noisy = before + np.where(np.arange(40) % 2, 0.3, -0.32)
    assert noisy.mean() < before.mean() and not tuning.significantly_better(before, noisy)
    assert not tuning.significantly_better([0.5], [0.1]), "one image proves nothing"


def test_a_rerun_whose_features_all_come_from_the_cache_still_times_fine_tuning():
    from types import SimpleNamespace

    from tlcli.config import TrainConfig

    splits = SimpleNamespace(fit=list(range(340)), holdout=list(range(60)), train=list(range(400)), val=[], test=[])
    events = []
    planner = budget.Planner(TrainConfig(), splits, budget.Deadline(120), name="m", image_size=224, views=2,
                             extract_rate=None, progress=events.append)
    assert planner.worth_measuring()  # nothing left to extract for the head-only model
    slow = budget.Planner(TrainConfig(), splits, budget.Deadline(120), name="m", image_size=224, views=2,
                          extract_rate=1.0, progress=events.append)
    assert not slow.worth_measuring() and "no time left to time fine-tuning" in events[-1].message
    assert slow.plan.rates["m"]["extract"] == 1.0  # a measured rate is recorded
    planner(0.0, why="no rate")  # no rate measured at all: none recorded
    assert "extract" not in planner.plan.rates["m"] and budget.no_time_for(100, planner.plan.to_dict(),
                                                                          budget.Deadline(120)) is not None
