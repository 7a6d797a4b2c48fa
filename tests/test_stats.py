"""helpers.stats.paired against independent computations (scipy's own paired t-test, brute-force sign flips)."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from helpers.stats import VERDICTS, paired, simplest_equivalent


def random_case(rng, n):
    """Accuracies of two methods on n seeds: a shared per-seed level plus a method effect and noise."""
    level = rng.uniform(0.6, 0.9, n)
    effect = rng.choice([0.0, 0.002, 0.01, -0.01, 0.03, -0.03])
    a = level + effect + rng.normal(0, rng.choice([0.001, 0.004, 0.01]), n)
    b = level + rng.normal(0, 0.004, n)
    return a, b, float(rng.choice([0.25, 0.5, 1.0, 2.0]))


def brute_force_sign_flip(d):
    observed = abs(d.mean())
    flips = [abs(np.mean(np.array(s) * d)) for s in itertools.product([-1, 1], repeat=len(d))]
    return float(np.mean([f >= observed * (1 - 1e-12) for f in flips]))


@pytest.mark.parametrize("n", [2, 3, 6, 9])
def test_paired_agrees_with_independent_computations(n):
    rng = np.random.default_rng(n)
    for _ in range(60):
        a, b, margin = random_case(rng, n)
        r = paired(a, b, margin_pp=margin)
        d = 100 * (a - b)
        assert r.diffs_pp == pytest.approx(tuple(d)) and r.n == n and r.mean_pp == pytest.approx(d.mean())
        ci = sps.ttest_rel(100 * a, 100 * b).confidence_interval(0.95)      # another route through scipy
        assert (r.ci_low_pp, r.ci_high_pp) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-9)
        by_hand = d.mean() + np.array([-1, 1]) * sps.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert (r.ci_low_pp, r.ci_high_pp) == pytest.approx(tuple(by_hand))
        assert r.p_sign_flip == pytest.approx(brute_force_sign_flip(d))
        tost = max(sps.ttest_1samp(d, -margin, alternative="greater").pvalue,
                   sps.ttest_1samp(d, margin, alternative="less").pvalue)
        assert r.p_equivalence == pytest.approx(tost)
        # the verdict is the interval read against 0 and the margin
        inside = -margin < r.ci_low_pp and r.ci_high_pp < margin
        expected = ("equivalent" if inside else "better" if r.ci_low_pp > 0 else "worse" if r.ci_high_pp < 0
                    else "undecided")
        assert r.verdict == expected and r.verdict in VERDICTS
        assert (r.verdict == "equivalent") <= (r.p_equivalence < 0.025)     # a 95% interval inside the margin


def test_a_worked_example_three_seeds_agree_yet_the_sign_flip_test_cannot_go_below_a_quarter():
    # Chapter 2's old 2-bit stochastic-minus-deterministic differences: +1.56, +1.01, +1.44 pp; by hand:
    # mean 1.3367, s = 0.2892, t(0.975, 2) = 4.3027, so 1.3367 -+ 4.3027 * 0.2892 / sqrt(3) = 0.6182 .. 2.0551
    r = paired([0.8156, 0.8101, 0.8144], [0.80, 0.80, 0.80], margin_pp=0.5)
    assert r.mean_pp == pytest.approx(1.3367, abs=1e-4)
    assert r.ci_low_pp == pytest.approx(0.6182, abs=1e-3) and r.ci_high_pp == pytest.approx(2.0551, abs=1e-3)
    assert r.verdict == "better" and r.p_sign_flip == pytest.approx(0.25)
    assert "better than" in r.explain("stochastic", "deterministic")
    six = paired([0.81] * 6, [0.80, 0.801, 0.799, 0.802, 0.798, 0.80], margin_pp=0.5)
    assert six.p_sign_flip == pytest.approx(2 / 64)     # with 6 seeds the exact test can reach p = 0.03


def test_equivalent_and_undecided_read_as_they_should():
    eq = paired([0.80, 0.81, 0.82, 0.83], [0.801, 0.809, 0.821, 0.829], margin_pp=0.5)
    assert eq.verdict == "equivalent" and "equivalent within ±0.5 pp" in eq.explain("A", "B")
    und = paired([0.80, 0.83, 0.79], [0.81, 0.80, 0.80], margin_pp=0.5)
    text = und.explain("A", "B")
    assert und.verdict == "undecided" and "undecided at this budget" in text
    assert "indistinguishable" not in text and "no difference" not in text
    same = paired([0.8, 0.7], [0.79, 0.69], margin_pp=0.5)      # zero spread of the differences
    assert same.ci_low_pp == same.ci_high_pp == pytest.approx(1.0) and same.verdict == "better"
    g = eq.glue_values("ch9_x")
    assert set(g) == {f"ch9_x_{k}" for k in ("diff_pp", "ci_low_pp", "ci_high_pp", "n", "margin_pp", "verdict")}
    assert g["ch9_x_verdict"] == "equivalent" and g["ch9_x_n"] == 4


def test_firm_verdicts_survive_every_drift_of_the_accuracies():
    rng = np.random.default_rng(7)
    drift_pp, firm_seen = 0.25, {v: 0 for v in VERDICTS}
    for _ in range(400):
        n = int(rng.choice([3, 6]))
        a, b, margin = random_case(rng, n)
        r = paired(a, b, margin_pp=margin)
        if not r.firm(drift_pp):
            continue
        firm_seen[r.verdict] += 1
        moves = [rng.choice([-1, 1], (2, n)) for _ in range(40)] + [rng.uniform(-1, 1, (2, n)) for _ in range(40)]
        for move in moves:
            moved = paired(a + move[0] * drift_pp / 100, b + move[1] * drift_pp / 100, margin_pp=margin)
            assert moved.verdict == r.verdict, (a, b, margin, move)
    assert all(count > 0 for count in firm_seen.values()), firm_seen   # the check ran for every verdict
    # a knife-edge case is not firm
    assert not paired([0.8156, 0.8101, 0.8144], [0.80, 0.80, 0.80], margin_pp=1.3).firm(drift_pp)


def test_simplest_equivalent_chooses_the_first_setting_within_the_margin_of_the_best():
    scores = {"T=1": [0.800, 0.810, 0.820], "T=2": [0.801, 0.811, 0.821], "T=4": [0.790, 0.800, 0.805]}
    assert simplest_equivalent(scores, margin_pp=0.5) == "T=1"
    assert simplest_equivalent(scores, margin_pp=0.05) == "T=2"      # nothing else within 0.05 pp: the best
    with pytest.raises(ValueError, match="empty"):
        simplest_equivalent({}, margin_pp=0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(a=[0.8], b=[0.7], margin_pp=0.5), ">= 2 paired"),
    (dict(a=[0.8, 0.7], b=[0.7], margin_pp=0.5), "equally long"),
    (dict(a=[0.8, float("nan")], b=[0.7, 0.7], margin_pp=0.5), "finite"),
    (dict(a=[0.8, 0.7], b=[0.7, 0.7], margin_pp=0), "margin_pp"),
    (dict(a=[0.8, 0.7], b=[0.7, 0.7], margin_pp=0.5, confidence=95), "confidence"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired(**kwargs)
    if "confidence" not in kwargs and kwargs["margin_pp"]:
        with pytest.raises(ValueError, match="drift_pp"):
            paired([0.8, 0.7], [0.7, 0.7], margin_pp=0.5).firm(-1)
