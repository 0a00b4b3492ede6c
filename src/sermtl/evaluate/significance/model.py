"""What a significance study reports (significance.json): one Comparison per (baseline, dimension), read
back by the gate, the registry and `sermtl compare`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The tests whose corrected p-values can decide (GateParams.test takes one of these).
TESTS: tuple[str, ...] = ("resampling", "mcnemar", "ztest")
# Keys of Comparison.p / p_adjusted: the tests, and the z-test's opposite direction (H1: proposed < baseline).
P_VALUE_KEYS: tuple[str, ...] = (*TESTS, "ztest_opposite")
# significance.unit: what is resampled as independent. The speaker, dialog and session follow from the
# IEMOCAP utterance id (sermtl.data.corpus.UTTERANCE_ID_RE), so the tests need only the prediction table.
UNITS: tuple[str, ...] = ("utterance", "dialog", "speaker", "session")


class Verdict(NamedTuple):
    """Whether the proposed system is significantly better / worse than one baseline on one dimension."""

    better: bool
    worse: bool


@dataclass(frozen=True)
class SpeakerDifference:
    """The two systems' UARs on one speaker's utterances (over the classes that speaker has)."""

    speaker: str  # e.g. Ses01_F
    n: int
    uar_proposed: float
    uar_baseline: float
    difference: float  # uar_proposed - uar_baseline


@dataclass(frozen=True)
class Comparison:
    """The proposed system against one baseline on one dimension: effect sizes, p-values and verdicts."""

    baseline: str
    dimension: str
    n: int  # paired utterances
    uar_proposed: float
    uar_baseline: float
    difference: float  # uar_proposed - uar_baseline, in UAR units (x100 for percentage points)
    ci_low: float  # interval of `difference` at significance.confidence, resampling `unit` (see the legend)
    ci_high: float
    cohens_h: float  # 2 asin(sqrt(uar_proposed)) - 2 asin(sqrt(uar_baseline))
    discordant_proposed: int  # utterances only the proposed system gets right (McNemar's b)
    discordant_baseline: int  # utterances only the baseline gets right (McNemar's c)
    odds_ratio: float  # b / c; (b + 0.5) / (c + 0.5) when b or c is 0
    z: float  # statistic of the z-test
    p: dict[str, float]  # raw p-values, keys P_VALUE_KEYS
    p_adjusted: dict[str, float]  # after significance.correction over the (baseline, dimension) family
    better: dict[str, bool]  # per test in TESTS, at the family-wise significance.alpha
    worse: dict[str, bool]
    # Added later (reports written before read back with these defaults): what the resampling test and
    # the interval resampled (significance.unit), how many independent clusters of it there were (the
    # utterances for `utterance`), and the per-speaker UARs (no rows when the ids are not IEMOCAP's).
    unit: str = "utterance"
    clusters: int = 0
    speakers: list[SpeakerDifference] = field(default_factory=list)


@dataclass(frozen=True)
class SignificanceReport:
    """Every comparison of one study, with what is needed to read it again (significance.json)."""

    proposed: str
    baselines: list[str]
    dimensions: list[str]
    subset: str  # all | improvised
    n: dict[str, int]  # paired utterances per dimension
    params: dict[str, Any]  # the significance section used, baselines resolved
    comparisons: list[Comparison]

    def comparison(self, baseline: str, dimension: str) -> Comparison:
        for item in self.comparisons:
            if item.baseline == baseline and item.dimension == dimension:
                return item
        raise KeyError(f"no comparison of {self.proposed!r} with {baseline!r} on {dimension!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SignificanceReport:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(raw))
        if missing:
            raise ValueError(f"significance report lacks key(s) {', '.join(missing)}")
        values = {name: raw[name] for name in fields}
        values["comparisons"] = [_comparison_from_dict(item) for item in raw["comparisons"]]
        return cls(**values)


def _comparison_from_dict(raw: dict[str, Any]) -> Comparison:
    item = dict(raw)
    item["speakers"] = [SpeakerDifference(**row) for row in item.get("speakers", [])]
    item.setdefault("clusters", item.get("n", 0) if item.get("unit", "utterance") == "utterance" else 0)
    return Comparison(**item)
