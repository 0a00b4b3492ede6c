"""Paired significance tests: known answers, exact references, pairing errors, reports and the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from study_builder import write_study
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.metrics import PREDICTION_COLUMNS, uar
from sermtl.params import Params
from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN
from sermtl.significance import (
    TESTS,
    SignificanceReport,
    Verdict,
    adjust,
    bootstrap_differences,
    bootstrap_p_value,
    cell_counts,
    decisive,
    holm,
    mcnemar_exact,
    odds_ratio,
    paired_uars,
    permutation_differences,
    permutation_p_value,
    read_report,
    significance_tests,
    to_html,
    to_markdown,
    uar_ztest,
    write_report,
)

DIMENSIONS = ["arousal", "valence", "dominance"]


def make_params(**significance) -> Params:
    settings = {"baselines": ["baseline"], "resamples": 2000, **significance}
    base = Params()
    return dataclasses.replace(base, significance=dataclasses.replace(base.significance, **settings))


def frame(labels: np.ndarray, systems: dict[str, np.ndarray], dimensions=DIMENSIONS) -> pd.DataFrame:
    """Prediction table: the same labels and per-system predictions on every dimension."""
    n = len(labels)
    parts = []
    for dimension in dimensions:
        for system, predictions in systems.items():
            parts.append(
                pd.DataFrame(
                    {
                        "utterance_id": [f"Ses01F_impro01_F{i:05d}" for i in range(n)],
                        "system": system,
                        "fold": 0,
                        "test_session": 1,
                        "dimension": dimension,
                        "improvised": np.arange(n) % 2 == 0,
                        "label": labels,
                        "prediction": predictions,
                        "prob_low": 1 / 3,
                        "prob_medium": 1 / 3,
                        "prob_high": 1 / 3,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True).astype(PREDICTION_COLUMNS)


def with_accuracy(labels: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly `accuracy` of each class right (at random positions), the rest a wrong class."""
    predictions = (labels + rng.integers(1, 3, size=len(labels))) % 3
    for k in range(3):
        members = np.flatnonzero(labels == k)
        right = rng.choice(members, size=round(accuracy * len(members)), replace=False)
        predictions[right] = k
    return predictions


