"""Paired significance tests: known answers, exact references, pairing errors, the resampling unit
(calibration under speaker effects), reports and the CLI."""

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
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, uar
from sermtl.evaluate.significance import (
    EXACT_SIGN_FLIP_CLUSTERS,
    TESTS,
    SignificanceReport,
    Verdict,
    adjust,
    bootstrap_differences,
    bootstrap_p_value,
    cell_counts,
    cluster_bootstrap_differences,
    cluster_cell_counts,
    decisive,
    holm,
    mcnemar_exact,
    min_clusters,
    odds_ratio,
    paired_uars,
    permutation_differences,
    permutation_p_value,
    read_report,
    resampling_test,
    sign_flip_contributions,
    sign_flip_interval,
    sign_flip_p_value,
    sign_flips,
    significance_tests,
    to_html,
    to_markdown,
    uar_ztest,
    write_report,
)
from sermtl.params import Params
from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN

DIMENSIONS = ["arousal", "valence", "dominance"]


def make_params(**significance) -> Params:
    """The known-answer tests below are utterance-level (one speaker); the unit has tests of its own."""
    settings = {"baselines": ["baseline"], "resamples": 2000, "unit": "utterance", "resampling": "bootstrap"}
    settings.update(significance)
    base = Params()
    return dataclasses.replace(base, significance=dataclasses.replace(base.significance, **settings))


def unchecked_params(**significance) -> Params:
    """make_params without pydantic's checks: what a caller bypassing validation could pass."""
    params = make_params()
    section = object.__new__(type(params.significance))
    for field in dataclasses.fields(section):
        object.__setattr__(
            section, field.name, significance.get(field.name, getattr(params.significance, field.name))
        )
    unchecked = object.__new__(Params)
    for field in dataclasses.fields(Params):
        object.__setattr__(unchecked, field.name, getattr(params, field.name))
    object.__setattr__(unchecked, "significance", section)
    return unchecked


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
    # Params refuses these when built (pydantic); significance_tests checks them again for settings that
    # reach it some other way (an object built without validation).
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        make_params(resamples=0)
    assert "significance.resamples" in error_of(small, unchecked_params(resamples=0))
    assert "significance.confidence" in error_of(small, unchecked_params(confidence=1.5))


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
    main, per_speaker = markdown.split("Per-speaker UAR")
    lines = [line for line in main.splitlines() if line.startswith("| weak") or line.startswith("| strong")]
    assert len(lines) == 6
    assert all(line.count(" **") == 3 for line in lines if line.startswith("| weak"))
    assert all(line.count(" --") == 3 for line in lines if line.startswith("| strong"))
    assert "Holm-adjusted over the 6 (baseline, dimension) comparisons" in markdown and "`*`" in markdown
    assert "| weak | arousal | Ses01_F | 2000 | 0.600 | 0.400 | +20.0 |" in per_speaker  # one speaker
    page = to_html(mixed_report)
    assert page.count("data:image/png;base64,") == 2 and page.count("<tr>") == 7 + 7
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


# --- McNemar's direction -----------------------------------------------------------------------------------


def test_mcnemar_direction_follows_the_discordant_counts_not_the_uar_difference():
    """More accurate (b = 132 > c = 68, p ~ 1e-5) yet 2.4 points lower in UAR: McNemar says better."""
    # per class: (proposed right, baseline right) -> count; class 0 is large, classes 1 and 2 small
    cells = {
        0: {(1, 1): 600, (1, 0): 132, (0, 1): 53, (0, 0): 215},
        1: {(1, 1): 60, (1, 0): 0, (0, 1): 8, (0, 0): 32},
        2: {(1, 1): 60, (1, 0): 0, (0, 1): 7, (0, 0): 33},
    }
    labels, proposed, baseline = [], [], []
    for k, table in cells.items():
        for (right_p, right_b), count in table.items():
            labels += [k] * count
            proposed += [k if right_p else (k + 1) % 3] * count
            baseline += [k if right_b else (k + 2) % 3] * count
    labels, proposed, baseline = (np.array(v) for v in (labels, proposed, baseline))
    report = significance_tests(
        frame(labels, {"mtl_attention": proposed, "baseline": baseline}), make_params()
    )
    for c in report.comparisons:
        assert (c.discordant_proposed, c.discordant_baseline) == (132, 68)
        assert c.difference == pytest.approx(-0.0237, abs=5e-4)  # lower UAR ...
        assert (
            c.p["mcnemar"] == pytest.approx(stats.binomtest(132, 200, 0.5).pvalue) and c.p["mcnemar"] < 1e-4
        )
        assert c.better["mcnemar"] and not c.worse["mcnemar"]  # ... but right more often
    assert set(decisive(report, "mcnemar").values()) == {Verdict(better=True, worse=False)}


