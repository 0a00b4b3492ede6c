"""What `sermtl compare` produces: the StudyComparison (systems x dimensions of one study) and its
comparison.{md,html,json}: a table with the study's identity and a legend, plus two inline plots."""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.evaluate.significance import SignificanceReport
from sermtl.fsutil import write_report_files
from sermtl.reports import html_page, inline_image, png_bytes, pyplot
from sermtl.schema import CLASS_NAMES

CHANCE_UAR = 1 / 3
COMPARISON_JSON = "comparison.json"
COMPARISON_MARKDOWN = "comparison.md"
COMPARISON_HTML = "comparison.html"
MARK_ABOVE = "*"  # this system is significantly better than the proposed system
MARK_BELOW = "v"  # this system is significantly worse than the proposed system


@dataclass
class StudyComparison:
    """Systems x dimensions of one study (table: one row per system and dimension) and what identifies it."""

    table: pd.DataFrame
    study_id: str
    study_name: str
    run_name: str
    experiment_id: str
    experiment_name: str
    status: str
    started: str  # ISO 8601, UTC
    tracking_uri: str  # without user-info: this is written to comparison.json and logged
    subset: str
    proposed: str
    systems: list[str]
    dimensions: list[str]
    data_version: str | None = None
    git_commit: str | None = None
    git_dirty: str | None = None
    pipeline_run_id: str | None = None
    profile: str | None = None
    gate_test: str = "resampling"
    confidence: float = 0.95
    resamples: int = 10000
    seed: int = 0
    significance: SignificanceReport | None = None
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """Everything but the table, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "table"}
        out["significance"] = None if self.significance is None else self.significance.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        rows = json.loads(self.table.to_json(orient="records"))  # NaN -> null
        return {"study": self.metadata(), "rows": rows}

    def to_markdown(self) -> str:
        return to_markdown(self)

    def to_html(self) -> str:
        return to_html(self)


# --- reports ----------------------------------------------------------------------------------------------


def _cell(row: Mapping[str, Any]) -> str:
    if math.isnan(row["pooled_uar"]):
        return "n/a"
    text = f"{row['pooled_uar']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    if not math.isnan(row["fold_uar_mean"]):
        text += f" ({row['fold_uar_mean']:.3f} ± {row['fold_uar_std']:.3f})"
    return f"{text} {row['marker']}" if row["marker"] else text


def _grid(comparison: StudyComparison) -> tuple[list[str], list[list[str]]]:
    header = ["system", *comparison.dimensions]
    rows = []
    by_key = {(r["system"], r["dimension"]): r for r in comparison.table.to_dict(orient="records")}
    for system in comparison.systems:
        name = f"{system} (proposed)" if system == comparison.proposed else system
        rows.append([name, *(_cell(by_key[(system, d)]) for d in comparison.dimensions)])
    return header, rows


def _description(comparison: StudyComparison) -> list[str]:
    c = comparison
    commit = (c.git_commit or "unknown")[:12] + (" (dirty)" if c.git_dirty == "true" else "")
    return [
        f"study {c.study_name or c.run_name} (parent run {c.study_id}, experiment {c.experiment_name}, "
        f"{c.status}, started {c.started})",
        f"data version {c.data_version or 'unknown'}; git commit {commit}; profile {c.profile or 'unknown'}"
        + (f"; pipeline run {c.pipeline_run_id}" if c.pipeline_run_id else ""),
    ]


def _legend(comparison: StudyComparison) -> list[str]:
    c = comparison
    lines = [
        f"Cell: UAR pooled over the folds ({c.subset} test utterances) [{c.confidence:.0%} "
        f"percentile bootstrap CI, {c.resamples} resamples of utterances, seed {c.seed}] (mean ± sd of the "
        f"per-fold UARs). Chance UAR = {CHANCE_UAR:.3f}.",
    ]
    report = c.significance
    if report is not None and report.subset == c.subset:
        alpha = report.params.get("alpha")
        correction = report.params.get("correction")
        lines.append(
            f"`{MARK_ABOVE}` significantly better, `{MARK_BELOW}` significantly worse than the proposed "
            f"system {report.proposed} by the gate test ({c.gate_test}, {correction}-adjusted, family-wise "
            f"alpha {alpha}); no marker: not significant or not compared. Compared baselines: "
            f"{', '.join(report.baselines)}."
        )
    lines += list(c.notes)
    lines.append(
        "Child runs side by side in the MLflow UI: search runs with "
        f"`tags.mlflow.parentRunId = '{c.study_id}'`, select them, Compare."
    )
    return lines


def to_markdown(comparison: StudyComparison) -> str:
    """Systems by dimension, one cell per pair, with the study's identity above and a legend below."""
    header, rows = _grid(comparison)
    lines = [
        f"UAR by system and dimension ({comparison.subset} utterances)",
        "",
        *_description(comparison),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        *(f"- {line}" for line in _legend(comparison)),
    ]
    return "\n".join(lines) + "\n"


