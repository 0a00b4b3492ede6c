"""The statistics of a paired comparison, all computed from 12 cell counts (class x proposed right x
baseline right) per utterance pool or cluster: UARs, resampling and sign-flip tests, McNemar, the z-test,
effect sizes and Holm's correction. Reasoning: docs/design/significance.md."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from sermtl.evaluate.metrics import NUM_CLASSES
from sermtl.params import SignificanceParams

RESAMPLE_CHUNK = 65536  # resamples drawn at once: bounds memory to a few MB whatever `resamples` is
CELLS = NUM_CLASSES * 4  # (class, proposed correct, baseline correct), index class * 4 + 2 * p + b
_TIE = 1e-12  # floating-point slack when comparing resampled statistics with the observed one
EXACT_SIGN_FLIP_CLUSTERS = 16  # up to 2^16 sign patterns are enumerated rather than sampled


def cell_counts(labels: np.ndarray, proposed_correct: np.ndarray, baseline_correct: np.ndarray) -> np.ndarray:
    """The 12 counts every paired UAR statistic depends on: (class, proposed right?, baseline right?)."""
    index = (
        np.asarray(labels, dtype=np.int64) * 4
        + np.asarray(proposed_correct, dtype=np.int64) * 2
        + np.asarray(baseline_correct, dtype=np.int64)
    )
    return np.bincount(index, minlength=CELLS)


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
    index = np.asarray(clusters, dtype=np.int64) * CELLS + (
        np.asarray(labels, dtype=np.int64) * 4
        + np.asarray(proposed_correct, dtype=np.int64) * 2
        + np.asarray(baseline_correct, dtype=np.int64)
    )
    return np.bincount(index, minlength=n_clusters * CELLS).reshape(n_clusters, CELLS)


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
