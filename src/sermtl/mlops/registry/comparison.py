"""Comparing a challenger with the champion: their out-of-fold predictions paired on common utterances,
the study's paired tests, and `registry.promotion.rule` (non-inferiority, or also a significant gain)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.evaluate.gate import as_report
from sermtl.evaluate.metrics import validate_predictions
from sermtl.mlops import tracking
from sermtl.mlops.registry.common import (
    ARTIFACT_OOF,
    MIN_PAIRED_UTTERANCES,
    TAG_OOF,
    TAG_REGISTRATION_RUN,
    PromotionRefused,
)
from sermtl.params import Params, PromotionParams


def _version_predictions(mlflow_client: MlflowClient, version: Any, folder: Path) -> pd.DataFrame | None:
    """The out-of-fold predictions a version was registered with, or None if it has none."""
    tags = version.tags or {}
    run_id = tags.get(TAG_REGISTRATION_RUN) or version.run_id
    if not run_id:
        return None
    try:
        local = mlflow_client.download_artifacts(run_id, tags.get(TAG_OOF, ARTIFACT_OOF), str(folder))
    except (MlflowException, OSError) as exc:
        if tracking.is_unreachable(exc):
            raise
        return None
    where = f"{version.name} version {version.version} ({TAG_OOF})"
    return validate_predictions(pd.read_parquet(local), where)


# The test whose corrected p-values make "significantly better" (rule `better`) and the informative
# "significantly worse": the paired resampling test at significance.unit, whose interval `not_worse` reads.
PROMOTION_TEST = "resampling"
_MARGIN_SLACK = 1e-12  # floating-point slack when comparing a lower bound with -margin


@dataclass(frozen=True)
class PromotionDecision:
    """`registry.promotion.rule` applied to one challenger-vs-champion significance report."""

    passed: bool
    rule: str  # not_worse | better
    margin: float  # registry.promotion.margin, in UAR units
    reasons: list[str]  # why it passed or was refused, naming dimensions and intervals
    non_inferior: list[str]  # dimensions whose interval's lower bound is at least -margin
    better: list[str]  # dimensions where the challenger is significantly better (PROMOTION_TEST)
    worse: list[str]  # where it is significantly worse (within the margin this does not refuse)
    intervals: dict[str, list[float]]  # dimension -> [low, high] of (challenger - champion) UAR
    confidence: float  # of the intervals (significance.confidence)
    unit: str  # what the test and the intervals resampled (significance.unit)
    test: str = PROMOTION_TEST

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promotion_decision(
    report: Any, promotion: PromotionParams, champion: str = "champion"
) -> PromotionDecision:
    """Whether the report's proposed system (the challenger) may replace `champion` (its baseline).

    - `not_worse` (non-inferiority): on EVERY dimension of the report the lower bound of the interval of
      (challenger - champion) UAR, `Comparison.ci_low` (at significance.confidence, resampling
      significance.unit: at the default unit speaker the inversion of the sign-flip test), is at least
      -`promotion.margin`. Each dimension is a one-sided test at level (1 - confidence) / 2 of "the
      challenger is more than `margin` worse"; requiring every one of them (an intersection-union test)
      keeps that level without a correction for the dimensions. "No significant difference" is not
      "not worse": a wide interval (few speakers, noisy systems) refuses, whatever the point estimate.
    - `better`: the same, and significantly better on at least one dimension by the resampling test's
      corrected p-values (significance.correction over the dimensions, at significance.alpha).

    A significant loss smaller than the margin does not refuse (the margin says it is acceptable); it is
    listed in `worse` and in the reasons. `report` is a SignificanceReport or its `to_dict()`.
    """
    from sermtl.evaluate.significance import decisive

    report = as_report(report)
    verdicts = decisive(report, PROMOTION_TEST)
    comparisons = [c for c in report.comparisons if c.baseline == champion]
    confidence = float(report.params.get("confidence", float("nan")))
    unit = comparisons[0].unit if comparisons else str(report.params.get("unit", ""))
    margin = float(promotion.margin)
    level = f"{confidence:.0%} interval" if math.isfinite(confidence) else "interval"
    intervals = {c.dimension: [c.ci_low, c.ci_high] for c in comparisons}
    non_inferior = [c.dimension for c in comparisons if c.ci_low >= -margin - _MARGIN_SLACK]
    better = [c.dimension for c in comparisons if verdicts[(champion, c.dimension)].better]
    worse = [c.dimension for c in comparisons if verdicts[(champion, c.dimension)].worse]
    reasons: list[str] = []
    if not comparisons:
        reasons.append(f"the significance report holds no comparison with {champion!r}")
    for c in comparisons:
        if c.dimension not in non_inferior:
            significant = ", significantly worse" if c.dimension in worse else ""
            reasons.append(
                f"{c.dimension}: challenger - champion UAR {c.difference:+.4f}, {level} "
                f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] by {unit}: its lower bound is below -margin = "
                f"{-margin:+.4f}{significant}; not shown to be at most {margin:g} worse"
            )
    passed = bool(comparisons) and len(non_inferior) == len(comparisons)
    if passed:
        bounds = ", ".join(f"{c.dimension} {c.ci_low:+.4f}" for c in comparisons)
        reasons.append(
            f"non-inferior on every dimension: lower bounds of the {level}s of challenger - champion UAR "
            f"by {unit} ({bounds}) are all at least -margin = {-margin:+.4f}"
        )
        within = [d for d in worse if d in non_inferior]
        if within:
            reasons.append(f"significantly worse on {', '.join(within)}, by less than the margin")
    if promotion.rule == "better":
        tested = (
            f"{PROMOTION_TEST} test by {unit}, {report.params.get('correction')}-corrected p at alpha "
            f"{report.params.get('alpha')}"
        )
        if better:
            reasons.append(f"significantly better than the champion on {', '.join(better)} ({tested})")
        else:
            passed = False
            reasons.append(
                f"rule `better`: not significantly better than the champion on any dimension ({tested})"
            )
    return PromotionDecision(
        passed=passed,
        rule=promotion.rule,
        margin=margin,
        reasons=reasons,
        non_inferior=non_inferior,
        better=better,
        worse=worse,
        intervals=intervals,
        confidence=confidence,
        unit=unit,
    )


def compare_predictions(
    challenger: pd.DataFrame,
    champion: pd.DataFrame,
    params: Params,
    *,
    min_paired: int = MIN_PAIRED_UTTERANCES,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Challenger vs champion on their common utterances with the study's paired tests (no server).

    `challenger` and `champion` are out-of-fold prediction tables (evaluate.metrics.PREDICTION_COLUMNS; their
    `system` column is replaced). They are paired per dimension on utterance ids present in both (labels
    must agree: otherwise it is not the same evaluation data), then sermtl.evaluate.significance runs with the
    challenger as proposed system and the champion as the only baseline (same settings: resampling, unit,
    resamples, confidence, alpha, correction over the dimensions, subset), and `promotion_decision`
    applies `registry.promotion.rule`. Returns the evidence (JSON-able) including `rule_passed` and
    `reasons`; raises PromotionRefused(kind="evidence") if the two cannot be compared. `names` label the
    two in messages (e.g. {"challenger": "v3", "champion": "v2"}).
    """
    from sermtl.evaluate.significance import significance_tests

    label = {"challenger": "challenger", "champion": "champion", **(names or {})}
    frames = {
        "challenger": challenger.assign(system="challenger"),
        "champion": champion.assign(system="champion"),
    }
    promotion = params.registry.promotion
    dimensions = [
        d
        for d in params.eval.dimensions
        if d in set(frames["challenger"]["dimension"]) and d in set(frames["champion"]["dimension"])
    ]
    counts = {role: int(frame["utterance_id"].nunique()) for role, frame in frames.items()}
    if not dimensions:
        raise PromotionRefused(
            f"challenger {label['challenger']} and champion {label['champion']} share no dimension of "
            f"{list(params.eval.dimensions)}",
            "evidence",
        )
    pairs, paired = _paired_predictions(frames, dimensions, counts, label, min_paired)
    test_params = dataclasses.replace(
        params,
        eval=dataclasses.replace(params.eval, proposed_system="challenger", dimensions=dimensions),
        significance=dataclasses.replace(params.significance, baselines=["champion"]),
    )
    try:
        report = significance_tests(pairs, test_params)
    except ValueError as exc:  # e.g. duplicate predictions of an utterance in one version's artifact
        raise PromotionRefused(f"the two versions cannot be tested together: {exc}", "evidence") from exc
    decision = promotion_decision(report, promotion)
    return _evidence(report, decision, {**counts, "paired": paired})


