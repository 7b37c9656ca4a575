"""--time-budget's fine-tuning resolution (FixRes): the size that matches the random resized
crops' zoom, the steps down when the epochs do not fit, never above the backbone's size, a
backbone of fixed size kept at it; and a budgeted run that trains smaller than it predicts."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

import tlcli
from tests.helpers import make_tiny_backbone, run_cli
from tlcli.data import augment
from tlcli.training import plan as budget

COUNTS = dict(n_fit=200, n_holdout=36, n_all=400, views=2)


def candidate(native=224, *, resizable=True, train_rate=4.0):
    measured = budget.training_sizes(native, resizable=resizable)[0]
    return budget.Candidate("m", native, extract_rate=20.0, train_rate=train_rate, extracted=True,
                            train_size=measured, resizable=resizable)


@pytest.mark.parametrize("area", [None, (0.08, 1.0), (0.5, 0.9)])
def test_the_crops_zoom_is_the_mean_enlargement_of_the_boxes_tensorflow_draws(monkeypatch, area):
    from tlcli._tf import tf

    t = tf()
    if area:
        monkeypatch.setattr(augment, "CROP_AREA", area)
    seeds = t.stack([t.range(3000, dtype=t.int64), t.fill([3000], t.constant(11, t.int64))], axis=1)
    box = lambda seed: augment.crop_box([224, 224, 3], seed)[1]  # noqa: E731
    sizes = t.function(lambda s: t.map_fn(box, s, fn_output_signature=t.int32))(seeds)
    shares = sizes.numpy()[:, :2].prod(axis=1) / 224**2
    assert budget.crop_zoom() == pytest.approx(np.mean(1 / np.sqrt(shares)), rel=0.01)
    assert budget.crop_zoom((0.5, 0.5), (1.0, 1.0)) == pytest.approx(np.sqrt(2))


@pytest.mark.parametrize("native", [224, 256, 299, 384, 512])
def test_training_matches_the_crops_zoom_on_the_stride_grid(native):
    sizes = budget.training_sizes(native, resizable=True)
    top = sizes[0]
    assert top % budget.RESOLUTION_STEP == 0 and top < native
    assert abs(top - native / budget.crop_zoom()) <= budget.RESOLUTION_STEP / 2
    assert all(a - b == budget.RESOLUTION_STEP for a, b in zip(sizes, sizes[1:]))
    assert min(sizes) >= max(budget.MIN_RESOLUTION, native / 2) > min(sizes) - budget.RESOLUTION_STEP


def test_without_crops_training_stays_at_the_features_size_and_never_goes_above(monkeypatch):
    monkeypatch.setattr(augment, "CROP_AREA", (1.0, 1.0))  # no zoom: nothing to match
    assert budget.training_sizes(224, resizable=True)[0] == 224
    monkeypatch.setattr(augment, "CROP_AREA", (0.1, 0.1))  # a 3.2x zoom: held at the floor
    assert budget.training_sizes(224, resizable=True) == [128]
    for native in (32, 64, 100, 120, 160, 250):
        assert max(budget.training_sizes(native, resizable=True)) <= native
    assert budget.training_sizes(32, resizable=True) == [32]  # too small to go lower


def test_rates_at_other_sizes_err_on_the_slow_side():
    # Smaller: faster by the side (fixed per-step costs stay), not by the pixels; larger: slower by the pixels.
    assert budget.scaled_rate(10.0, 224, 112) == pytest.approx(20.0)
    assert budget.scaled_rate(20.0, 112, 224) == pytest.approx(5.0)
    assert budget.scaled_rate(10.0, 160, 160) == 10.0


def test_the_plan_fine_tunes_at_the_matched_size_with_features_at_the_native_one():
    plan = budget.make_plan(600, 30, [candidate()], **COUNTS)
    matched = budget.training_sizes(224, resizable=True)[0]
    assert plan.fine_tune and plan.image_size == matched < 224 and plan.feature_size == 224
    assert f"at {matched} px (features at 224 px)" in plan.describe()
    assert f"{budget.crop_zoom():.2f}x" in plan.reason
    assert plan.to_dict()["rates"]["m"] == {"extract": 20.0, "train": 4.0, "train_size": matched}
    # The holdout checks and the features afterwards cost native pixels.
    forward = budget.FORWARD_PER_TRAIN * 4.0 * (matched / 224) ** 2
    per_epoch = budget.epoch_seconds(n_fit=200, n_holdout=36, train_rate=4.0, forward_rate=forward)
    after = budget.finish_seconds(n_all=400, n_holdout=36, views=2, forward_rate=forward, epochs=plan.epochs)
    assert plan.estimated_s == pytest.approx(30 + plan.epochs * per_epoch + after)


def test_the_plan_steps_down_only_as_far_as_the_epochs_need():
    first = candidate(384)
    sizes = budget.training_sizes(384, resizable=True)
    assert len(sizes) > 2
    plans = [budget.make_plan(b, 30, [first], **COUNTS) for b in range(150, 800, 10)]
    forward = budget.FORWARD_PER_TRAIN * 4.0 * (sizes[0] / 384) ** 2
    tuned = [p for p in plans if p.fine_tune]
    chosen = [p.image_size for p in tuned]
    assert chosen == sorted(chosen) and set(chosen) == set(sizes), "every size in turn as the budget grows"
    for p in tuned:
        assert p.estimated_s <= p.budget_s and p.epochs >= budget.MIN_EPOCHS
        higher = [s for s in sizes if s > p.image_size]
        if higher:  # the next size up would not have fit MIN_EPOCHS (at the rate the plan scales to it)
            assert f"at {sizes[0]} px do not fit" in p.reason
            rate = budget.scaled_rate(4.0, sizes[0], higher[-1])
            per_epoch = budget.epoch_seconds(n_fit=200, n_holdout=36, train_rate=rate, forward_rate=forward)
            after = budget.finish_seconds(n_all=400, n_holdout=36, views=2, forward_rate=forward,
                                          epochs=budget.MIN_EPOCHS)
            assert 30 + budget.MIN_EPOCHS * per_epoch + after > p.budget_s
    assert not plans[0].fine_tune and plans[0].image_size == 384


def test_without_augmentation_the_plan_fine_tunes_at_the_features_size_and_says_why():
    # No random crops, no zoom to cancel: a lower size would show objects smaller than the features do.
    plan = budget.make_plan(600, 30, [dataclasses.replace(candidate(), augment=False)], **COUNTS)
    assert plan.fine_tune and plan.image_size == plan.feature_size == 224
    assert "no crops to match (--no-augment)" in plan.reason and "takes only" not in plan.reason


def test_the_crop_views_time_check_scales_the_training_rate_to_the_features_size():
    plan = budget.make_plan(600, 30, [candidate()], **COUNTS).to_dict()
    matched = plan["image_size"]
    deadline = budget.Deadline(600, started=time.monotonic() - 30)
    forward = budget.FORWARD_PER_TRAIN * 4.0 * (matched / 224) ** 2  # slower at 224 px than at the training size
    need = 800 * (1 + budget.MARGIN) / min(20.0, forward) + budget.FIXED_RESERVE_S
    assert need < 570 and budget.no_time_for(800, plan, deadline) is None
    assert budget.no_time_for(800, plan, budget.Deadline(600, started=time.monotonic() - 600 + need - 5)) \
        .startswith("needs about")
    assert budget.no_time_for(10**6, plan, budget.Deadline(None)) is None  # no budget: always


def test_a_backbone_of_fixed_size_fine_tunes_at_it_and_says_why():
    plan = budget.make_plan(600, 30, [candidate(resizable=False)], **COUNTS)
    assert plan.fine_tune and plan.image_size == plan.feature_size == 224
    assert "takes only 224 px" in plan.reason and "features at" not in plan.describe()
    small = budget.make_plan(600, 30, [candidate(32, resizable=False)], **COUNTS)
    assert small.image_size == 32 and "takes only" not in small.reason  # nothing to say: no lower size


def test_the_loaded_backbone_says_whether_it_takes_any_size(tmp_path, tiny_backbone):
    from tlcli.model import backbone

    fixed = make_tiny_backbone(tmp_path / "fixed", size=32)
    assert backbone.load(backbone.resolve_spec(str(tiny_backbone), 32)).any_size
    loaded = backbone.load(backbone.resolve_spec(str(fixed)))
    assert loaded.image_size == 32 and not loaded.any_size


def test_a_budgeted_run_trains_below_the_features_size_and_predicts_at_it(tmp_path, colour_data, tiny_backbone,
                                                                          monkeypatch):
    from tlcli import data

    made, dataset = [], data.image_dataset

    def recording(paths, size, **kw):  # the real pipeline, its batches' sizes noted (and what it decodes at)
        ds = dataset(paths, size, **kw)
        spec = ds.element_spec[0] if isinstance(ds.element_spec, tuple) else ds.element_spec
        made.append((spec.shape[1], kw.get("augment") is not None, kw.get("labels") is not None, size))
        return ds

    monkeypatch.setattr(data, "image_dataset", recording)
    out = tmp_path / "model"
    result = run_cli("train", colour_data, "--backbone", tiny_backbone, "--image-size", 128, "--epochs", 60,
                     "--batch-size", 8, "--tensorboard", "none", "--time-budget", "10m", "--fine-tune-epochs", 3,
                     "--out", out, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["fine_tune"] and plan["image_size"] == 96 and plan["feature_size"] == 128
    assert plan["rates"][str(tiny_backbone)]["train_size"] == 96
    assert {size for size, augmented, _, _ in made if augmented} == {96}, "trained (and timed) at 96 px"
    # ... cropped from images decoded at 128 px, which keeps their detail (FixRes)
    assert {decoded for _, augmented, _, decoded in made if augmented} == {128}
    assert {size for size, augmented, labelled, _ in made if labelled and not augmented} == {128}, "holdout"
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["plan"] == plan and meta["image_size"] == 128
    predictions = tlcli.predict([colour_data / c / f"{c}_0.jpg" for c in ("blue", "green", "red")], model_dir=out,
                                engine="tf")
    assert [p.predictions[0]["label"] for p in predictions] == ["blue", "green", "red"]
