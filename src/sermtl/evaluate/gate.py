"""The registration gate: from a significance report and `registry.gate`, is the proposed system registered?
Pure (no MLflow): the registry records and acts on its decision."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sermtl.params import GateParams


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the registration gate on one significance report."""

    passed: bool
    reasons: list[str]  # why it passed or failed, naming baselines and dimensions
    test: str  # GateParams.test whose corrected p-values decided
    wins: dict[str, list[str]]  # baseline -> dimensions where the proposed system is significantly better
    losses: dict[str, list[str]]  # baseline -> dimensions where it is significantly worse
    p_values: dict[str, dict[str, float]]  # baseline -> dimension -> corrected p of `test` (H1: better)
    proposed: str = ""
    rule: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_report(report: Any) -> Any:
    """A SignificanceReport from itself or from its `to_dict()` (significance.json as read back)."""
    from sermtl.evaluate.significance import SignificanceReport

    if isinstance(report, SignificanceReport):
        return report
    if isinstance(report, Mapping):
        return SignificanceReport.from_dict(dict(report))
    raise TypeError(f"expected a SignificanceReport or its dict, got {type(report).__name__}")


def gate_decision(report: Any, gate: GateParams) -> GateDecision:
    """Passed when, by the corrected p-values of `gate.test`, the proposed system is significantly better
    than **every** baseline on at least `gate.min_dimensions_better` dimensions, and significantly worse
    on at most `gate.max_comparisons_worse` (baseline, dimension) comparisons in all.

    `report` is a sermtl.evaluate.significance.SignificanceReport or its `to_dict()`; significance comes from
    `significance.decisive` (alpha and correction are the report's own).
    """
    from sermtl.evaluate.significance import decisive

    report = as_report(report)
    verdicts = decisive(report, gate.test)
    rule = {
        "test": gate.test,
        "min_dimensions_better": gate.min_dimensions_better,
        "max_comparisons_worse": gate.max_comparisons_worse,
        "alpha": report.params.get("alpha"),
        "correction": report.params.get("correction"),
    }
    wins: dict[str, list[str]] = {b: [] for b in report.baselines}
    losses: dict[str, list[str]] = {b: [] for b in report.baselines}
    p_values: dict[str, dict[str, float]] = {b: {} for b in report.baselines}
    for comparison in report.comparisons:
        baseline, dimension = comparison.baseline, comparison.dimension
        verdict = verdicts[(baseline, dimension)]
        wins.setdefault(baseline, [])
        losses.setdefault(baseline, [])
        if verdict.better:
            wins[baseline].append(dimension)
        if verdict.worse:
            losses[baseline].append(dimension)
        p_values.setdefault(baseline, {})[dimension] = float(comparison.p_adjusted[gate.test])
    reasons: list[str] = []
    passed = True
    if not report.comparisons:
        passed = False
        reasons.append("the significance report holds no comparison")
    for baseline in wins:
        won = wins[baseline]
        detail = ", ".join(won) if won else "no dimension"
        if len(won) < gate.min_dimensions_better:
            passed = False
            reasons.append(
                f"vs {baseline}: significantly better on {len(won)} dimension(s) ({detail}); "
                f"needs at least {gate.min_dimensions_better}"
            )
        else:
            reasons.append(f"vs {baseline}: significantly better on {detail}")
    worse = [f"{b}/{d}" for b, dims in losses.items() for d in dims]
    if len(worse) > gate.max_comparisons_worse:
        passed = False
        reasons.append(
            f"significantly worse in {len(worse)} comparison(s) ({', '.join(worse)}); "
            f"at most {gate.max_comparisons_worse} allowed"
        )
    elif worse:
        reasons.append(f"significantly worse in {', '.join(worse)} (allowed: {gate.max_comparisons_worse})")
    return GateDecision(
        passed=passed,
        reasons=reasons,
        test=gate.test,
        wins=wins,
        losses=losses,
        p_values=p_values,
        proposed=report.proposed,
        rule=rule,
    )
