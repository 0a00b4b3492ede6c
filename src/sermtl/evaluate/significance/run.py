"""A significance study end to end: check the settings, pair the predictions, run every test on every
(baseline, dimension), correct for the family, and write or read significance.{json,md,html}."""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from sermtl.evaluate.metrics import NUM_CLASSES
from sermtl.evaluate.significance.model import (
    P_VALUE_KEYS,
    TESTS,
    UNITS,
    Comparison,
    SignificanceReport,
    Verdict,
)
from sermtl.evaluate.significance.pairing import Pair, paired_counts, resolve_baselines, speaker_differences
from sermtl.evaluate.significance.render import to_html, to_markdown
from sermtl.evaluate.significance.stats import (
    adjust,
    cohens_h,
    mcnemar_exact,
    min_clusters,
    odds_ratio,
    paired_uars,
    resampling_test,
    uar_ztest,
)
from sermtl.fsutil import write_report_files
from sermtl.params import Params, SignificanceParams
from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN

Key = tuple[str, str]  # (baseline, dimension)


def significance_tests(predictions: pd.DataFrame, params: Params) -> SignificanceReport:
    """Compare eval.proposed_system with each baseline on each of eval.dimensions
    (docs/design/significance.md).

    `predictions` follows sermtl.evaluate.metrics.PREDICTION_COLUMNS (the pooled table of results.load_runs).
    An utterance that one system lacks, or whose label differs between the two, is an error naming the
    system, the dimension and example utterances; so is a significance.unit with too few clusters for the
    resampling test ever to reach alpha after the correction.
    """
    _check_params(params)
    settings = params.significance
    proposed, baselines = resolve_baselines(predictions, params)
    sizes, pairs = paired_counts(predictions, params, proposed, baselines)
    keys = [(b, d) for b in baselines for d in params.eval.dimensions]
    family = len(keys) if settings.correction == "holm" else 1
    if family / (settings.resamples + 1) >= settings.alpha:  # the smallest corrected resampling p
        needed = int(np.ceil(family / settings.alpha))
        raise ValueError(
            f"significance.resamples: {settings.resamples} resamples can never reach alpha "
            f"{settings.alpha} over {family} comparisons; use at least {needed}"
        )
    clusters = _clusters(keys, sizes, pairs, settings, family)
    return SignificanceReport(
        proposed=proposed,
        baselines=baselines,
        dimensions=list(params.eval.dimensions),
        subset=settings.subset,
        n=sizes,
        params={**dataclasses.asdict(settings), "baselines": baselines},
        comparisons=_comparisons(keys, sizes, pairs, clusters, settings),
    )


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


def _clusters(
    keys: list[Key], sizes: dict[str, int], pairs: dict[Key, Pair], settings: SignificanceParams, family: int
) -> np.ndarray:
    """Independent clusters of significance.unit per comparison, once there are enough to reach alpha."""
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
    return clusters


def _rng(seed: int, baseline: str, dimension: str) -> np.random.Generator:
    """One stream per comparison, named not numbered: adding a baseline leaves the others' draws alone."""
    return np.random.default_rng([seed, zlib.crc32(f"{baseline}\0{dimension}".encode())])


def _comparisons(
    keys: list[Key],
    sizes: dict[str, int],
    pairs: dict[Key, Pair],
    clusters: np.ndarray,
    settings: SignificanceParams,
) -> list[Comparison]:
    """Effect sizes, raw and corrected p-values and verdicts of every comparison, in `keys` order."""
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
    better, worse = _verdicts(adjusted, settings.alpha, difference, only_p, only_b)
    h, ratio = cohens_h(uar_p, uar_b), odds_ratio(only_p, only_b)
    return [
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
            unit=settings.unit,
            clusters=int(clusters[i]),
            speakers=speaker_differences(pairs[(baseline, dimension)]),
        )
        for i, (baseline, dimension) in enumerate(keys)
    ]


def _verdicts(
    adjusted: dict[str, np.ndarray],
    alpha: float,
    difference: np.ndarray,
    only_p: np.ndarray,
    only_b: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Better and worse per test in TESTS, each significant at the family-wise alpha."""
    significant = {key: values < alpha for key, values in adjusted.items()}
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
    return better, worse


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
