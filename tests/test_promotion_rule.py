"""The promotion rule (registry.promotion.rule, margin) on constructed predictions and reports, no server.

`not_worse` is non-inferiority: on every dimension the lower bound of the confidence interval of
(challenger - champion) UAR must be at least -margin. "No significant difference" is no longer enough, so
an equivalent challenger measured on little, noisy data is refused (the old rule, "significantly worse on
no dimension and mean UAR not below the champion's", promoted it whenever its point estimate was not
lower: about half the time). The end-to-end case, through MLflow, is
tests/test_registry.py::test_promotion_lifecycle_refusal_of_a_worse_challenger_and_rollback_walk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pytest

from sermtl.evaluate.metrics import validate_predictions
from sermtl.evaluate.significance import P_VALUE_KEYS, TESTS, Comparison, SignificanceReport
from sermtl.mlops import registry
from sermtl.params import Params, PromotionParams

PARAMS = Params()  # significance.unit speaker, permutation test, confidence 0.95; margin 0.01
DIMENSIONS = list(PARAMS.eval.dimensions)  # arousal, valence, dominance: the order of the comparisons
SPEAKERS = [f"Ses0{session}{gender}" for session in range(1, 6) for gender in "FM"]  # ten, as IEMOCAP


def _params(**promotion) -> Params:
    registry_params = dataclasses.replace(
        PARAMS.registry, promotion=dataclasses.replace(PARAMS.registry.promotion, **promotion)
    )
    return dataclasses.replace(PARAMS, registry=registry_params)


def _predictions(
    accuracy: Sequence[float] | Mapping[str, Sequence[float]], per_class: int, *, from_end: bool = False
) -> pd.DataFrame:
    """One version's out-of-fold predictions: each speaker of SPEAKERS has `per_class` utterances of each
    class, and the version is right on the first round(accuracy[j] * per_class) of each class of speaker j
    (the last ones with `from_end`), wrong (the next class) on the others. So speaker j's UAR is that share,
    the pooled UAR their mean, and a more accurate version without `from_end` is right on a superset.
    `accuracy`: one list for every dimension, or one per dimension."""
    rows = []
    for dimension in DIMENSIONS:
        shares = accuracy[dimension] if isinstance(accuracy, Mapping) else accuracy
        for j, speaker in enumerate(SPEAKERS):
            right = round(shares[j] * per_class)
            for i in range(3 * per_class):
                label, rank = i % 3, i // 3
                correct = rank >= per_class - right if from_end else rank < right
                rows.append(
                    {
                        "utterance_id": f"{speaker}_impro01_{speaker[-1]}{i:03d}",
                        "system": "version",
                        "fold": int(speaker[4]) - 1,
                        "test_session": int(speaker[4]),
                        "dimension": dimension,
                        "improvised": True,
                        "label": label,
                        "prediction": label if correct else (label + 1) % 3,
                        "prob_low": 1 / 3,
                        "prob_medium": 1 / 3,
                        "prob_high": 1 / 3,
                    }
                )
    return validate_predictions(pd.DataFrame(rows), "constructed predictions")


def _alternating(high: float, low: float, highs: int = 5) -> list[float]:
    """`highs` speakers at `high`, the others at `low`, interleaved over sessions."""
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    return [high if order.index(j) < highs else low for j in range(len(SPEAKERS))]


def _old_rule_promotes(evidence: dict) -> bool:
    """The rule this replaces (`not_worse`, tolerance 0): significantly worse on no dimension and mean UAR
    at least the champion's. Kept here to show where each case tells the two rules apart."""
    mean = evidence["mean_uar"]
    return not evidence["worse"] and mean["challenger"] >= mean["champion"] - 1e-12


def _compare(challenger: pd.DataFrame, champion: pd.DataFrame, **promotion) -> dict:
    return registry.compare_predictions(challenger, champion, _params(**promotion))


# --- constructed predictions through the real paired tests --------------------------------------------


def test_clearly_better_challenger_is_promoted_by_both_rules():
    champion = _predictions([0.5] * 10, per_class=10)
    challenger = _predictions([0.8] * 10, per_class=10)  # right on a superset, +0.3 UAR for every speaker
    evidence = _compare(challenger, champion)
    assert evidence["rule_passed"], evidence["reasons"]
    assert evidence["rule"] == "not_worse" and evidence["margin"] == 0.01
    assert evidence["non_inferior"] == list(DIMENSIONS) and evidence["better"] == list(DIMENSIONS)
    assert evidence["unit"] == "speaker" and evidence["confidence"] == 0.95
    for dimension in DIMENSIONS:
        low, high = evidence["intervals"][dimension]
        assert low > 0 and evidence["dimensions"][dimension]["difference"] == pytest.approx(0.3)
        assert evidence["dimensions"][dimension]["ci"] == [low, high]
    assert evidence["reasons"][0].startswith("non-inferior on every dimension")
    better = _compare(challenger, champion, rule="better")
    assert (
        better["rule_passed"] and "significantly better than the champion on arousal" in better["reasons"][-1]
    )
    assert _old_rule_promotes(evidence)