# --- the resampling unit -----------------------------------------------------------------------------------

SPEAKERS = [f"Ses{s:02d}_{g}" for s in range(1, 6) for g in "FM"]
CLASS_SHARES = np.array([0.3, 0.45, 0.25])


def speaker_frame(
    per_speaker: list[tuple[np.ndarray, dict[str, np.ndarray]]], dialogs: int = 1
) -> pd.DataFrame:
    """Prediction table over IEMOCAP speakers: (labels, {system: predictions}) per speaker of SPEAKERS."""
    parts = []
    for speaker, (labels, systems) in zip(SPEAKERS, per_speaker, strict=False):
        session, letter = int(speaker[3:5]), speaker[-1]
        ids = [f"Ses{session:02d}F_impro{1 + i % dialogs:02d}_{letter}{i:03d}" for i in range(len(labels))]
        for system, predictions in systems.items():
            parts.append(
                pd.DataFrame(
                    {
                        "utterance_id": ids,
                        "system": system,
                        "fold": session - 1,
                        "test_session": session,
                        "dimension": "arousal",
                        "improvised": True,
                        "label": labels,
                        "prediction": predictions,
                        "prob_low": 1 / 3,
                        "prob_medium": 1 / 3,
                        "prob_high": 1 / 3,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True).astype(PREDICTION_COLUMNS)


def arousal_only(params: Params) -> Params:
    return dataclasses.replace(params, eval=dataclasses.replace(params.eval, dimensions=["arousal"]))


def per_speaker_accuracies(rng, accuracies: list[tuple[float, float]], n: int = 60):
    out = []
    for accuracy_p, accuracy_b in accuracies:
        labels = rng.choice(3, size=n, p=CLASS_SHARES)
        out.append(
            (
                labels,
                {
                    "mtl_attention": with_accuracy(labels, accuracy_p, rng),
                    "baseline": with_accuracy(labels, accuracy_b, rng),
                },
            )
        )
    return out


def test_default_unit_is_the_speaker_with_the_exact_sign_flip_test():
    settings = Params().significance
    assert (settings.unit, settings.resampling) == ("speaker", "permutation")
    # every speaker favours the proposed system: the exact test's smallest p, 2 / 2^10
    rng = np.random.default_rng(20)
    data = per_speaker_accuracies(rng, [(0.7 + 0.01 * j, 0.5) for j in range(10)])
    report = significance_tests(speaker_frame(data), arousal_only(Params()))
    (c,) = report.comparisons
    assert report.params["unit"] == "speaker" and (c.unit, c.clusters) == ("speaker", 10)
    assert c.p["resampling"] == pytest.approx(2 / 1024) and c.better["resampling"]
    assert 0 < c.ci_low < c.difference < c.ci_high
    assert [s.speaker for s in c.speakers] == SPEAKERS
    for s, (labels, systems) in zip(c.speakers, data, strict=True):
        assert s.n == len(labels)
        assert s.uar_proposed == pytest.approx(uar(labels, systems["mtl_attention"]))
        assert s.uar_baseline == pytest.approx(uar(labels, systems["baseline"]))
        assert s.difference == pytest.approx(s.uar_proposed - s.uar_baseline)
    markdown = to_markdown(report)
    assert "resampling unit: speaker" in markdown and "all 2^10 sign patterns enumerated" in markdown
    assert "| baseline | arousal | 600 | 10 |" in markdown  # n, then the number of speakers
    assert "| baseline | arousal | Ses03_M | 60 |" in markdown
    page = to_html(report)
    assert page.count("data:image/png;base64,") == 2 and "<td>Ses05_M</td>" in page


def test_sign_flip_p_matches_brute_force_swaps_of_whole_speakers():
    """Swap the two systems' predictions for every subset of 6 speakers; compute UAR from scratch."""
    rng = np.random.default_rng(21)
    data = per_speaker_accuracies(
        rng, [(0.7, 0.5), (0.6, 0.55), (0.5, 0.6), (0.8, 0.4), (0.55, 0.5), (0.65, 0.6)], n=40
    )
    labels = np.concatenate([d[0] for d in data])
    first = np.concatenate([d[1]["mtl_attention"] for d in data])
    second = np.concatenate([d[1]["baseline"] for d in data])
    speaker = np.repeat(np.arange(6), 40)
    observed = uar(labels, first) - uar(labels, second)
    extreme = 0
    for swap in itertools.product([False, True], repeat=6):
        swapped = np.asarray(swap)[speaker]
        a, b = np.where(swapped, second, first), np.where(swapped, first, second)
        extreme += abs(uar(labels, a) - uar(labels, b)) >= abs(observed) - 1e-12
    counts = cluster_cell_counts(speaker, labels, first == labels, second == labels, 6)
    flips = sign_flips(counts, 10, np.random.default_rng(0))
    assert flips.exact and flips.shares.size == 64
    assert sign_flip_p_value(flips, observed) == extreme / 64
    assert sign_flip_contributions(counts)[0].sum() == pytest.approx(observed)
    assert sign_flip_contributions(counts)[1].sum() == pytest.approx(1.0)
    # the same through the report (correction none: one comparison)
    params = arousal_only(make_params(unit="speaker", resampling="permutation", correction="none"))
    report = significance_tests(speaker_frame(data), params)
    assert report.comparisons[0].p["resampling"] == extreme / 64


def test_sampled_sign_flips_above_the_exact_limit_agree_with_enumeration():
    rng = np.random.default_rng(22)
    counts = rng.integers(0, 30, size=(EXACT_SIGN_FLIP_CLUSTERS, 12))
    exact = sign_flips(counts, 0, rng)
    observed = exact.shares[0] * 0.3  # somewhere inside the distribution
    sampled = sign_flips(np.vstack([counts, np.zeros((1, 12), dtype=np.int64)]), 200_000, rng)
    assert exact.exact and not sampled.exact and sampled.shares.size == 200_000
    assert sign_flip_p_value(sampled, observed) == pytest.approx(
        sign_flip_p_value(exact, observed), abs=0.005
    )


def test_cluster_bootstrap_agrees_with_resampling_speakers_naively():
    rng = np.random.default_rng(23)
    sizes = [30, 80, 50, 60, 40, 70]
    data = [
        per_speaker_accuracies(rng, [(0.5 + 0.05 * j, 0.6 - 0.03 * j)], n=n)[0] for j, n in enumerate(sizes)
    ]
    naive = []
    for _ in range(3000):
        pick = rng.integers(0, 6, 6)
        labels = np.concatenate([data[j][0] for j in pick])
        a = np.concatenate([data[j][1]["mtl_attention"] for j in pick])
        b = np.concatenate([data[j][1]["baseline"] for j in pick])
        naive.append(uar(labels, a) - uar(labels, b))
    counts = np.stack(
        [cell_counts(lab, sys["mtl_attention"] == lab, sys["baseline"] == lab) for lab, sys in data]
    )
    fast = cluster_bootstrap_differences(counts, 3000, rng, chunk=700)
    assert np.mean(fast) == pytest.approx(np.mean(naive), abs=0.005)
    assert np.std(fast) == pytest.approx(np.std(naive), rel=0.08)
    assert np.quantile(fast, [0.025, 0.975]) == pytest.approx(np.quantile(naive, [0.025, 0.975]), abs=0.015)


def test_sign_flip_interval_is_the_inverted_test():
    rng = np.random.default_rng(24)
    for trial in range(5):
        counts = simulated_speakers(rng, 0.04, effect=0.02 * trial)
        proposed, baseline = paired_uars(counts.sum(axis=0))
        observed = float(proposed - baseline)
        flips = sign_flips(counts, 0, rng)
        low, high = sign_flip_interval(flips, observed, 0.95)
        assert low < observed < high
        assert (low > 0 or high < 0) == (sign_flip_p_value(flips, observed) <= 0.05)
        assert sign_flip_p_value(flips, observed, shift=low + 1e-6) > 0.05
        assert sign_flip_p_value(flips, observed, shift=low - 1e-3) <= 0.05


def simulated_speakers(rng: np.random.Generator, sd: float, effect: float = 0.0) -> np.ndarray:
    """Cell counts (10 speakers x 12) of one simulated study with speaker-level random effects.

    Each speaker has 100-1000 utterances of 3 classes; both systems' accuracy on a speaker is 0.6 plus a
    shared speaker effect (sd 0.08) plus a system-specific one (sd `sd`, mean 0: no true difference
    unless `effect` is added to the proposed system). Given the speaker, half the utterances are equally
    hard for both systems (their correctness is correlated, as real systems' is), the rest independent.
    """
    k = len(SPEAKERS)
    n = rng.integers(100, 1001, size=k)
    shared = rng.normal(0, 0.08, size=k)
    p_a = np.clip(0.6 + effect + shared + rng.normal(0, sd, size=k), 0.05, 0.95)
    p_b = np.clip(0.6 + shared + rng.normal(0, sd, size=k), 0.05, 0.95)
    both = 0.5 * np.minimum(p_a, p_b) + 0.5 * p_a * p_b
    joint = np.stack([1 - p_a - p_b + both, p_b - both, p_a - both, both], axis=1)  # (p, b) 00 01 10 11
    return rng.multinomial(n, (CLASS_SHARES[None, :, None] * joint[:, None, :]).reshape(k, 12))


@pytest.mark.parametrize("sd", [0.02, 0.04])
def test_default_unit_keeps_the_false_positive_rate_of_a_study_without_difference(sd):
    """400 simulated studies with speaker effects and no true difference, at alpha 0.05 (uncorrected).

    The default (speaker sign flips) is exact, so about 0.05; resampling utterances (what the tests did
    before significance.unit) calls far more of them significant.
    """
    default = dataclasses.replace(Params().significance, resamples=999)
    assert default.unit == "speaker"  # the simulation below is of speakers
    rng = np.random.default_rng(int(sd * 1000))
    studies = 400
    default_hits = utterance_hits = 0
    for _ in range(studies):
        counts = simulated_speakers(rng, sd)
        pooled = counts.sum(axis=0)
        p, _, _ = resampling_test(pooled, counts, default, rng)
        default_hits += p < 0.05
        proposed, baseline = paired_uars(pooled)
        utterance_p = permutation_p_value(permutation_differences(pooled, 999, rng), proposed - baseline)
        utterance_hits += utterance_p < 0.05
    default_rate, utterance_rate = default_hits / studies, utterance_hits / studies
    print(
        f"speaker effect sd {sd}: false-positive rate {default_rate:.3f} ({default.unit}, "
        f"{default.resampling}) vs {utterance_rate:.3f} (utterance)"
    )
    assert default_rate <= 0.08
    assert utterance_rate > 0.12


def test_default_interval_covers_a_true_difference_at_its_confidence():
    """300 simulated studies with a true 3-point difference and speaker effects of sd 0.04: the default's
    interval (the inverted sign-flip test) misses it about 5% of the time; a percentile cluster bootstrap
    over the 10 speakers (printed beside it) misses it about twice as often."""
    default = dataclasses.replace(Params().significance, resamples=999)
    rng = np.random.default_rng(27)
    studies = 300
    missed = missed_bootstrap = 0
    for _ in range(studies):
        counts = simulated_speakers(rng, 0.04, effect=0.03)
        _, low, high = resampling_test(counts.sum(axis=0), counts, default, rng)
        missed += not low <= 0.03 <= high
        low, high = np.quantile(cluster_bootstrap_differences(counts, 999, rng), [0.025, 0.975])
        missed_bootstrap += not low <= 0.03 <= high
    print(
        f"non-coverage at 95%: {missed / studies:.3f} (default), "
        f"{missed_bootstrap / studies:.3f} (percentile cluster bootstrap)"
    )
    assert missed / studies <= 0.08


def test_too_few_clusters_and_foreign_ids_are_errors_naming_the_unit():
    rng = np.random.default_rng(25)
    predictions = speaker_frame(per_speaker_accuracies(rng, [(0.8, 0.4)] * 10))
    with pytest.raises(ValueError, match=r"significance.unit: 'session' gives only 5 session\(s\)") as caught:
        significance_tests(predictions, arousal_only(make_params(unit="session")))
    assert "needs at least 6 sessions" in str(caught.value)  # one comparison: 2 / 2^6 < 0.05
    assert min_clusters(12, 0.05) == 9 and min_clusters(1, 0.05) == 6 and min_clusters(3, 0.05) == 7
    nine = speaker_frame(per_speaker_accuracies(rng, [(0.8, 0.4)] * 9))
    twelve = dataclasses.replace(
        make_params(unit="speaker"), eval=dataclasses.replace(Params().eval, dimensions=["arousal"])
    )
    assert significance_tests(nine, twelve).comparisons[0].clusters == 9
    labels = np.zeros(30, dtype=np.int64)
    with pytest.raises(ValueError, match=r"significance.unit: 'speaker' gives only 1 speaker"):
        significance_tests(
            frame(labels, {"mtl_attention": labels, "baseline": labels}), make_params(unit="speaker")
        )
    foreign = frame(labels, {"mtl_attention": labels, "baseline": labels})
    foreign["utterance_id"] = [f"utt{i % 30}" for i in range(len(foreign))]
    with pytest.raises(ValueError, match=r"significance.unit: 'dialog' takes the dialog from IEMOCAP"):
        significance_tests(foreign, make_params(unit="dialog"))
    assert significance_tests(foreign, make_params()).comparisons[0].speakers == []  # utterance: fine


def test_dialog_unit_resamples_dialogs_with_sampled_sign_flips():
    rng = np.random.default_rng(26)
    predictions = speaker_frame(per_speaker_accuracies(rng, [(0.7, 0.5)] * 10), dialogs=4)
    for resampling in ("permutation", "bootstrap"):
        params = arousal_only(make_params(unit="dialog", resampling=resampling))
        (c,) = significance_tests(predictions, params).comparisons
        assert (c.unit, c.clusters) == ("dialog", 20)  # 4 dialogs per session, shared by both speakers
        assert c.ci_low < c.difference < c.ci_high and c.better["resampling"]
    assert "B = 2000 random sign patterns" in to_markdown(
        significance_tests(predictions, arousal_only(make_params(unit="dialog", resampling="permutation")))
    )


def test_reports_without_the_unit_fields_still_read(mixed_report, tmp_path):
    raw = mixed_report.to_dict()
    for item in raw["comparisons"]:
        for key in ("unit", "clusters", "speakers"):
            del item[key]
    del raw["params"]["unit"]
    old = SignificanceReport.from_dict(json.loads(json.dumps(raw)))
    assert all(c.unit == "utterance" and c.clusters == c.n and c.speakers == [] for c in old.comparisons)
    assert decisive(old, "resampling") == decisive(mixed_report, "resampling")
    assert "Per-speaker" not in to_markdown(old) and to_html(old).count("data:image/png") == 1
