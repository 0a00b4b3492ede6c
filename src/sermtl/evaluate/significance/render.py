"""significance.md and significance.html: the comparison table, its legend, a forest plot and the
per-speaker differences, drawn with sermtl.reports."""

from __future__ import annotations

import html

import numpy as np

from sermtl.evaluate.significance.model import TESTS, Comparison, SignificanceReport
from sermtl.evaluate.significance.stats import EXACT_SIGN_FLIP_CLUSTERS
from sermtl.reports import html_page, inline_image, png_bytes, pyplot

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