def test_equivalent_challenger_on_small_noisy_data_is_refused():
    """Same UAR as the champion, but half the speakers gain and half lose a quarter: the interval is wide.
    The old rule promoted it (not significantly worse, mean UAR not below the champion's)."""
    champion = _predictions([0.5] * 10, per_class=4)  # 120 utterances, 12 per speaker
    challenger = _predictions(_alternating(0.75, 0.25), per_class=4)
    evidence = _compare(challenger, champion)
    assert evidence["mean_uar"]["challenger"] == pytest.approx(evidence["mean_uar"]["champion"])
    assert evidence["worse"] == [] and evidence["better"] == []
    assert not evidence["rule_passed"]
    assert evidence["non_inferior"] == []
    for dimension in DIMENSIONS:
        low, high = evidence["intervals"][dimension]
        assert low < -0.01 < 0.01 < high
    assert len(evidence["reasons"]) == len(DIMENSIONS)
    assert evidence["reasons"][0].startswith("arousal: challenger - champion UAR +0.0000, 95% interval [")
    assert (
        "lower bound is below -margin = -0.0100; not shown to be at most 0.01 worse" in evidence["reasons"][0]
    )
    assert _old_rule_promotes(evidence)  # the case this change is about


def test_worse_challenger_is_refused():
    champion = _predictions([0.6] * 10, per_class=10)
    challenger = _predictions([0.3] * 10, per_class=10)
    evidence = _compare(challenger, champion)
    assert not evidence["rule_passed"] and evidence["worse"] == list(DIMENSIONS)
    assert all(high < 0 for _, high in evidence["intervals"].values())
    assert all("significantly worse; not shown" in reason for reason in evidence["reasons"])
    assert not _old_rule_promotes(evidence)


def test_better_point_estimate_whose_interval_crosses_minus_margin_is_refused():
    """+0.06 UAR on average, but 4 of 10 speakers lose 0.3: not shown to be at most 0.01 worse."""
    champion = _predictions([0.5] * 10, per_class=10)
    challenger = _predictions(_alternating(0.8, 0.2, highs=6), per_class=10)
    evidence = _compare(challenger, champion)
    for dimension in DIMENSIONS:
        assert evidence["dimensions"][dimension]["difference"] == pytest.approx(0.06)
        assert evidence["intervals"][dimension][0] < -0.01
    assert evidence["worse"] == [] and not evidence["rule_passed"]
    assert _old_rule_promotes(evidence)


def test_gains_on_two_dimensions_do_not_buy_an_unproven_third():
    """Every dimension must be non-inferior; the old rule looked at the mean UAR over dimensions."""
    champion = _predictions([0.5] * 10, per_class=10)
    noisy = _alternating(0.8, 0.2, highs=5)
    challenger = _predictions(
        {"arousal": [0.8] * 10, "valence": [0.8] * 10, "dominance": noisy}, per_class=10
    )
    evidence = _compare(challenger, champion)
    assert evidence["non_inferior"] == ["arousal", "valence"] and not evidence["rule_passed"]
    assert [r.split(":")[0] for r in evidence["reasons"]] == ["dominance"]
    assert _old_rule_promotes(evidence)


def test_identical_predictions_pass_not_worse_but_not_better():
    champion = _predictions(_alternating(0.7, 0.4), per_class=5)
    evidence = _compare(champion, champion)
    assert evidence["rule_passed"] and evidence["intervals"] == {d: [0.0, 0.0] for d in DIMENSIONS}
    better = _compare(champion, champion, rule="better")
    assert not better["rule_passed"] and better["reasons"][-1].startswith(
        "rule `better`: not significantly better than the champion on any dimension (resampling test by"
    )


def test_a_wider_margin_accepts_what_the_default_refuses():
    champion = _predictions([0.5] * 10, per_class=10)
    challenger = _predictions(_alternating(0.8, 0.2, highs=6), per_class=10)
    lowest = min(low for low, _ in _compare(challenger, champion)["intervals"].values())
    assert _compare(challenger, champion, margin=-lowest)["rule_passed"]
    assert not _compare(challenger, champion, margin=-lowest - 0.001)["rule_passed"]


# --- the decision on constructed reports --------------------------------------------------------------


