"""The statistics of the evidence chapter: the confidence sequence (its edges, and its error rate under repeated
looks), two arms compared (paired and split, the verdicts, no labels, arms that always agree, a margin of 0) and
the exact paired gate (its counts, its p-values against scipy's binomial test, its error rates)."""

import json, math

import numpy as np
import pytest
from scipy.stats import binomtest

from vit_nbdev.evidence import (
    compare_arms,
    confidence_sequence,
    cs_bounds,
    cs_path,
    mcnemar_gate,
    mcnemar_p_value,
    simulate_paired,
    split_contributions,
)


def test_confidence_sequence_edges_and_path():
    m, low, high = confidence_sequence([])
    assert math.isnan(m) and (low, high) == (-math.inf, math.inf)
    m, low, high = confidence_sequence([1.0])
    assert m == 1.0 and low < 0 and high > 2  # one observation says little
    x = np.random.default_rng(0).random(1000) < 0.7
    m, low, high = confidence_sequence(x)
    assert low < m < high and m == x.mean()
    mean, lows, highs = cs_path(x)
    assert np.allclose((mean[-1], lows[-1], highs[-1]), (m, low, high))
    width = highs - lows
    assert (np.diff(width[200:]) < 0.01).all() and width[-1] < width[199] / 2  # narrows as labels arrive
    assert confidence_sequence(x, alpha=0.01)[1] < low  # a smaller error rate: a wider interval
    assert np.allclose(
        cs_bounds(np.array([10, 100]), 0.5, np.array([2.5, 25.0]))[0],
        [cs_bounds(10, 0.5, 2.5)[0], cs_bounds(100, 0.5, 25.0)[0]],
    )


def test_confidence_sequence_holds_over_repeated_looks():
    "Looked at after every label from the 200th to the 2,000th: wrong in about alpha of the runs, not more."
    rng = np.random.default_rng(7)
    x = rng.random((600, 2000)) < 0.75
    _, low, high = cs_path(x)
    wrong = ((low > 0.75) | (high < 0.75))[:, 199:].any(1).mean()
    assert wrong <= 0.08, wrong
    cand, prod = simulate_paired(2000, 0.75, -0.02, 0.15, runs=600, rng=rng)
    _, low, high = cs_path(cand.astype(float) - prod)
    wrong = ((low > -0.02) | (high < -0.02))[:, 199:].any(1).mean()
    assert wrong <= 0.08, wrong


def test_split_contributions_average_to_the_difference():
    rng = np.random.default_rng(1)
    c, p = rng.random(37) < 0.6, rng.random(113) < 0.8
    x = split_contributions(c, p)
    assert len(x) == 150 and math.isclose(x.mean(), c.mean() - p.mean(), abs_tol=1e-12)
    planned = split_contributions(c, p, canary_share=0.25)  # the planned share: an inverse-probability estimate
    m = (c.sum() + p.sum()) / 150
    assert math.isclose(planned.mean(), ((c - m).sum() / 0.25 - (p - m).sum() / 0.75) / 150, abs_tol=1e-12)


def test_compare_arms_verdicts():
    rng = np.random.default_rng(2)
    worse = compare_arms(*simulate_paired(800, 0.75, -0.12, 0.15, rng=rng), paired=True)
    same = compare_arms(*simulate_paired(6000, 0.75, 0.0, 0.12, rng=rng), paired=True)
    assert worse["verdict"] == "worse" and worse["high"] < -0.02 and worse["method"] == "asympcs-paired"
    assert same["verdict"] == "non_inferior" and same["low"] > -0.02 and same["labels"] == 6000
    assert set(worse) == {
        "method",
        "labels",
        "canary_acc",
        "production_acc",
        "difference",
        "low",
        "high",
        "margin",
        "alpha",
        "verdict",
    }
    arm = rng.random(3000) < 0.5
    right = rng.random(3000) < np.where(arm, 0.6, 0.75)
    split = compare_arms(right[arm], right[~arm], paired=False)
    assert split["method"] == "asympcs-split" and split["labels"] == 3000 and split["verdict"] == "worse"
    assert math.isclose(split["difference"], right[arm].mean() - right[~arm].mean())
    json.dumps(split, allow_nan=False)  # plain floats, ready for JSON


