"""The likely-mislabel finder (tlcli.insight.label_noise) on synthetic out-of-fold probabilities
with planted flips, against cleanlab's find_label_issues on the same probabilities."""

import numpy as np
import pytest

from tlcli.insight import label_noise


def synthetic(n: int, k: int, separation: float, flip: float, seed: int, sharpness: float = 1.5):
    """(probabilities [n, k], labels [n], the flipped rows): each image's scores are
    N(separation at its true class, 1); the Bayes posterior is softmax(separation x scores),
    and the "classifier" reports it ``sharpness`` times too sharp (a temperature of 1/sharpness
    calibrates it). A ``flip`` share of the labels is moved to another class at random."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), true] += separation
    logits = separation * sharpness * z
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    y = true.copy()
    flips = rng.choice(n, round(flip * n), replace=False)
    y[flips] = (true[flips] + rng.integers(1, k, len(flips))) % k
    return probs, y, set(flips.tolist())


def cleanlab_issues(probs, y, ranked=False):
    filt = pytest.importorskip("cleanlab.filter")
    if ranked:
        return filt.find_label_issues(y, probs, return_indices_ranked_by="self_confidence").tolist()
    return set(np.nonzero(filt.find_label_issues(y, probs))[0].tolist())


CASES = [(2, 1.2), (4, 2.0), (10, 2.5), (10, 3.5)]  # (classes, separation): 80% to 95% accurate


@pytest.mark.parametrize("k,separation", CASES)
def test_confident_learning_agrees_with_cleanlab(k, separation):
    # The same method: the sets may differ only where a count of the calibrated confident joint
    # rounds differently (cleanlab keeps each row's total when rounding), at most one image per
    # off-diagonal cell, so |A ^ B| <= k (k - 1).
    for seed in range(2):
        probs, y, _ = synthetic(800, k, separation, 0.05, seed)
        _, joint = label_noise.confident_joint(probs, y)
        ours = set(label_noise.prune_by_noise_rate(probs, y, joint))
        theirs = cleanlab_issues(probs, y)
        union = ours | theirs
        assert len(union) > 20
        assert len(ours & theirs) / len(union) >= 1 - k * (k - 1) / len(union)


@pytest.mark.parametrize("k,separation", [(2, 2.0), (4, 2.0), (10, 2.5), (10, 3.5)])  # 80% to 95%
def test_flags_are_more_precise_than_cleanlab_and_rank_flips_as_high(k, separation):
    for seed in range(2):
        probs, y, flips = synthetic(800, k, separation, 0.05, seed)
        found = label_noise.find(probs, y)
        flagged = [f[0] for f in found.flagged]
        theirs = cleanlab_issues(probs, y)
        precision = len(set(flagged) & flips) / len(flagged)
        assert precision >= 0.5
        assert precision >= len(theirs & flips) / len(theirs)
        # Ranked by evidence: as many flips among the first len(flips) as cleanlab's ranking, but
        # one (confident learning runs here on the calibrated probabilities, cleanlab on the raw
        # ones, so one rounded cell of the joint may differ).
        top = len(set(found.candidates[:len(flips)]) & flips)
        assert top >= len(set(cleanlab_issues(probs, y, ranked=True)[:len(flips)]) & flips) - 1
        assert top >= len(flips) / 2  # most flips rank at the top
        assert [f[2] for f in found.flagged] == sorted((f[2] for f in found.flagged), reverse=True)
        # The expected false alarms are the sum of each flag's chance of being right after all.
        assert found.expected_false_alarms == pytest.approx(sum(f[3] for f in found.flagged))
        assert all(0 <= f[3] < 0.5 for f in found.flagged)


@pytest.mark.parametrize("k,separation", CASES)
def test_a_clean_set_gets_almost_no_flags_where_cleanlab_flags_the_classifiers_errors(k, separation):
    for seed in range(2):
        probs, y, _ = synthetic(800, k, separation, 0.0, seed)
        found = label_noise.find(probs, y)
        assert len(found.flagged) <= 0.025 * len(y)
        assert not found.strong
        if separation < 3:  # an 80%-accurate classifier: confident learning counts its errors
            assert len(cleanlab_issues(probs, y)) > 0.05 * len(y)


def test_strong_only_when_the_wrong_labels_are_beyond_the_classifiers_errors():
    probs, y, flips = synthetic(800, 4, 2.0, 0.05, 0)
    found = label_noise.find(probs, y)
    assert found.strong and found.p_value <= label_noise.STRONG_P
    assert found.noise_rate == pytest.approx(0.05, abs=0.02)
    assert found.temperature == pytest.approx(1.5, rel=0.15)  # it undoes the planted sharpness
    summary = found.summary()
    assert summary["flagged"] == len(found.flagged) and summary["strong"] is True
    assert summary["estimated_errors"] == pytest.approx(len(flips), rel=0.4)
    # One flip among 40 images is a finding, but a weak one.
    probs, y, flips = synthetic(40, 2, 3.0, 0.0, 1)
    y[0] = 1 - y[0]
    weak = label_noise.find(probs, y)
    assert not weak.strong


def test_train_warns_of_mislabels_only_when_strong_with_the_false_alarms_to_expect():
    from tlcli.insight.findings import check_warning

    strong = label_noise.find(*synthetic(800, 4, 2.0, 0.05, 0)[:2])
    assert strong.strong and 0 < strong.expected_false_alarms < len(strong.flagged) / 2
    assert check_warning(0, strong, "train and val", "tlcli audit --model m") == (
        f"{len(strong.flagged)} likely mislabeled training image(s) (about {strong.expected_false_alarms:.1f} "
        "of them expected to be false alarms); run 'tlcli audit --model m' to see them")
    weak = label_noise.find(*synthetic(800, 4, 2.0, 0.0, 0)[:2])  # a clean set
    assert not weak.strong
    assert check_warning(0, weak, "train and val", "tlcli audit --model m") is None
    assert check_warning(2, weak, "train and val", "tlcli audit --model m") == (
        "2 group(s) of identical or near-identical images across train and val; run 'tlcli audit --model m' "
        "to see them")
    assert check_warning(0, None, "train and val", "x") is None


def test_confident_joint_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.05, 0.95],   # labelled 0: the third looks like a 1
                      [0.2, 0.8], [0.1, 0.9], [0.5, 0.5]])    # labelled 1: the last is merely unsure
    y = np.array([0, 0, 0, 1, 1, 1])
    t, joint = label_noise.confident_joint(probs, y)
    np.testing.assert_allclose(t, [(0.9 + 0.8 + 0.05) / 3, (0.8 + 0.9 + 0.5) / 3])
    # Counted: rows 0 and 1 confidently 0, row 2 confidently 1 (labelled 0); rows 3, 4 confidently
    # 1, row 5 nothing. Each label's row scaled to its 3 images.
    np.testing.assert_allclose(joint, [[2, 1], [0, 3]])
    assert label_noise.prune_by_noise_rate(probs, y, joint) == {2: 1}


def test_the_note_on_the_figures():
    assert label_noise.note({}) == "not looked for"
    text = label_noise.note({"flagged": 7, "expected_false_alarms": 1.234, "estimated_errors": 9.4})
    assert text == "about 1.2 of the 7 expected to be false alarms; about 9 wrong label(s) estimated in all"


def test_the_audit_table_shows_the_false_alarms_beside_the_count_and_says_review(tmp_path):
    import io

    from rich.console import Console

    from tlcli.cli import reports
    from tlcli.insight.findings import AuditResult, Mislabel

    flagged = [Mislabel(str(tmp_path / "dress" / "skirt.jpg"), "dress", "shorts", 0.993, 0.12),
               Mislabel(str(tmp_path / "shorts" / "a.jpg"), "shorts", "dress", 0.981, 0.31)]
    r = AuditResult(data_dir=str(tmp_path), val_dir=None, labels=["dress", "shorts"], near_duplicates=[],
                    likely_mislabeled=flagged, outliers=[], skipped=[], thresholds={},
                    class_counts={"train": {"dress": 1, "shorts": 1}, "val": {}},
                    mislabel_estimate={"flagged": 2, "expected_false_alarms": 0.43, "estimated_errors": 3.2})
    def shown(width):
        buf = io.StringIO()
        console = Console(file=buf, width=width, color_system=None)
        for part in reports.audit(r):
            console.print(part)
        return buf.getvalue()

    assert max(len(line) for line in shown(80).splitlines()) <= 80
    text = " ".join(shown(200).split())
    assert "Likely mislabels (2; about 0.4 of the 2 expected to be false alarms;" in text
    assert "12%" in text and "31%" in text and "review: is it shorts?" in text and "move" not in text
    assert text.index("skirt.jpg") < text.index("a.jpg")