def _report(
    intervals: Mapping[str, tuple[float, float, float]],
    better: Sequence[str] = (),
    worse: Sequence[str] = (),
) -> SignificanceReport:
    """A challenger-vs-champion report: dimension -> (difference, ci_low, ci_high); the resampling test says
    significantly better / worse on the dimensions listed."""
    comparisons = []
    for dimension, (difference, low, high) in intervals.items():
        significant = dimension in better or dimension in worse
        comparisons.append(
            Comparison(
                baseline="champion",
                dimension=dimension,
                n=3000,
                uar_proposed=0.6 + difference,
                uar_baseline=0.6,
                difference=difference,
                ci_low=low,
                ci_high=high,
                cohens_h=0.0,
                discordant_proposed=10,
                discordant_baseline=10,
                odds_ratio=1.0,
                z=0.0,
                p=dict.fromkeys(P_VALUE_KEYS, 0.001 if significant else 0.5),
                p_adjusted=dict.fromkeys(P_VALUE_KEYS, 0.003 if significant else 0.9),
                better={t: t == "resampling" and dimension in better for t in TESTS},
                worse={t: t == "resampling" and dimension in worse for t in TESTS},
                unit="speaker",
                clusters=10,
            )
        )
    return SignificanceReport(
        proposed="challenger",
        baselines=["champion"],
        dimensions=list(intervals),
        subset="all",
        n=dict.fromkeys(intervals, 3000),
        params={"confidence": 0.95, "alpha": 0.05, "correction": "holm", "resampling": "permutation"},
        comparisons=comparisons,
    )


def test_a_small_significant_loss_within_the_margin_is_not_worse():
    """Much data, a tight interval: 0.3 points worse, significantly, but surely less than one point."""
    report = _report({d: (-0.003, -0.006, -0.0005) for d in DIMENSIONS}, worse=list(DIMENSIONS))
    decision = registry.promotion_decision(report, PromotionParams())
    assert decision.passed and decision.worse == list(DIMENSIONS)
    assert (
        decision.reasons[-1] == "significantly worse on arousal, valence, dominance, by less than the margin"
    )
    assert not registry.promotion_decision(report, PromotionParams(margin=0.005)).passed
    assert registry.promotion_decision(report.to_dict(), PromotionParams()) == decision  # significance.json


def test_the_lower_bound_may_touch_minus_margin():
    report = _report({"arousal": (0.01, -0.01, 0.03), "valence": (0.02, 0.0, 0.04)})
    assert registry.promotion_decision(report, PromotionParams(margin=0.01)).passed
    assert not registry.promotion_decision(report, PromotionParams(margin=0.0099)).passed
    strict = registry.promotion_decision(report, PromotionParams(margin=0.0))
    assert not strict.passed and strict.non_inferior == ["valence"]


def test_rule_better_needs_non_inferiority_and_one_significant_gain():
    gain = _report({"arousal": (0.05, 0.02, 0.08), "valence": (0.0, -0.005, 0.005)}, better=["arousal"])
    decision = registry.promotion_decision(gain, PromotionParams(rule="better"))
    assert decision.passed and decision.better == ["arousal"]
    # a significant gain does not make up for a dimension not shown non-inferior
    unproven = _report({"arousal": (0.05, 0.02, 0.08), "valence": (0.0, -0.03, 0.03)}, better=["arousal"])
    refused = registry.promotion_decision(unproven, PromotionParams(rule="better"))
    assert not refused.passed and refused.non_inferior == ["arousal"]
    assert refused.reasons[0].startswith("valence: challenger - champion UAR +0.0000, 95% interval [-0.0300")


def test_decision_records_rule_margin_and_intervals():
    report = _report({"arousal": (0.01, -0.02, 0.04)})
    decision = registry.promotion_decision(report, PromotionParams(margin=0.015)).to_dict()
    assert decision["rule"] == "not_worse" and decision["margin"] == 0.015
    assert decision["intervals"] == {"arousal": [-0.02, 0.04]} and decision["passed"] is False
    assert (decision["test"], decision["unit"], decision["confidence"]) == ("resampling", "speaker", 0.95)
    assert decision["reasons"] == [
        "arousal: challenger - champion UAR +0.0100, 95% interval [-0.0200, +0.0400] by speaker: its lower "
        "bound is below -margin = -0.0150; not shown to be at most 0.015 worse"
    ]


def test_an_empty_report_is_refused():
    decision = registry.promotion_decision(_report({}), PromotionParams())
    assert not decision.passed and "no comparison" in decision.reasons[0]


def test_margin_default_is_one_uar_point():
    assert PromotionParams().margin == 0.01 and np.isclose(PARAMS.registry.promotion.margin, 0.01)