def _paired_predictions(
    frames: Mapping[str, pd.DataFrame],
    dimensions: list[str],
    counts: Mapping[str, int],
    label: Mapping[str, str],
    min_paired: int,
) -> tuple[pd.DataFrame, int]:
    """Both tables on the (utterance, dimension) pairs they share, and the fewest shared utterances of a
    dimension; refuses (kind "evidence") too few of them or labels that differ (other evaluation data)."""
    keys = ["utterance_id", "dimension"]
    common = frames["challenger"][keys].merge(frames["champion"][keys], on=keys)
    common = common[common["dimension"].isin(dimensions)]
    per_dimension = common.groupby("dimension")["utterance_id"].nunique()
    paired = int(min((per_dimension.get(d, 0) for d in dimensions), default=0))
    if paired < min_paired:
        raise PromotionRefused(
            f"challenger {label['challenger']} has predictions for {counts['challenger']} utterances and "
            f"champion {label['champion']} for {counts['champion']}; {paired} are common to both on every "
            f"dimension, at least {min_paired} are needed to compare them on the same evaluation data",
            "evidence",
        )
    pairs = pd.concat(
        [frame.merge(common, on=keys) for frame in frames.values()],
        ignore_index=True,
    )
    labels = pairs.pivot_table(index=keys, columns="system", values="label", aggfunc="first")
    differ = labels[labels["challenger"] != labels["champion"]]
    if len(differ):
        example = ", ".join(f"{u}/{d}" for u, d in list(differ.index)[:3])
        raise PromotionRefused(
            f"labels of challenger {label['challenger']} and champion {label['champion']} differ on "
            f"{len(differ)} of {len(labels)} common (utterance, dimension) pairs (e.g. {example}): "
            "not the same evaluation data (different label thresholds or data version?)",
            "evidence",
        )
    return pairs, paired