def _uar_chart(comparison: StudyComparison) -> bytes:
    plt = pyplot()
    table = comparison.table.set_index(["system", "dimension"])
    systems, dimensions = comparison.systems, comparison.dimensions
    width = 0.8 / max(len(systems), 1)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(systems) * len(dimensions)), 4.2))
    for i, system in enumerate(systems):
        rows = table.loc[[(system, d) for d in dimensions]]
        positions = np.arange(len(dimensions)) + i * width
        values = rows["pooled_uar"].to_numpy(dtype=float)
        errors = np.vstack(
            [values - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - values]
        )
        label = f"{system} (proposed)" if system == comparison.proposed else system
        axis.bar(
            positions,
            values,
            width,
            yerr=errors,
            capsize=3,
            label=label,
            hatch="//" if system == comparison.proposed else None,
            edgecolor="black" if system == comparison.proposed else None,
        )
        for x, top, marker in zip(positions, rows["ci_high"].to_numpy(float), rows["marker"], strict=True):
            if marker:
                axis.text(x, top + 0.01, marker, ha="center", va="bottom", fontsize=10)
    axis.axhline(CHANCE_UAR, color="grey", linestyle="--", linewidth=1, label="chance (1/3)")
    axis.set_xticks(np.arange(len(dimensions)) + 0.4 - width / 2, dimensions)
    axis.set_ylabel(f"pooled UAR ({comparison.confidence:.0%} bootstrap CI)")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8, ncol=min(len(systems) + 1, 5), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return png_bytes(figure, dpi=110)


def _confusion_grid(comparison: StudyComparison) -> bytes:
    plt = pyplot()
    by_key = {(r["system"], r["dimension"]): r for r in comparison.table.to_dict(orient="records")}
    systems, dimensions = comparison.systems, comparison.dimensions
    figure, axes = plt.subplots(
        len(systems), len(dimensions), figsize=(3.1 * len(dimensions), 2.9 * len(systems)), squeeze=False
    )
    for (i, system), (j, dimension) in ((a, b) for a in enumerate(systems) for b in enumerate(dimensions)):
        axis, row = axes[i, j], by_key[(system, dimension)]
        counts = np.asarray(row["confusion"], dtype=np.float64)
        support = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
        axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, k), count in np.ndenumerate(counts):
            colour = "white" if share[r, k] > 0.5 else "black"
            axis.text(k, r, str(int(count)), ha="center", va="center", fontsize=8, color=colour)
        axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
        axis.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
        if i == len(systems) - 1:
            axis.set_xlabel("predicted", fontsize=8)
        if j == 0:
            axis.set_ylabel(f"{system}\ntrue", fontsize=8)
        axis.set_title(f"{dimension}  UAR {row['pooled_uar']:.3f}", fontsize=9)
    figure.suptitle(f"Pooled confusion matrices ({comparison.subset} utterances; rows normalised, counts)")
    figure.tight_layout()
    return png_bytes(figure, dpi=80)


def to_html(comparison: StudyComparison) -> str:
    """A self-contained page (no external resources): the table, its legend and two inline PNG plots."""
    header, rows = _grid(comparison)
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
        + "".join(
            "<tr>"
            + f"<th>{html.escape(row[0])}</th>"
            + "".join(f"<td>{html.escape(v)}</td>" for v in row[1:])
            + "</tr>"
            for row in rows
        )
        + "</tbody></table>"
    )
    description = "".join(f"<p>{html.escape(line)}</p>" for line in _description(comparison))
    legend = "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _legend(comparison)) + "</ul>"
    chart, matrices = _uar_chart(comparison), _confusion_grid(comparison)
    body = (
        f"<h1>UAR by system and dimension ({html.escape(comparison.subset)} utterances)</h1>"
        + description
        + table
        + legend
        + inline_image(chart, "pooled UAR with bootstrap intervals")
        + inline_image(matrices, "pooled confusion matrices")
    )
    return html_page("sermtl comparison", body, "table{margin:0}th{text-align:left}")


# --- outputs ----------------------------------------------------------------------------------------------


def write_comparison(comparison: StudyComparison, out_dir: Path) -> dict[str, Path]:
    """comparison.{md,html,json} in out_dir, each written atomically, the JSON last; other files stay."""
    return write_report_files(
        out_dir,
        (COMPARISON_MARKDOWN, to_markdown(comparison)),
        (COMPARISON_HTML, to_html(comparison)),
        (COMPARISON_JSON, comparison.to_dict()),
    )