def test_compare_arms_edges():
    for r in (compare_arms([], [], paired=True), compare_arms([True], [], paired=False)):
        assert r["verdict"] == "undecided" and r["difference"] is None and r["low"] is None and r["high"] is None
        json.dumps(r, allow_nan=False)
    assert compare_arms([], [], paired=False)["canary_acc"] is None
    agree = [True, False, True] * 1000
    assert compare_arms(agree[:30], agree[:30], paired=True)["verdict"] == "undecided"  # too few to say
    r = compare_arms(agree, agree, paired=True)
    assert r["verdict"] == "non_inferior" and r["difference"] == 0.0
    assert compare_arms(agree, agree, paired=True, margin=0)["verdict"] == "undecided"  # margin 0: only *better* passes
    with pytest.raises(ValueError, match="1 canary, 2 production"):
        compare_arms([True], [True, False], paired=True)


def test_mcnemar_p_value_is_the_exact_binomial_test():
    # margin 0: the classic one-sided exact McNemar test, P(B >= b) for B ~ binomial(b + c, 1/2)
    for b, c in [(10, 3), (3, 10), (25, 25), (1, 0)]:
        expect = binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert math.isclose(float(mcnemar_p_value(b, c, 1000, 0.0)), expect, rel_tol=1e-9)
    # a margin: theta0 = 1/2 - margin * n / (2 d)
    b, c, n = 51, 68, 1000
    theta0 = 0.5 - 0.01 * n / (2 * (b + c))
    assert math.isclose(float(mcnemar_p_value(b, c, n)), binomtest(b, b + c, theta0, "greater").pvalue, rel_tol=1e-9)
    assert math.isclose(float(mcnemar_p_value(b, c, n, alternative="less")), binomtest(b, b + c, theta0, "less").pvalue)
    # fewer disagreements than margin * n: whether current_only is significantly below margin * n
    assert math.isclose(float(mcnemar_p_value(0, 5, 1000)), binomtest(5, 1000, 0.01, "less").pvalue, rel_tol=1e-9)
    assert float(mcnemar_p_value(0, 0, 1000)) < 1e-4 and float(mcnemar_p_value(0, 0, 1000, 0.0)) == 1.0
    assert float(mcnemar_p_value(0, 5, 1000, alternative="less")) == 1.0  # cannot be worse by more than it differs
    p = mcnemar_p_value(np.array([10, 60]), np.array([60, 10]), 1000)
    assert p.shape == (2,) and p[0] > 0.5 > 0.01 > p[1]
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_p_value(1, 1, 10, alternative="two-sided")


def test_mcnemar_gate_counts_and_edges():
    cand = np.array([1, 1, 0, 0, 1, 1], bool)
    cur = np.array([1, 0, 1, 0, 1, 0], bool)
    g = mcnemar_gate(cand, cur, margin=0.0)
    assert (g["images"], g["candidate_only"], g["current_only"], g["method"]) == (6, 2, 1, "mcnemar-exact")
    assert math.isclose(g["difference"], 1 / 6) and math.isclose(g["candidate_acc"], 4 / 6)
    assert g["p_value"] == pytest.approx(0.5) and g["passed"] is False  # 2 of 3 disagreements: no evidence
    assert set(g) == {
        "method",
        "images",
        "candidate_acc",
        "current_acc",
        "difference",
        "candidate_only",
        "current_only",
        "margin",
        "alpha",
        "p_value",
        "passed",
    }
    same = np.random.default_rng(3).random(1000) < 0.75
    assert mcnemar_gate(same, same)["passed"] and not mcnemar_gate(same, same, margin=0)["passed"]
    empty = mcnemar_gate([], [])
    assert empty["passed"] is False and empty["candidate_acc"] is None and empty["p_value"] == 1.0
    json.dumps(g, allow_nan=False)
    with pytest.raises(ValueError, match="same images"):
        mcnemar_gate([True], [])


def test_the_gate_promotes_a_worse_candidate_at_most_alpha_of_the_time():
    rng = np.random.default_rng(4)
    for gap, most, least in [(-0.01, 0.0, 0.07), (-0.02, 0.0, 0.02), (0.03, 0.8, 1.0)]:
        cand, cur = simulate_paired(1000, 0.75, gap, 0.15, runs=2000, rng=rng)
        b, c = (cand & ~cur).sum(1), (~cand & cur).sum(1)
        promoted = (mcnemar_p_value(b, c, 1000, 0.01) < 0.05).mean()
        assert most <= promoted <= least, (gap, promoted)


def test_simulate_paired():
    cand, prod = simulate_paired(100_000, 0.8, 0.02, 0.1, rng=np.random.default_rng(5))
    assert abs(prod.mean() - 0.8) < 0.005 and abs(cand.mean() - prod.mean() - 0.02) < 0.005
    assert abs((cand != prod).mean() - 0.1) < 0.005
    with pytest.raises(ValueError, match="no two models"):
        simulate_paired(10, 0.75, 0.3, 0.1)
