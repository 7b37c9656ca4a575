"""Issue #26: with --time-budget, the --backbone A,B choice extracts only the candidates whose
measured extraction fits the choice's share of the budget (``plan.extraction_plan``)."""

from __future__ import annotations

import json
import time

import pytest

import tlcli
from tests.helpers import make_tiny_backbone, run_cli
from tlcli.training import plan as budget

N_TRAIN, N_REST = 400, 100


def rated(name, rate, cached=0):
    return budget.Candidate(name, 224, extract_rate=rate, cached=cached)


def cost(images, rate):
    return images / rate * (1 + budget.MARGIN)


def test_the_first_candidate_is_always_extracted_even_over_the_budget():
    plan = budget.extraction_plan(60, 50, [rated("slow", 0.1), rated("quick", 1000.0)], n_train=N_TRAIN,
                                  n_rest=N_REST)
    assert plan.backbones == ["slow"] and plan.share_s == pytest.approx(budget.CHOICE_SHARE * 10)
    assert len(plan.notes) == 1 and plan.notes[0].startswith("quick left out: its 400 images would take ")


def test_cached_features_cost_nothing():
    share = budget.CHOICE_SHARE * 600
    slow = N_TRAIN * (1 + budget.MARGIN) / share  # the rate at which b's training images take the whole share
    uncached = budget.extraction_plan(600, 0, [rated("a", 1000.0), rated("b", slow)], n_train=N_TRAIN, n_rest=0)
    assert uncached.backbones == ["a"]
    # With its training features in the store, only the winner's other images would cost anything.
    cached = budget.extraction_plan(600, 0, [rated("a", 1000.0), rated("b", slow, cached=N_TRAIN)],
                                    n_train=N_TRAIN, n_rest=0)
    assert cached.backbones == ["a", "b"] and not cached.notes
    assert cached.estimated_s == pytest.approx(cost(N_TRAIN, 1000.0))
    half = budget.extraction_plan(600, 0, [rated("a", 1000.0), rated("b", slow, cached=N_TRAIN // 2)],
                                  n_train=N_TRAIN, n_rest=0)
    assert half.estimated_s == pytest.approx(cost(N_TRAIN, 1000.0) + share / 2)


def test_order_is_kept_and_the_share_is_respected_with_the_winners_other_images():
    # At 600 s left the choice may spend 300 s: a (46 s) and c (46 s) with the winner's other
    # images (11.5 s) fit, b (460 s) does not, nor d (184 s) with its other images (46 s).
    candidates = [rated("a", 10.0), rated("b", 1.0), rated("c", 10.0), rated("d", 2.5)]
    plan = budget.extraction_plan(620, 20, candidates, n_train=N_TRAIN, n_rest=N_REST)
    assert plan.backbones == ["a", "c"] and plan.share_s == pytest.approx(300)
    assert [n.split(" ")[0] for n in plan.notes] == ["b", "d"]
    assert plan.estimated_s == pytest.approx(2 * cost(N_TRAIN, 10.0) + cost(N_REST, 10.0)) and plan.estimated_s <= 300
    assert 2 * cost(N_TRAIN, 10.0) + cost(N_TRAIN, 2.5) <= 300 < 2 * cost(N_TRAIN, 10.0) + cost(N_TRAIN + N_REST, 2.5)
    assert plan.rates == {"a": {"extract": 10.0}, "b": {"extract": 1.0}, "c": {"extract": 10.0},
                          "d": {"extract": 2.5}}
    line = plan.describe()
    assert line == "choice plan for 10m20s: extract a, c; leave out 2 (about 1m44s of 5m)"
    long = budget.extraction_plan(620, 20, [rated("x" * 40, 10.0), rated("y" * 40, 10.0), rated("z", 0.01)],
                                  n_train=N_TRAIN, n_rest=N_REST)
    assert long.describe() == "choice plan for 10m20s: extract 2 of 3 candidates (about 1m44s of 5m)"
    # What timing the candidates spent of the share is gone: only what is left of it is planned.
    spent = budget.extraction_plan(620, 120, candidates, n_train=N_TRAIN, n_rest=N_REST, share_s=80)
    assert spent.share_s == 80 and spent.backbones == ["a"] and spent.estimated_s <= 80  # a, c: 103.5 s


@pytest.fixture(scope="session")
def slow_backbone(tmp_path_factory):
    return make_tiny_backbone(tmp_path_factory.mktemp("slow") / "slow", features=5)


def test_a_budget_leaves_out_a_candidate_too_slow_to_extract_and_says_so(tmp_path, monkeypatch, colour_data,
                                                                          tiny_backbone, slow_backbone):
    from tlcli import features
    from tlcli.model.backbone import cache_key, resolve_spec
    from tlcli.training import choice

    timed = choice._ms_per_image

    def slow_on_five(engine, samples, size, max_pixels):  # "slow" (3 + 5 features): 1 image a minute
        return 60_000.0 if engine.output_shape[-1] == 8 else timed(engine, samples, size, max_pixels)

    monkeypatch.setattr(choice, "_ms_per_image", slow_on_five)
    common = [colour_data, "--backbone", f"{tiny_backbone},{slow_backbone}", "--image-size", 32, "--epochs", 60,
              "--batch-size", 8, "--tensorboard", "none", "--extractor", "tf", "--json"]
    r = run_cli("train", *common, "--out", tmp_path / "m", "--time-budget", "20s")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    said = [line for line in r.stderr.splitlines() if line.startswith("choice plan for 20s: extract tiny; leave out 1")]
    assert len(said) == 1 and len(said[0]) <= 80
    picked = result["backbone_choice"]
    assert [c["name"] for c in picked["candidates"]] == ["tiny"] and picked["winner"] == "tiny"
    assert any(n.startswith(f"slow left out: its {sum(result['train_counts'].values())} images would take ")
               for n in picked["notes"])
    assert result["plan"]["backbones"] == ["tiny"] and result["plan"]["rates"]["slow"] == {"extract": 0.02}
    meta = json.loads((tmp_path / "m" / "tlcli.json").read_text())
    assert meta["backbone_choice"] == picked and meta["plan"] == result["plan"]
    store = features.model_store(None, features.view_key(cache_key(resolve_spec(str(slow_backbone), 32), 32), "tf"))
    assert not store.dir.exists() or not any(store.dir.iterdir()), "nothing of the slow one was extracted"
    # Without a budget both are extracted, as before, whatever their rates.
    r = run_cli("train", *common, "--out", tmp_path / "n")
    assert r.exit_code == 0, r.output
    picked = json.loads(r.stdout)["backbone_choice"]
    assert {"tiny", "slow"} <= {c["name"] for c in picked["candidates"]} and any(store.dir.iterdir())


def test_a_budget_keeps_a_signature_candidate_whose_win_plans_head_only(tmp_path, colour_data, tiny_backbone):
    from tests.helpers import make_keras3_backbone

    exported = make_keras3_backbone(tmp_path / "export")  # frozen only: it runs through its signature
    result = tlcli.train(colour_data, out=str(tmp_path / "m"), backbone=f"{exported},{tiny_backbone}", image_size=32,
                         epochs=60, batch_size=8, tensorboard=None, time_budget="20s")
    picked = result.backbone_choice
    assert {c["name"] for c in picked["candidates"]} == {"export", "tiny"}
    assert not any("signature" in n for n in picked["notes"])
    assert result.plan["backbones"][0] == picked["winner"] and set(result.plan["backbones"]) == {"export", "tiny"}
    assert result.plan["fine_tune"] is False and result.val_accuracy == 1.0


def test_once_timing_has_spent_the_choices_half_the_next_candidates_are_not_even_loaded(
        monkeypatch, colour_data, tiny_backbone, slow_backbone):
    from tlcli.config import TrainConfig
    from tlcli.training import choice

    cfg = TrainConfig(data_dir=str(colour_data), backbone=f"{tiny_backbone},{slow_backbone}", image_size=32,
                      epochs=60, batch_size=8, extractor="tf", time_budget="10s")
    measure, loaded = choice._measured, []

    def counted(cfg, spec, *args):
        loaded.append(spec.handle)
        return measure(cfg, spec, *args)

    monkeypatch.setattr(choice, "_measured", counted)
    spent = budget.Deadline(10.0, started=time.monotonic() - 10.0)  # the budget is spent: the first still runs
    _, picked, _ = choice.choose(cfg, choice.candidate_specs(cfg), deadline=spent)
    assert len(loaded) == 1 and loaded[0].endswith("tiny")
    assert picked.winner == "tiny" and [s.name for s in picked.standings] == ["tiny"]
    assert picked.notes == ["slow left out: not timed, the choice's half of the budget went on timing the others"]