@pytest.fixture(scope="module")
def contrast():
    """2,000 balanced utterances: `good` 80% right, `bad` 40% right, both in every class."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [700, 650, 650])
    return labels, with_accuracy(labels, 0.8, rng), with_accuracy(labels, 0.4, rng)


# --- known answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("resampling", ["bootstrap", "permutation"])
def test_identical_systems_are_not_different(contrast, resampling):
    labels, good, _ = contrast
    report = significance_tests(
        frame(labels, {"mtl_attention": good, "baseline": good}), make_params(resampling=resampling)
    )
    assert len(report.comparisons) == 3
    for c in report.comparisons:
        assert c.difference == 0 and c.ci_low <= 0 <= c.ci_high
        assert c.p["resampling"] == pytest.approx(1.0) and c.p["mcnemar"] == 1.0
        assert c.p["ztest"] == pytest.approx(0.5) and c.p_adjusted["resampling"] == 1.0
        assert c.discordant_proposed == c.discordant_baseline == 0 and c.odds_ratio == 1.0
        assert not any(c.better.values()) and not any(c.worse.values())


@pytest.mark.parametrize("resampling", ["bootstrap", "permutation"])
def test_clearly_better_system_is_better_on_every_test(contrast, resampling):
    labels, good, bad = contrast
    report = significance_tests(
        frame(labels, {"mtl_attention": good, "baseline": bad}), make_params(resampling=resampling)
    )
    for c in report.comparisons:
        assert c.uar_proposed == pytest.approx(0.8, abs=1e-3) and c.uar_baseline == pytest.approx(
            0.4, abs=1e-3
        )
        assert 0 < c.ci_low < c.difference < c.ci_high
        assert all(c.better.values()) and not any(c.worse.values())
        assert c.p["resampling"] == pytest.approx(1 / 2001)
        assert c.cohens_h > 0.8 and c.odds_ratio > 1
    assert set(decisive(report, "ztest").values()) == {Verdict(better=True, worse=False)}


def test_clearly_worse_system_is_worse_on_every_test(contrast):
    labels, good, bad = contrast
    report = significance_tests(frame(labels, {"mtl_attention": bad, "baseline": good}), make_params())
    for c in report.comparisons:
        assert c.ci_high < 0
        assert all(c.worse.values()) and not any(c.better.values())
        assert c.p["ztest"] > 0.99 and c.p_adjusted["ztest_opposite"] < 0.05
    for test in TESTS:
        assert set(decisive(report, test).values()) == {(False, True)}


def test_uar_from_cell_counts_matches_metrics():
    rng = np.random.default_rng(2)
    labels = rng.choice(3, size=500, p=[0.6, 0.3, 0.1])
    first, second = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    proposed, baseline = paired_uars(cell_counts(labels, first == labels, second == labels))
    assert proposed == pytest.approx(uar(labels, first)) and baseline == pytest.approx(uar(labels, second))
    # a class absent from the data is left out, as metrics.uar does
    two = labels % 2
    assert paired_uars(cell_counts(two, first == two, second == two))[0] == pytest.approx(uar(two, first))


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 3), (2, 9), (12, 4), (0, 15), (7, 8), (25, 13)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert float(mcnemar_exact(b, c)) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_in_report_counts_discordant_pairs():
    labels = np.zeros(20, dtype=np.int64)
    proposed = np.array([0] * 12 + [1] * 8)  # right on 0..11
    baseline = np.array([1] * 2 + [0] * 12 + [1] * 6)  # right on 2..13
    report = significance_tests(
        frame(labels, {"mtl_attention": proposed, "baseline": baseline}), make_params()
    )
    c = report.comparison("baseline", "arousal")
    assert (c.discordant_proposed, c.discordant_baseline) == (2, 2)
    assert c.p["mcnemar"] == pytest.approx(stats.binomtest(2, 4, 0.5).pvalue)
    assert odds_ratio(3, 0) == pytest.approx(3.5 / 0.5) and odds_ratio(6, 3) == 2.0


def test_ztest_matches_hand_computation():
    pooled = (0.6 + 0.5) / 2
    z = (0.6 - 0.5) / math.sqrt(pooled * (1 - pooled) * 2 / 100)
    expected = 0.5 * math.erfc(z / math.sqrt(2))
    got_z, greater, less = uar_ztest(0.6, 0.5, 100)
    assert (
        got_z == pytest.approx(z)
        and greater == pytest.approx(expected)
        and less == pytest.approx(1 - expected)
    )
    assert uar_ztest(1.0, 1.0, 50)[0] == 0.0

    # end to end: one class, so UAR = accuracy: 60 vs 50 of 100 right
    labels = np.zeros(100, dtype=np.int64)
    proposed = np.where(np.arange(100) < 60, 0, 1)
    baseline = np.where(np.arange(100) >= 50, 0, 2)
    report = significance_tests(
        frame(labels, {"mtl_attention": proposed, "baseline": baseline}, ["arousal"]),
        dataclasses.replace(
            make_params(correction="none"), eval=dataclasses.replace(Params().eval, dimensions=["arousal"])
        ),
    )
    (c,) = report.comparisons
    assert c.z == pytest.approx(z) and c.p["ztest"] == pytest.approx(expected)
    assert c.cohens_h == pytest.approx(2 * math.asin(math.sqrt(0.6)) - 2 * math.asin(math.sqrt(0.5)))


def test_holm_matches_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # running max 0.02, 0.03, 0.06, 0.06, put back in the given order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # monotone: 0.3 * 3 = 0.9 is carried to the larger raw p-values whose own products are smaller
    assert holm([0.5, 0.4, 0.3]) == pytest.approx([0.9, 0.9, 0.9])
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # capped at 1
    assert holm([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])  # ties
    assert holm([0.2]).tolist() == [0.2] and holm([]).size == 0
    rng = np.random.default_rng(3)
    p = rng.random(50) ** 3
    adjusted = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1)
    assert adjust(p, "none").tolist() == p.tolist()
    with pytest.raises(ValueError, match="finite"):
        holm([0.1, float("nan")])


def test_correction_none_leaves_p_unchanged(contrast):
    labels, good, bad = contrast
    rng = np.random.default_rng(4)
    near = np.where(rng.random(len(labels)) < 0.05, bad, good)
    report = significance_tests(
        frame(labels, {"mtl_attention": good, "baseline": near}), make_params(correction="none")
    )
    for c in report.comparisons:
        assert c.p == c.p_adjusted
    holm_report = significance_tests(frame(labels, {"mtl_attention": good, "baseline": near}), make_params())
    raw = [c.p["mcnemar"] for c in holm_report.comparisons]
    assert [c.p_adjusted["mcnemar"] for c in holm_report.comparisons] == pytest.approx(holm(raw).tolist())


def test_bootstrap_of_a_constant_difference_is_that_constant():
    labels = np.repeat(np.arange(3), 30)
    counts = cell_counts(labels, np.ones(90, bool), np.zeros(90, bool))  # always right vs always wrong
    differences = bootstrap_differences(counts, 5000, np.random.default_rng(0), chunk=777)
    assert np.all(differences == 1.0)
    assert bootstrap_p_value(differences, 1.0) == pytest.approx(1 / 5001)
    report = significance_tests(
        frame(labels, {"mtl_attention": labels, "baseline": (labels + 1) % 3}), make_params()
    )
    assert {(c.ci_low, c.ci_high, c.difference) for c in report.comparisons} == {(1.0, 1.0, 1.0)}


def test_bootstrap_interval_matches_normal_theory_for_one_class():
    # one class: UAR difference = mean of d_i = right_p - right_b, whose sd is sd(d) / sqrt(n)
    rng = np.random.default_rng(5)
    n = 4000
    labels = np.zeros(n, dtype=np.int64)
    right_p, right_b = rng.random(n) < 0.6, rng.random(n) < 0.5
    d = right_p.astype(float) - right_b
    differences = bootstrap_differences(
        cell_counts(labels, right_p, right_b), 20000, np.random.default_rng(6)
    )
    assert differences.mean() == pytest.approx(d.mean(), abs=0.002)
    assert differences.std() == pytest.approx(d.std() / math.sqrt(n), rel=0.05)
    low, high = np.quantile(differences, [0.025, 0.975])
    half = 1.959964 * d.std() / math.sqrt(n)
    assert low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_cell_count_bootstrap_agrees_with_index_resampling():
    """Multinomial cell counts are the same distribution as resampled utterance indices."""
    rng = np.random.default_rng(7)
    labels = rng.choice(3, size=300, p=[0.5, 0.35, 0.15])
    first = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 3, 300))
    second = np.where(rng.random(300) < 0.45, labels, rng.integers(0, 3, 300))
    naive = []
    for _ in range(3000):
        index = rng.integers(0, 300, 300)
        naive.append(uar(labels[index], first[index]) - uar(labels[index], second[index]))
    fast = bootstrap_differences(cell_counts(labels, first == labels, second == labels), 3000, rng)
    assert np.mean(fast) == pytest.approx(np.mean(naive), abs=0.004)
    assert np.std(fast) == pytest.approx(np.std(naive), rel=0.08)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(naive, [0.025, 0.975]), abs=0.01)


def test_permutation_p_matches_exact_enumeration():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1])
    first = np.array([0, 0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 2])
    second = np.array([0, 1, 2, 1, 0, 0, 2, 0, 1, 2, 1, 1])
    observed = uar(labels, first) - uar(labels, second)
    extreme = 0
    for swap in itertools.product([False, True], repeat=len(labels)):
        swap = np.array(swap)
        a, b = np.where(swap, second, first), np.where(swap, first, second)
        extreme += abs(uar(labels, a) - uar(labels, b)) >= abs(observed) - 1e-12
    exact = extreme / 2 ** len(labels)
    counts = cell_counts(labels, first == labels, second == labels)
    differences = permutation_differences(counts, 100000, np.random.default_rng(8))
    assert permutation_p_value(differences, observed) == pytest.approx(exact, abs=0.006)
    assert 0.01 < exact < 0.9  # a case that tests something

    params = make_params(resampling="permutation", resamples=100000, correction="none")
    report = significance_tests(frame(labels, {"mtl_attention": first, "baseline": second}), params)
    assert report.comparisons[0].p["resampling"] == pytest.approx(exact, abs=0.006)


def test_seed_determines_the_result(contrast):
    labels, good, bad = contrast
    rng = np.random.default_rng(9)
    mixed = np.where(rng.random(len(labels)) < 0.5, good, bad)
    predictions = frame(labels, {"mtl_attention": mixed, "baseline": good})
    for resampling in ("bootstrap", "permutation"):
        first = significance_tests(predictions, make_params(seed=11, resampling=resampling))
        assert significance_tests(predictions, make_params(seed=11, resampling=resampling)) == first
        other = significance_tests(predictions, make_params(seed=12, resampling=resampling))
        assert [c.ci_low for c in other.comparisons] != [c.ci_low for c in first.comparisons]


# --- pairing and input errors ----------------------------------------------------------------------------


@pytest.fixture
def small():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 3, 60)
    return frame(
        labels,
        {
            "mtl_attention": with_accuracy(labels, 0.7, rng),
            "baseline": with_accuracy(labels, 0.5, rng),
            "other": with_accuracy(labels, 0.4, rng),
        },
    )


def error_of(predictions: pd.DataFrame, params: Params) -> str:
    with pytest.raises(ValueError) as caught:
        significance_tests(predictions, params)
    return str(caught.value)


def drop(predictions: pd.DataFrame, system: str, dimension: str, suffix: str) -> pd.DataFrame:
    row = (
        (predictions.system == system)
        & (predictions.dimension == dimension)
        & predictions.utterance_id.str.endswith(suffix)
    )
    return predictions[~row]


def test_missing_utterance_in_baseline_is_named(small):
    message = error_of(drop(small, "baseline", "valence", "00007"), make_params())
    assert "baseline 'baseline' lacks 1 all utterance(s) of 'mtl_attention'" in message
    assert "dimension 'valence', e.g. Ses01F_impro01_F00007" in message


def test_extra_utterance_in_baseline_is_named(small):
    message = error_of(drop(small, "mtl_attention", "dominance", "00042"), make_params())
    assert "baseline 'baseline' has 1 all utterance(s) for dimension 'dominance'" in message
    assert "that 'mtl_attention' lacks, e.g. Ses01F_impro01_F00042" in message


def test_mismatched_labels_are_named(small):
    changed = small.copy()
    row = (
        (changed.system == "baseline")
        & (changed.dimension == "arousal")
        & changed.utterance_id.str.endswith("00003")
    )
    changed.loc[row, "label"] = (changed.loc[row, "label"] + 1) % 3
    message = error_of(changed, make_params())
    assert "labels differ between 'mtl_attention' and baseline 'baseline'" in message
    assert "dimension 'arousal' on 1 utterance(s), e.g. Ses01F_impro01_F00003" in message


def test_unknown_baseline_and_missing_proposed_are_named(small):
    message = error_of(small, make_params(baselines=["stl_mean"]))
    assert (
        "unknown baseline system 'stl_mean'; systems in the predictions: mtl_attention, baseline, other"
        in (message)
    )
    message = error_of(small, make_params(baselines=["mtl_attention"]))
    assert "baseline 'mtl_attention' is the proposed system itself" in message
    message = error_of(small[small.system != "mtl_attention"], make_params())
    assert "proposed system 'mtl_attention' has no predictions" in message


def test_duplicates_missing_dimension_and_bad_settings_are_errors(small):
    doubled = pd.concat([small, small[(small.system == "other") & (small.dimension == "valence")].head(2)])
    message = error_of(doubled, make_params(baselines=[]))
    assert "system 'other' has 2 duplicate prediction(s) for dimension 'valence'" in message
    assert "Ses01F_impro01_F00000" in message
    message = error_of(small[small.dimension != "dominance"], make_params())
    assert "no all predictions of 'mtl_attention' for dimension 'dominance'" in message
    assert "significance.resamples" in error_of(small, make_params(resamples=0))
    assert "significance.confidence" in error_of(small, make_params(confidence=1.5))


def test_empty_baselines_mean_every_other_system_and_subset_filters(small):
    report = significance_tests(small, make_params(baselines=[], subset="improvised"))
    assert report.baselines == ["baseline", "other"] and len(report.comparisons) == 6
    assert report.n == dict.fromkeys(DIMENSIONS, 30) and report.subset == "improvised"
    assert report.params["baselines"] == ["baseline", "other"]
    assert {c.n for c in report.comparisons} == {30}


# --- reports ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_report(contrast):
    """One baseline the proposed system beats, one that beats it."""
    labels, good, bad = contrast
    rng = np.random.default_rng(12)
    middle = with_accuracy(labels, 0.6, rng)
    predictions = frame(labels, {"mtl_attention": middle, "weak": bad, "strong": good})
    return significance_tests(predictions, make_params(baselines=["weak", "strong"]))


def test_json_round_trip(mixed_report, tmp_path):
    assert SignificanceReport.from_dict(json.loads(json.dumps(mixed_report.to_dict()))) == mixed_report
    paths = write_report(mixed_report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "html"}
    assert paths["json"].name == SIGNIFICANCE_JSON and read_report(tmp_path / "out") == mixed_report
    raw = json.loads(paths["json"].read_text())
    assert set(raw) == {"proposed", "baselines", "dimensions", "subset", "n", "params", "comparisons"}
    assert set(raw["comparisons"][0]["p_adjusted"]) == {"resampling", "mcnemar", "ztest", "ztest_opposite"}
    with pytest.raises(ValueError, match="lacks key"):
        SignificanceReport.from_dict({"proposed": "x"})


def test_decisive_reports_each_comparison(mixed_report):
    verdicts = decisive(mixed_report, "resampling")
    assert verdicts[("weak", "valence")] == Verdict(better=True, worse=False)
    assert verdicts[("strong", "dominance")] == Verdict(better=False, worse=True)
    assert len(verdicts) == 6
    with pytest.raises(ValueError, match="unknown test 'wilcoxon'"):
        decisive(mixed_report, "wilcoxon")


def test_markdown_and_html_show_every_comparison(mixed_report):
    markdown = to_markdown(mixed_report)
    lines = [
        line for line in markdown.splitlines() if line.startswith("| weak") or line.startswith("| strong")
    ]
    assert len(lines) == 6
    assert all(line.count(" **") == 3 for line in lines if line.startswith("| weak"))
    assert all(line.count(" --") == 3 for line in lines if line.startswith("| strong"))
    assert "Holm-adjusted over the 6 (baseline, dimension) comparisons" in markdown and "`*`" in markdown
    page = to_html(mixed_report)
    assert "data:image/png;base64," in page and page.count("<tr>") == 7
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<td>strong</td><td>arousal</td>" in page


# --- the command -----------------------------------------------------------------------------------------

ACCURACY = {
    "mtl_attention": 0.9,
    "mtl_mean": 0.6,
    "stl_attention": 0.5,
    "stl_mean": 0.4,
    "egemaps_linear": 0.3,
}


def test_cli_writes_the_three_files(tmp_path):
    write_study(tmp_path / "train", Params(), ACCURACY)
    params = tmp_path / "params.yaml"
    params.write_text(
        "profile: paper\nsignificance:\n  baselines: [mtl_mean, egemaps_linear]\n  resamples: 500\n"
    )
    out = tmp_path / "significance"
    result = CliRunner().invoke(
        app,
        ["significance", "--train-dir", str(tmp_path / "train"), "--out", str(out), "--params", str(params)],
    )
    assert result.exit_code == 0, result.output
    for name in (SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN, SIGNIFICANCE_HTML):
        assert (out / name).is_file()
    assert "| egemaps_linear | dominance | 200 |" in result.output
    report = read_report(out)
    assert report.n == dict.fromkeys(DIMENSIONS, 200) and report.baselines == ["mtl_mean", "egemaps_linear"]
    assert decisive(report, "mcnemar")[("egemaps_linear", "arousal")].better


def test_cli_missing_train_dir_is_a_clean_error(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("profile: paper\n")
    result = CliRunner().invoke(
        app,
        [
            "significance",
            "--train-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(params),
        ],
    )
    assert result.exit_code == 2
    assert "training folder not found" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_too_few_resamples_for_the_family_is_an_error_naming_the_key(contrast):
    labels, good, bad = contrast
    predictions = frame(labels, {"mtl_attention": good, "baseline": bad})
    with pytest.raises(ValueError, match=r"significance.resamples: 10 resamples can never reach alpha"):
        significance_tests(predictions, make_params(resamples=10))