def _evidence(report: Any, decision: PromotionDecision, utterances: dict[str, int]) -> dict[str, Any]:
    """The comparison as JSON-able evidence: settings, per-dimension results, the rule's verdict."""
    by_dimension = {
        c.dimension: {
            "uar_challenger": c.uar_proposed,
            "uar_champion": c.uar_baseline,
            "difference": c.difference,
            "ci": [c.ci_low, c.ci_high],
            "non_inferior": c.dimension in decision.non_inferior,
            "p_adjusted": c.p_adjusted[decision.test],
            "better": c.dimension in decision.better,
            "worse": c.dimension in decision.worse,
            "n": c.n,
            "clusters": c.clusters,
        }
        for c in report.comparisons
    }
    mean_challenger = sum(v["uar_challenger"] for v in by_dimension.values()) / len(by_dimension)
    mean_champion = sum(v["uar_champion"] for v in by_dimension.values()) / len(by_dimension)
    return {
        "rule": decision.rule,
        "margin": decision.margin,
        "test": decision.test,
        "unit": decision.unit,
        "confidence": decision.confidence,
        "alpha": report.params.get("alpha"),
        "correction": report.params.get("correction"),
        "resampling": report.params.get("resampling"),
        "subset": report.subset,
        "utterances": utterances,
        "dimensions": by_dimension,
        "intervals": decision.intervals,
        "non_inferior": decision.non_inferior,
        "better": decision.better,
        "worse": decision.worse,
        "mean_uar": {"challenger": mean_challenger, "champion": mean_champion},
        "rule_passed": decision.passed,
        "reasons": decision.reasons,
    }


def compare_versions(
    mlflow_client: MlflowClient,
    challenger: Any,
    champion: Any,
    params: Params,
    *,
    min_paired: int = MIN_PAIRED_UTTERANCES,
) -> dict[str, Any]:
    """Challenger vs champion version: their registered out-of-fold predictions through
    `compare_predictions`. Returns the evidence with both version numbers; raises
    PromotionRefused(kind="evidence") if a version has no predictions or the two cannot be compared.
    """
    label = {"challenger": f"v{challenger.version}", "champion": f"v{champion.version}"}
    with tempfile.TemporaryDirectory(prefix="sermtl-promotion-") as tmp:
        frames = {}
        for role, version in (("challenger", challenger), ("champion", champion)):
            frame = _version_predictions(mlflow_client, version, Path(tmp) / role)
            if frame is None:
                raise PromotionRefused(
                    f"{role} {label[role]} has no out-of-fold predictions (tag {TAG_OOF} / artifact "
                    f"{ARTIFACT_OOF} of its run): the two versions cannot be compared",
                    "evidence",
                )
            frames[role] = frame
    evidence = compare_predictions(
        frames["challenger"], frames["champion"], params, min_paired=min_paired, names=label
    )
    return {"challenger": challenger.version, "champion": champion.version, **evidence}
