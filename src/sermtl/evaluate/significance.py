"""Paired significance tests of the proposed system against each baseline, per dimension.

Design notes (why it is built this way): docs/design/significance.md.
"""

from __future__ import annotations

import dataclasses
import html
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from sermtl.data.corpus import UTTERANCE_ID_RE
from sermtl.evaluate.metrics import NUM_CLASSES
from sermtl.fsutil import write_report_files
from sermtl.params import Params, SignificanceParams
from sermtl.reports import html_page, inline_image, png_bytes, pyplot
from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN

# The tests whose corrected p-values can decide (GateParams.test takes one of these).
TESTS: tuple[str, ...] = ("resampling", "mcnemar", "ztest")
# Keys of Comparison.p / p_adjusted: the tests, and the z-test's opposite direction (H1: proposed < baseline).
P_VALUE_KEYS: tuple[str, ...] = (*TESTS, "ztest_opposite")
RESAMPLE_CHUNK = 65536  # resamples drawn at once: bounds memory to a few MB whatever `resamples` is
_CELLS = NUM_CLASSES * 4  # (class, proposed correct, baseline correct), index class * 4 + 2 * p + b
_TIE = 1e-12  # floating-point slack when comparing resampled statistics with the observed one
# significance.unit: what is resampled as independent. The speaker, dialog and session follow from the
# IEMOCAP utterance id (sermtl.data.corpus.UTTERANCE_ID_RE), so the tests need only the prediction table.
UNITS: tuple[str, ...] = ("utterance", "dialog", "speaker", "session")
EXACT_SIGN_FLIP_CLUSTERS = 16  # up to 2^16 sign patterns are enumerated rather than sampled
_REQUIRED = ("utterance_id", "system", "dimension", "improvised", "label", "prediction")


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
    ci_low: float  # interval of `difference` at significance.confidence, resampling `unit` (see _legend)
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


# --- statistics on cell counts ------------------------------------------------------------------------


def cell_counts(labels: np.ndarray, proposed_correct: np.ndarray, baseline_correct: np.ndarray) -> np.ndarray:
    """The 12 counts every paired UAR statistic depends on: (class, proposed right?, baseline right?)."""
    index = (
        np.asarray(labels, dtype=np.int64) * 4
        + np.asarray(proposed_correct, dtype=np.int64) * 2
        + np.asarray(baseline_correct, dtype=np.int64)
    )
    return np.bincount(index, minlength=_CELLS)


def paired_uars(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UAR of both systems for each row of cell counts (shape (..., 12)), over the classes present.

    Same definition as sermtl.evaluate.metrics.uar: mean over classes of correct / label count.
    """
    cells = np.asarray(counts).reshape(*np.shape(counts)[:-1], NUM_CLASSES, 2, 2)
    support = cells.sum(axis=(-2, -1))
    present = support > 0
    safe = np.where(present, support, 1)
    classes = present.sum(axis=-1)
    recall_proposed = np.where(present, cells[..., 1, :].sum(axis=-1) / safe, 0.0)
    recall_baseline = np.where(present, cells[..., :, 1].sum(axis=-1) / safe, 0.0)
    return recall_proposed.sum(axis=-1) / classes, recall_baseline.sum(axis=-1) / classes


def bootstrap_differences(
    counts: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int = RESAMPLE_CHUNK
) -> np.ndarray:
    """UAR differences (proposed - baseline) over `resamples` paired bootstrap resamples of utterances.

    A resample of n utterances with replacement has Multinomial(n, cell shares) cell counts, so the
    counts are drawn directly: the same distribution as resampling indices, at O(12) per resample.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    shares = counts / n
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        proposed, baseline = paired_uars(rng.multinomial(n, shares, size=size))
        out[start : start + size] = proposed - baseline
    return out


def permutation_differences(
    counts: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int = RESAMPLE_CHUNK
) -> np.ndarray:
    """UAR differences under random swaps of the two systems' predictions per utterance (H0: exchangeable).

    Swapping a concordant utterance changes nothing; swapping one that only the proposed system got right
    moves one correct answer of its class to the baseline, and vice versa. With Sb, Sc ~ Binomial(b_k, 1/2),
    Binomial(c_k, 1/2) swapped discordant utterances of class k, the correct-count difference of class k
    becomes (b_k - c_k) - 2 Sb + 2 Sc.
    """
    cells = np.asarray(counts, dtype=np.int64).reshape(NUM_CLASSES, 2, 2)
    support = cells.sum(axis=(1, 2))
    present = support > 0
    safe = np.where(present, support, 1)
    only_proposed, only_baseline = cells[:, 1, 0], cells[:, 0, 1]
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        swapped_b = rng.binomial(only_proposed, 0.5, size=(size, NUM_CLASSES))
        swapped_c = rng.binomial(only_baseline, 0.5, size=(size, NUM_CLASSES))
        difference = (only_proposed - only_baseline) - 2 * swapped_b + 2 * swapped_c
        out[start : start + size] = np.where(present, difference / safe, 0.0).sum(axis=1) / present.sum()
    return out


def cluster_cell_counts(
    clusters: np.ndarray,
    labels: np.ndarray,
    proposed_correct: np.ndarray,
    baseline_correct: np.ndarray,
    n_clusters: int,
) -> np.ndarray:
    """Cell counts per cluster, shape (n_clusters, 12): `clusters` holds each utterance's code 0..K-1."""
    index = np.asarray(clusters, dtype=np.int64) * _CELLS + (
        np.asarray(labels, dtype=np.int64) * 4
        + np.asarray(proposed_correct, dtype=np.int64) * 2
        + np.asarray(baseline_correct, dtype=np.int64)
    )
    return np.bincount(index, minlength=n_clusters * _CELLS).reshape(n_clusters, _CELLS)


def cluster_bootstrap_differences(
    cluster_counts: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int = RESAMPLE_CHUNK
) -> np.ndarray:
    """UAR differences over `resamples` bootstrap resamples of whole clusters (speakers, dialogs, ...).

    A resample draws K of the K clusters with replacement: multiplicities ~ Multinomial(K, 1/K), drawn as
    the counts of K uniform cluster indices; its cell counts are the weighted sum of the clusters' counts
    (B x K @ K x 12). Utterances of one cluster stay together, so their dependence is kept.
    """
    counts = np.asarray(cluster_counts, dtype=np.float64)
    k = counts.shape[0]
    out = np.empty(resamples, dtype=np.float64)
    chunk = max(1, min(chunk, RESAMPLE_CHUNK * 16 // max(k, 1)))  # bounds the B x K weights too
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, k, size=(size, k)) + (np.arange(size) * k)[:, None]
        weights = np.bincount(draws.ravel(), minlength=size * k).reshape(size, k)
        proposed, baseline = paired_uars(weights @ counts)
        out[start : start + size] = proposed - baseline
    return out


def sign_flip_contributions(cluster_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's share v_j of the UAR difference (they sum to it) and its weight w_j (summing to 1).

    UAR difference = (1 / classes) sum_k (b_k - c_k) / n_k, with b_k - c_k the class's discordant
    difference, a sum over clusters. Swapping the two systems' predictions in a cluster negates its
    discordant differences and leaves the class supports n_k alone: it flips the sign of v_j. A true
    difference delta in every class would add delta n_jk to cluster j's b_jk - c_jk, i.e. delta w_j to v_j,
    with w_j = (1 / classes) sum_k n_jk / n_k.
    """
    cells = np.asarray(cluster_counts, dtype=np.float64).reshape(-1, NUM_CLASSES, 2, 2)
    per_class = cells.sum(axis=(2, 3))
    support = per_class.sum(axis=0)
    present = support > 0
    safe = np.where(present, support, 1)
    classes = present.sum()
    discordant = cells[:, :, 1, 0] - cells[:, :, 0, 1]
    shares = np.where(present, discordant / safe, 0.0).sum(axis=1) / classes
    weights = np.where(present, per_class / safe, 0.0).sum(axis=1) / classes
    return shares, weights


class SignFlips(NamedTuple):
    """Sums over clusters of signed shares (s . v) and weights (s . w) for each sign pattern s."""

    shares: np.ndarray
    weights: np.ndarray
    exact: bool  # every one of the 2^K patterns once (else `resamples` random ones)


def sign_flips(
    cluster_counts: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int = RESAMPLE_CHUNK
) -> SignFlips:
    """The cluster permutation distribution: swap the two systems' predictions for whole clusters.

    With K <= EXACT_SIGN_FLIP_CLUSTERS every one of the 2^K sign patterns is enumerated once (exact:
    `resamples` and `rng` are unused); above, `resamples` random patterns are drawn. `shares` are the
    UAR differences of the swapped data.
    """
    shares, weights = sign_flip_contributions(cluster_counts)
    both = np.stack([shares, weights], axis=1)  # (K, 2)
    k = shares.size
    if k <= EXACT_SIGN_FLIP_CLUSTERS:
        signs = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1) * 2.0 - 1.0
        sums = signs @ both
        return SignFlips(sums[:, 0], sums[:, 1], True)
    sums = np.empty((resamples, 2), dtype=np.float64)
    chunk = max(1, min(chunk, RESAMPLE_CHUNK * 16 // k))
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        sums[start : start + size] = (rng.integers(0, 2, size=(size, k)) * 2.0 - 1.0) @ both
    return SignFlips(sums[:, 0], sums[:, 1], False)


def sign_flip_p_value(flips: SignFlips, observed: float, shift: float = 0.0) -> float:
    """Two-sided p of the cluster permutation test of H0 "difference = shift" (0: no difference).

    Under H0 the shifted shares v_j - shift w_j are symmetric about 0. Exact: #{|d*| >= |d|} / 2^K (the
    identity and its mirror are among the patterns, so p >= 2 / 2^K); sampled: (1 + #) / (B + 1).
    """
    statistic = np.abs(flips.shares - shift * flips.weights)
    extreme = np.count_nonzero(statistic >= abs(observed - shift) - _TIE)
    if flips.exact:
        return float(extreme / statistic.size)
    return float((1 + extreme) / (statistic.size + 1))


def sign_flip_interval(flips: SignFlips, observed: float, confidence: float) -> tuple[float, float]:
    """Interval of the UAR difference by inverting the cluster permutation test: the shifts it does not
    reject at 1 - confidence (bisection from the observed difference outwards; within [-1, 1]).

    It excludes 0 exactly when the (unadjusted) test rejects at that level, and its coverage does not
    rest on many clusters as a percentile cluster bootstrap's does (with 10 speakers that one misses a
    true difference of 0 or 3 points about twice as often as it should; tests/test_significance.py).
    """
    level = 1 - confidence

    def accepted(shift: float) -> bool:
        return sign_flip_p_value(flips, observed, shift) > level

    def endpoint(outside: float) -> float:
        if accepted(outside):
            return outside
        inside = observed
        for _ in range(60):
            middle = (inside + outside) / 2
            if accepted(middle):
                inside = middle
            else:
                outside = middle
            if abs(outside - inside) < 1e-9:
                break
        return inside

    return endpoint(-1.0), endpoint(1.0)


def min_clusters(comparisons: int, alpha: float) -> int:
    """Fewest clusters with which a unit-level test can reach `alpha` after Holm over `comparisons`.

    Swapping the systems per cluster gives 2^K equally likely arrangements under H0, and the observed one
    and its mirror image are always as extreme as themselves, so the cluster permutation test never gives
    p < 2 / 2^K; Holm multiplies the smallest p by the family size. The same floor is applied to the
    cluster bootstrap, whose p-values are not to be trusted with fewer clusters anyway.
    """
    k = 2
    while comparisons * 2.0 / 2**k >= alpha:
        k += 1
    return k


def bootstrap_p_value(differences: np.ndarray, observed: float) -> float:
    """Two-sided p of H0 "no difference" by the shifted null: the bootstrap distribution centred on 0.

    p = (1 + #{|d* - d| >= |d|}) / (B + 1): the share of resampled differences at least as far from the
    observed one as the observed one is from 0 (Efron & Tibshirani 16.4; Koehn 2004 for MT).
    """
    extreme = np.count_nonzero(np.abs(differences - observed) >= abs(observed) - _TIE)
    return float((1 + extreme) / (differences.size + 1))


def permutation_p_value(differences: np.ndarray, observed: float) -> float:
    """Two-sided Monte Carlo permutation p: (1 + #{|d*| >= |d|}) / (B + 1), never 0 (Phipson & Smyth)."""
    extreme = np.count_nonzero(np.abs(differences) >= abs(observed) - _TIE)
    return float((1 + extreme) / (differences.size + 1))


def mcnemar_exact(only_proposed: Any, only_baseline: Any) -> np.ndarray:
    """Exact two-sided McNemar p: min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2); 1 if b + c = 0."""
    b, c = np.asarray(only_proposed), np.asarray(only_baseline)
    p = 2 * stats.binom.cdf(np.minimum(b, c), b + c, 0.5)
    return np.where(b + c > 0, np.minimum(p, 1.0), 1.0)


def uar_ztest(uar_proposed: Any, uar_baseline: Any, n: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z, p(H1: proposed > baseline), p(H1: proposed < baseline) of the customary two-proportion z-test.

    Both UARs are read as proportions over the same n utterances: pooled p = (U1 + U2) / 2,
    SE = sqrt(p (1 - p) 2 / n), z = (U1 - U2) / SE, p_greater = 1 - Phi(z), p_less = Phi(z). It ignores
    the pairing and that UAR is not a plain proportion; it is kept because papers report it. z = 0 when
    SE = 0 (both UARs 0 or both 1).
    """
    u1, u2 = np.asarray(uar_proposed, dtype=np.float64), np.asarray(uar_baseline, dtype=np.float64)
    pooled = (u1 + u2) / 2
    se = np.sqrt(pooled * (1 - pooled) * 2 / np.asarray(n, dtype=np.float64))
    z = np.divide(u1 - u2, se, out=np.zeros_like(se), where=se > 0)
    return z, stats.norm.sf(z), stats.norm.sf(-z)


def cohens_h(uar_proposed: Any, uar_baseline: Any) -> np.ndarray:
    """Cohen's h between two proportions: 2 asin(sqrt(p1)) - 2 asin(sqrt(p2))."""
    return 2 * np.arcsin(np.sqrt(uar_proposed)) - 2 * np.arcsin(np.sqrt(uar_baseline))


def odds_ratio(only_proposed: Any, only_baseline: Any) -> np.ndarray:
    """McNemar's odds ratio b / c, with 0.5 added to both cells when either is 0 (finite, JSON-safe)."""
    b, c = np.asarray(only_proposed, dtype=np.float64), np.asarray(only_baseline, dtype=np.float64)
    zero = (b == 0) | (c == 0)
    return np.where(zero, b + 0.5, b) / np.where(zero, c + 0.5, c)


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given): max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    if not np.all(np.isfinite(p)):
        raise ValueError("holm: p-values must be finite")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty_like(p)
    adjusted[order] = adjusted_sorted
    return adjusted


def adjust(p_values: Any, correction: str) -> np.ndarray:
    """Apply significance.correction (holm | none) to one test's family of p-values."""
    if correction == "holm":
        return holm(p_values)
    if correction == "none":
        return np.asarray(p_values, dtype=np.float64).copy()
    raise ValueError(f"significance.correction: {correction!r} is not one of holm, none")


# --- pairing the predictions ---------------------------------------------------------------------------


def _examples(ids: Any, k: int = 3) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(ids[:k]) + (f" ... ({len(ids)} in all)" if len(ids) > k else "")


def _check_params(params: Params) -> None:
    s = params.significance
    if s.resamples < 1:
        raise ValueError(f"significance.resamples must be at least 1, got {s.resamples}")
    if not 0 < s.confidence < 1:
        raise ValueError(f"significance.confidence must be in (0, 1), got {s.confidence}")
    if not 0 < s.alpha < 1:
        raise ValueError(f"significance.alpha must be in (0, 1), got {s.alpha}")
    for name, value, allowed in (
        ("resampling", s.resampling, ("bootstrap", "permutation")),
        ("unit", s.unit, UNITS),
        ("correction", s.correction, ("holm", "none")),
        ("subset", s.subset, ("all", "improvised")),
    ):
        if value not in allowed:
            raise ValueError(f"significance.{name}: {value!r} is not one of {', '.join(allowed)}")


def _resolve_baselines(predictions: pd.DataFrame, params: Params) -> tuple[str, list[str]]:
    proposed = params.eval.proposed_system
    systems = [str(s) for s in pd.unique(predictions["system"])]
    if proposed not in systems:
        raise ValueError(
            f"significance: proposed system {proposed!r} has no predictions; systems present: "
            f"{', '.join(systems) or 'none'}"
        )
    baselines = list(params.significance.baselines) or [s for s in systems if s != proposed]
    for baseline in baselines:
        if baseline == proposed:
            raise ValueError(f"significance: baseline {baseline!r} is the proposed system itself")
        if baseline not in systems:
            raise ValueError(
                f"significance: unknown baseline system {baseline!r}; systems in the predictions: "
                f"{', '.join(systems)}"
            )
    if not baselines:
        raise ValueError(f"significance: no baseline to compare {proposed!r} with")
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"significance: baselines listed twice: {', '.join(baselines)}")
    return proposed, baselines


def _one_system(groups: dict[tuple[str, str], pd.DataFrame], system: str, dimension: str) -> pd.DataFrame:
    frame = groups.get((dimension, system))
    if frame is None or frame.empty:
        return pd.DataFrame({"utterance_id": [], "label": [], "prediction": []})
    duplicated = frame["utterance_id"][frame["utterance_id"].duplicated()]
    if len(duplicated):
        raise ValueError(
            f"significance: system {system!r} has {len(duplicated)} duplicate prediction(s) for dimension "
            f"{dimension!r}, e.g. utterance(s) {_examples(duplicated.unique())}"
        )
    return frame


class _Pair(NamedTuple):
    """One (baseline, dimension) comparison's counts: pooled, per cluster of the unit, per speaker."""

    counts: np.ndarray  # (12,)
    units: np.ndarray | None  # (clusters, 12); None for significance.unit utterance
    speakers: list[str]
    speaker_counts: np.ndarray  # (speakers, 12); no rows when the ids are not IEMOCAP ids


def _parse_ids(
    ids: np.ndarray, cache: dict[str, tuple[str, str, str] | None]
) -> list[tuple[str, str, str] | None]:
    """(session, dialog, speaker letter) of each IEMOCAP utterance id, None where an id is not one.

    `cache` holds the ids parsed so far (the same utterances come back for every dimension).
    """
    out = []
    for uid in ids:
        uid = str(uid)
        if uid not in cache:
            match = UTTERANCE_ID_RE.match(uid)
            cache[uid] = None if match is None else (match["session"], match["dialog"], match["speaker"])
        out.append(cache[uid])
    return out


def _clusters(parts: list[tuple[str, str, str]], unit: str) -> tuple[np.ndarray, list[str]]:
    """Each utterance's cluster code 0..K-1 under `unit` (not utterance) and the K cluster names, sorted."""
    if unit == "speaker":
        names = [f"Ses{session}_{letter}" for session, _, letter in parts]  # the LAST segment's letter
    elif unit == "dialog":
        names = [dialog for _, dialog, _ in parts]
    else:
        names = [f"Ses{session}" for session, _, _ in parts]
    codes, uniques = pd.factorize(np.asarray(names, dtype=object), sort=True)
    return codes, [str(u) for u in uniques]


def _paired_counts(
    predictions: pd.DataFrame, params: Params, proposed: str, baselines: list[str]
) -> tuple[dict[str, int], dict[tuple[str, str], _Pair]]:
    """Cell counts per (baseline, dimension), after checking that the two systems pair up exactly."""
    missing = [c for c in _REQUIRED if c not in predictions.columns]
    if missing:
        raise ValueError(f"significance: prediction table lacks column(s) {', '.join(missing)}")
    frame = predictions[list(_REQUIRED)]
    for column in ("label", "prediction"):
        values = frame[column].to_numpy()
        bad = (values < 0) | (values >= NUM_CLASSES)
        if bad.any():
            raise ValueError(
                f"significance: column {column} has values outside 0..{NUM_CLASSES - 1}, e.g. utterance "
                f"{frame['utterance_id'].to_numpy()[bad][0]}"
            )
    subset = params.significance.subset
    unit = params.significance.unit
    if subset == "improvised":
        frame = frame[frame["improvised"].astype(bool)]
    frame = frame.astype({"utterance_id": "string", "system": "string", "dimension": "string"})
    groups = {
        (str(d), str(s)): g for (d, s), g in frame.groupby(["dimension", "system"], sort=False, observed=True)
    }
    sizes: dict[str, int] = {}
    counts: dict[tuple[str, str], _Pair] = {}
    parsed: dict[str, tuple[str, str, str] | None] = {}
    for dimension in params.eval.dimensions:
        reference = _one_system(groups, proposed, dimension)
        if reference.empty:
            raise ValueError(
                f"significance: no {subset} predictions of {proposed!r} for dimension {dimension!r}"
            )
        ids = pd.Index(reference["utterance_id"].to_numpy())
        labels = reference["label"].to_numpy(dtype=np.int64)
        proposed_correct = reference["prediction"].to_numpy(dtype=np.int64) == labels
        sizes[dimension] = len(ids)
        parts = _parse_ids(ids.to_numpy(), parsed)
        unparsed = np.array([part is None for part in parts], dtype=bool)
        if unparsed.any() and unit != "utterance":
            raise ValueError(
                f"significance.unit: {unit!r} takes the {unit} from IEMOCAP utterance ids (e.g. "
                f"Ses01F_impro01_F000), but {int(unparsed.sum())} of {proposed!r}'s ids for dimension "
                f"{dimension!r} are not, e.g. {_examples(ids[unparsed])}; use significance.unit: utterance"
            )
        known = [part for part in parts if part is not None]
        if unparsed.any():  # utterance unit and foreign ids: no per-speaker table
            speaker_codes, speakers = np.zeros(len(ids), dtype=np.int64), []
        else:
            speaker_codes, speakers = _clusters(known, "speaker")
        unit_codes, unit_names = (None, []) if unit == "utterance" else _clusters(known, unit)
        for baseline in baselines:
            other = _one_system(groups, baseline, dimension)
            other_ids = pd.Index(other["utterance_id"].to_numpy())
            position = other_ids.get_indexer(ids)
            if (position < 0).any():
                raise ValueError(
                    f"significance: baseline {baseline!r} lacks {int((position < 0).sum())} {subset} "
                    f"utterance(s) of {proposed!r} for dimension {dimension!r}, e.g. "
                    f"{_examples(ids[position < 0])}"
                )
            extra = ids.get_indexer(other_ids) < 0
            if extra.any():
                raise ValueError(
                    f"significance: baseline {baseline!r} has {int(extra.sum())} {subset} utterance(s) for "
                    f"dimension {dimension!r} that {proposed!r} lacks, e.g. {_examples(other_ids[extra])}"
                )
            other_labels = other["label"].to_numpy(dtype=np.int64)[position]
            differ = other_labels != labels
            if differ.any():
                raise ValueError(
                    f"significance: labels differ between {proposed!r} and baseline {baseline!r} for "
                    f"dimension {dimension!r} on {int(differ.sum())} utterance(s), e.g. "
                    f"{_examples(ids[differ])}"
                )
            baseline_correct = other["prediction"].to_numpy(dtype=np.int64)[position] == labels
            by_speaker = (
                cluster_cell_counts(speaker_codes, labels, proposed_correct, baseline_correct, len(speakers))
                if speakers
                else np.zeros((0, _CELLS), dtype=np.int64)
            )
            units = None
            if unit_codes is not None:
                units = cluster_cell_counts(
                    unit_codes, labels, proposed_correct, baseline_correct, len(unit_names)
                )
            counts[(baseline, dimension)] = _Pair(
                cell_counts(labels, proposed_correct, baseline_correct), units, speakers, by_speaker
            )
    return sizes, counts


def resampling_test(
    counts: np.ndarray, units: np.ndarray | None, settings: SignificanceParams, rng: np.random.Generator
) -> tuple[float, float, float]:
    """p, interval low, interval high of the resampling test of one comparison, as `settings` say.

    `counts` are the 12 pooled cell counts; `units` the K x 12 counts per cluster of settings.unit, None
    at the utterance level. Cluster permutation: sign flips, test-inverted interval; cluster bootstrap:
    shifted-null p, percentile interval; utterance level: as before the unit existed (the interval is
    the percentile utterance bootstrap for both tests).
    """
    proposed, baseline = paired_uars(counts)
    observed = float(proposed - baseline)
    if units is not None and settings.resampling == "permutation":
        flips = sign_flips(units, settings.resamples, rng)
        low, high = sign_flip_interval(flips, observed, settings.confidence)
        return sign_flip_p_value(flips, observed), low, high
    if units is None:
        boot = bootstrap_differences(counts, settings.resamples, rng)
    else:
        boot = cluster_bootstrap_differences(units, settings.resamples, rng)
    tail = (1 - settings.confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    if settings.resampling == "bootstrap":
        p = bootstrap_p_value(boot, observed)
    else:
        p = permutation_p_value(permutation_differences(counts, settings.resamples, rng), observed)
    return p, float(low), float(high)


def _rng(seed: int, baseline: str, dimension: str) -> np.random.Generator:
    """One stream per comparison, named not numbered: adding a baseline leaves the others' draws alone."""
    return np.random.default_rng([seed, zlib.crc32(f"{baseline}\0{dimension}".encode())])


# --- the tests -----------------------------------------------------------------------------------------


def significance_tests(predictions: pd.DataFrame, params: Params) -> SignificanceReport:
    """Compare eval.proposed_system with each baseline on each of eval.dimensions (see module docstring).

    `predictions` follows sermtl.evaluate.metrics.PREDICTION_COLUMNS (the pooled table of results.load_runs).
    An utterance that one system lacks, or whose label differs between the two, is an error naming the
    system, the dimension and example utterances; so is a significance.unit with too few clusters for the
    resampling test ever to reach alpha after the correction.
    """
    _check_params(params)
    settings = params.significance
    proposed, baselines = _resolve_baselines(predictions, params)
    sizes, pairs = _paired_counts(predictions, params, proposed, baselines)
    keys = [(b, d) for b in baselines for d in params.eval.dimensions]
    family = len(keys) if settings.correction == "holm" else 1
    if family / (settings.resamples + 1) >= settings.alpha:  # the smallest corrected resampling p
        needed = int(np.ceil(family / settings.alpha))
        raise ValueError(
            f"significance.resamples: {settings.resamples} resamples can never reach alpha "
            f"{settings.alpha} over {family} comparisons; use at least {needed}"
        )
    unit = settings.unit
    clusters = np.array([sizes[d] if unit == "utterance" else len(pairs[(b, d)].units) for b, d in keys])
    fewest = min_clusters(family, settings.alpha)
    if unit != "utterance" and clusters.min() < fewest:
        where = keys[int(np.argmin(clusters))]
        raise ValueError(
            f"significance.unit: {unit!r} gives only {clusters.min()} {unit}(s) for dimension {where[1]!r}; "
            f"a test that resamples whole {unit}s has p >= 2 / 2^{clusters.min()} and can never reach alpha "
            f"{settings.alpha} over {family} comparison(s): it needs at least {fewest} {unit}s (use a finer "
            "significance.unit, or fewer comparisons)"
        )
    table = np.stack([pairs[key].counts for key in keys])  # (comparisons, 12)
    uar_p, uar_b = paired_uars(table)
    difference = uar_p - uar_b
    cells = table.reshape(len(keys), NUM_CLASSES, 2, 2)
    only_p, only_b = cells[:, :, 1, 0].sum(axis=1), cells[:, :, 0, 1].sum(axis=1)
    n = np.array([sizes[d] for _, d in keys])
    z, p_greater, p_less = uar_ztest(uar_p, uar_b, n)

    resampled = np.array(
        [
            resampling_test(pairs[key].counts, pairs[key].units, settings, _rng(settings.seed, *key))
            for key in keys
        ]
    )  # (comparisons, 3): p, interval low, high
    raw = {
        "resampling": resampled[:, 0],
        "mcnemar": mcnemar_exact(only_p, only_b),
        "ztest": p_greater,
        "ztest_opposite": p_less,
    }
    adjusted = {key: adjust(values, settings.correction) for key, values in raw.items()}
    significant = {key: values < settings.alpha for key, values in adjusted.items()}
    better = {
        "resampling": significant["resampling"] & (difference > 0),
        # McNemar tests correctness, not UAR: its direction is b (only the proposed system right) vs c.
        "mcnemar": significant["mcnemar"] & (only_p > only_b),
        "ztest": significant["ztest"],
    }
    worse = {
        "resampling": significant["resampling"] & (difference < 0),
        "mcnemar": significant["mcnemar"] & (only_p < only_b),
        "ztest": significant["ztest_opposite"],
    }
    h, ratio = cohens_h(uar_p, uar_b), odds_ratio(only_p, only_b)
    comparisons = [
        Comparison(
            baseline=baseline,
            dimension=dimension,
            n=int(n[i]),
            uar_proposed=float(uar_p[i]),
            uar_baseline=float(uar_b[i]),
            difference=float(difference[i]),
            ci_low=float(resampled[i, 1]),
            ci_high=float(resampled[i, 2]),
            cohens_h=float(h[i]),
            discordant_proposed=int(only_p[i]),
            discordant_baseline=int(only_b[i]),
            odds_ratio=float(ratio[i]),
            z=float(z[i]),
            p={key: float(raw[key][i]) for key in P_VALUE_KEYS},
            p_adjusted={key: float(adjusted[key][i]) for key in P_VALUE_KEYS},
            better={test: bool(better[test][i]) for test in TESTS},
            worse={test: bool(worse[test][i]) for test in TESTS},
            unit=unit,
            clusters=int(clusters[i]),
            speakers=_speaker_differences(pairs[(baseline, dimension)]),
        )
        for i, (baseline, dimension) in enumerate(keys)
    ]
    return SignificanceReport(
        proposed=proposed,
        baselines=baselines,
        dimensions=list(params.eval.dimensions),
        subset=settings.subset,
        n=sizes,
        params={**dataclasses.asdict(settings), "baselines": baselines},
        comparisons=comparisons,
    )


def _speaker_differences(pair: _Pair) -> list[SpeakerDifference]:
    if not pair.speakers:
        return []
    uar_p, uar_b = paired_uars(pair.speaker_counts)
    return [
        SpeakerDifference(
            speaker=speaker,
            n=int(pair.speaker_counts[j].sum()),
            uar_proposed=float(uar_p[j]),
            uar_baseline=float(uar_b[j]),
            difference=float(uar_p[j] - uar_b[j]),
        )
        for j, speaker in enumerate(pair.speakers)
    ]


def decisive(report: SignificanceReport, test: str) -> dict[tuple[str, str], Verdict]:
    """Better/worse per (baseline, dimension) by one test's corrected p-values: what a gate decides on.

    `test` is a GateParams.test value: resampling (bootstrap or permutation, whichever the report ran),
    mcnemar or ztest. The resampling test counts as better/worse when significant, by the sign of the UAR
    difference; McNemar by b versus c (which system is right on more of the discordant utterances); the
    one-sided z-test is better when H1 proposed > baseline holds, worse when the opposite one-sided test
    (separately Holm-corrected) does.
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; valid: {', '.join(TESTS)}")
    return {(c.baseline, c.dimension): Verdict(c.better[test], c.worse[test]) for c in report.comparisons}


# --- reports -------------------------------------------------------------------------------------------

_TEST_TITLES = {"resampling": "resampling", "mcnemar": "McNemar", "ztest": "z-test"}


def _format_p(p: float) -> str:
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def _marker(comparison: Comparison, test: str, alpha: float) -> str:
    """`*`/`**` better at alpha / alpha/10, `-`/`--` worse at alpha / alpha/10 (adjusted p)."""
    if comparison.better[test]:
        return "**" if comparison.p_adjusted[test] < alpha / 10 else "*"
    if comparison.worse[test]:
        key = "ztest_opposite" if test == "ztest" else test
        return "--" if comparison.p_adjusted[key] < alpha / 10 else "-"
    return ""


def _unit(report: SignificanceReport) -> str:
    return str(report.params.get("unit", "utterance"))  # reports written before the unit: utterances


def _cluster_counts(report: SignificanceReport) -> str:
    counts = sorted({c.clusters for c in report.comparisons})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _rows(report: SignificanceReport) -> tuple[list[str], list[list[str]]]:
    alpha = report.params["alpha"]
    unit = _unit(report)
    header = [
        "baseline",
        "dimension",
        "n",
        *([f"{unit}s"] if unit != "utterance" else []),
        f"UAR {report.proposed}",
        "UAR baseline",
        f"diff (pp) [{report.params['confidence']:.0%} CI]",
        *[f"p {_TEST_TITLES[t]} (adj)" for t in TESTS],
        "Cohen's h",
        "OR (b/c)",
    ]
    rows = []
    for c in report.comparisons:
        tests = []
        for test in TESTS:
            marker = _marker(c, test, alpha)
            cell = f"{_format_p(c.p[test])} ({_format_p(c.p_adjusted[test])})"
            tests.append(f"{cell} {marker}" if marker else cell)
        rows.append(
            [
                c.baseline,
                c.dimension,
                str(c.n),
                *([str(c.clusters)] if unit != "utterance" else []),
                f"{c.uar_proposed:.3f}",
                f"{c.uar_baseline:.3f}",
                f"{100 * c.difference:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]",
                *tests,
                f"{c.cohens_h:+.3f}",
                f"{c.odds_ratio:.2f} ({c.discordant_proposed}/{c.discordant_baseline})",
            ]
        )
    return header, rows


def _speaker_rows(report: SignificanceReport) -> tuple[list[str], list[list[str]]]:
    header = ["baseline", "dimension", "speaker", "n", f"UAR {report.proposed}", "UAR baseline", "diff (pp)"]
    rows = [
        [
            c.baseline,
            c.dimension,
            s.speaker,
            str(s.n),
            f"{s.uar_proposed:.3f}",
            f"{s.uar_baseline:.3f}",
            f"{100 * s.difference:+.1f}",
        ]
        for c in report.comparisons
        for s in c.speakers
    ]
    return header, rows


def _legend(report: SignificanceReport) -> list[str]:
    s = report.params
    family = len(report.comparisons)
    unit = _unit(report)
    correction = (
        f"Holm-adjusted over the {family} (baseline, dimension) comparisons of each test"
        if s["correction"] == "holm"
        else "not adjusted"
    )
    clusters = _cluster_counts(report)
    exact = unit != "utterance" and max(c.clusters for c in report.comparisons) <= EXACT_SIGN_FLIP_CLUSTERS
    if unit == "utterance":
        where = "by utterance (each one resampled as independent)"
    else:
        where = (
            f"by {unit} ({clusters} {unit}s from the IEMOCAP utterance ids; whole {unit}s are resampled, "
            f"so the dependence among one {unit}'s utterances is kept)"
        )
    if s["resampling"] == "bootstrap" and unit == "utterance":
        resampling = (
            f"paired bootstrap of the UAR difference, B = {s['resamples']}, two-sided p by the shifted null "
            "(1 + #|d* - d| >= |d|) / (B + 1)"
        )
        interval = "percentile bootstrap interval"
    elif s["resampling"] == "bootstrap":
        resampling = (
            f"paired cluster bootstrap of the UAR difference ({unit}s drawn with replacement), "
            f"B = {s['resamples']}, two-sided p by the shifted null (1 + #|d* - d| >= |d|) / (B + 1)"
        )
        interval = f"percentile cluster bootstrap interval (too narrow with few {unit}s)"
    elif unit == "utterance":
        resampling = (
            f"paired permutation test (random swaps of the two systems' predictions per utterance), "
            f"B = {s['resamples']}, two-sided p = (1 + #|d*| >= |d|) / (B + 1)"
        )
        interval = "percentile bootstrap interval"
    else:
        patterns = (
            f"all 2^{clusters} sign patterns enumerated (exact; the smallest p is 2 / 2^{clusters})"
            if exact
            else f"B = {s['resamples']} random sign patterns, p = (1 + #|d*| >= |d|) / (B + 1)"
        )
        resampling = (
            f"sign-flip permutation test: the two systems' predictions swapped for whole {unit}s, {patterns}"
        )
        interval = "the differences that test does not reject at 1 - confidence (test inversion)"
    alpha = s["alpha"]
    return [
        f"`*` {report.proposed} significantly better at family-wise alpha = {alpha:g} "
        f"(adjusted p < alpha), `**` also at alpha/10 = {alpha / 10:g}; `-` significantly worse at alpha, "
        "`--` at alpha/10. p-values: raw (adjusted), " + correction + ".",
        f"resampling, {where}: {resampling}. CI: {interval}, of the UAR difference (percentage points).",
        "McNemar: exact two-sided binomial test on the discordant utterances (correctness, not UAR); "
        "better/worse by b vs c. OR = b/c with b (c) the utterances only the proposed system (the "
        "baseline) gets right; 0.5 is added to both when one is 0.",
        "z-test: one-sided, H1 proposed > baseline, UARs as proportions over n: z = (U1 - U2) / "
        "sqrt(q(1 - q) 2/n) with pooled q = (U1 + U2)/2; `-` when the opposite one-sided test is "
        "significant.",
        "McNemar and the z-test treat utterances as independent whatever the unit: with speakers that "
        "differ, they are too often significant for a claim about new speakers.",
    ]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def to_markdown(report: SignificanceReport) -> str:
    """The table (baseline x dimension), its legend and the per-speaker UARs: terminal, KFP, READMEs."""
    header, rows = _rows(report)
    sizes = ", ".join(f"{d} {n}" for d, n in report.n.items())
    lines = [
        f"Paired significance tests: {report.proposed} vs baselines "
        f"({report.subset} utterances; n = {sizes}; resampling unit: {_unit(report)})",
        "",
        *_markdown_table(header, rows),
        "",
        *(f"- {line}" for line in _legend(report)),
    ]
    speaker_header, speaker_rows = _speaker_rows(report)
    if speaker_rows:
        lines += [
            "",
            f"Per-speaker UAR, {report.proposed} vs each baseline (over the classes each speaker has):",
            "",
            *_markdown_table(speaker_header, speaker_rows),
        ]
    return "\n".join(lines) + "\n"


def _forest_png(report: SignificanceReport) -> bytes:
    plt = pyplot()
    comparisons = report.comparisons
    rows = np.arange(len(comparisons))[::-1]
    difference = np.array([100 * c.difference for c in comparisons])
    low = difference - np.array([100 * c.ci_low for c in comparisons])
    high = np.array([100 * c.ci_high for c in comparisons]) - difference
    colours = [
        "tab:green" if c.better["resampling"] else "tab:red" if c.worse["resampling"] else "tab:grey"
        for c in comparisons
    ]
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(comparisons) + 1.2))
    axis.errorbar(difference, rows, xerr=[low, high], fmt="none", ecolor="black", elinewidth=1, capsize=3)
    axis.scatter(difference, rows, c=colours, zorder=3)
    axis.axvline(0, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(rows, [f"{c.baseline} / {c.dimension}" for c in comparisons], fontsize=8)
    axis.set_xlabel(
        f"UAR {report.proposed} - baseline "
        f"(percentage points; {report.params['confidence']:.0%} CI by {_unit(report)})"
    )
    axis.set_title("green: better, red: worse (resampling test, adjusted)", fontsize=9)
    figure.tight_layout()
    return png_bytes(figure)


def _speakers_png(report: SignificanceReport) -> bytes:
    """Per comparison, one dot per speaker (its UAR difference) and a bar at the pooled difference."""
    plt = pyplot()
    comparisons = report.comparisons
    rows = np.arange(len(comparisons))[::-1]
    speakers = sorted({s.speaker for c in comparisons for s in c.speakers})
    colours = plt.get_cmap("tab10" if len(speakers) <= 10 else "tab20")
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(comparisons) + 1.4))
    for j, speaker in enumerate(speakers):
        points = [
            (100 * s.difference, row)
            for c, row in zip(comparisons, rows, strict=True)
            for s in c.speakers
            if s.speaker == speaker
        ]
        x, y = zip(*points, strict=True)
        axis.scatter(x, y, s=18, color=colours(j % colours.N), label=speaker, zorder=3, alpha=0.85)
    axis.scatter(
        [100 * c.difference for c in comparisons],
        rows,
        marker="|",
        s=300,
        color="black",
        label="all utterances",
    )
    axis.axvline(0, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(rows, [f"{c.baseline} / {c.dimension}" for c in comparisons], fontsize=8)
    axis.set_xlabel(f"UAR {report.proposed} - baseline per speaker (percentage points)")
    axis.set_title("per-speaker paired UAR differences; bar: all utterances", fontsize=9)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    return png_bytes(figure)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
        + "</tbody></table>"
    )


def to_html(report: SignificanceReport) -> str:
    """A self-contained page (no external resources): the table, its legend, a forest plot and the
    per-speaker differences (plot and table)."""
    header, rows = _rows(report)
    legend = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _legend(report)) + "</ul>"
    sizes = ", ".join(f"{d} {n}" for d, n in report.n.items())
    speaker_header, speaker_rows = _speaker_rows(report)
    per_speaker = ""
    if speaker_rows:
        per_speaker = (
            "<h2>Per-speaker UAR differences</h2>"
            + inline_image(_speakers_png(report), "UAR differences per speaker")
            + _html_table(speaker_header, speaker_rows)
        )
    body = (
        f"<h1>Paired significance tests: {html.escape(report.proposed)} vs baselines</h1>"
        f"<p>{html.escape(report.subset)} utterances; n = {html.escape(sizes)}; resampling unit: "
        f"{html.escape(_unit(report))}</p>"
        + inline_image(_forest_png(report), "UAR differences with confidence intervals")
        + _html_table(header, rows)
        + legend
        + per_speaker
    )
    return html_page("sermtl significance", body)


def write_report(report: SignificanceReport, out_dir: Path) -> dict[str, Path]:
    """Write significance.{json,md,html} into out_dir, each atomically; other files there are left alone.

    The JSON is written last, so a reader that finds it also finds the Markdown and HTML of that run.
    """
    return write_report_files(
        out_dir,
        (SIGNIFICANCE_MARKDOWN, to_markdown(report)),
        (SIGNIFICANCE_HTML, to_html(report)),
        (SIGNIFICANCE_JSON, report.to_dict()),
    )


def read_report(path: Path) -> SignificanceReport:
    """Load a significance.json written by write_report (a file or the folder holding it)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / SIGNIFICANCE_JSON
    return SignificanceReport.from_dict(json.loads(path.read_text()))


def run_significance(train_dir: Path, out_dir: Path, params: Params) -> SignificanceReport:
    """Load the finished study in train_dir (results.load_runs), test it and write the report."""
    from sermtl.evaluate.results import load_runs

    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: training folder not found (run `sermtl train` for every run)")
    predictions, _ = load_runs(train_dir, params)
    report = significance_tests(predictions, params)
    write_report(report, out_dir)
    return report
