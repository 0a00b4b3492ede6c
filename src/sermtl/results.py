"""The study's results table: every system by dimension, per fold and pooled over the folds.

Reads the run directories that `sermtl train` writes (artifacts/train/<system>/fold<k>/), checks that
the study is complete, and writes the pooled predictions (input of the significance tests), a JSON
table, Markdown for the terminal and KFP, and an HTML page with a chart.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir
from sermtl.metrics import evaluate_predictions, validate_predictions
from sermtl.params import Params
from sermtl.schema import PREDICTIONS_FILE, RUN_METRICS_FILE

CHANCE_UAR = 1 / 3
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
RESULTS_HTML = "results.html"
POOLED_PREDICTIONS = "predictions.parquet"
STUDY_RECORD = "study.json"  # written beside the table by pipeline_runner.collect_step (its STUDY_FILE)
# What a results folder holds; one of an earlier sermtl (no marker) is known by its results.json.
RESULTS_OUTPUT = OutputKind.of(
    "results",
    (POOLED_PREDICTIONS, RESULTS_JSON, RESULTS_MARKDOWN, RESULTS_HTML, STUDY_RECORD),
    (RESULTS_JSON,),
)


def run_dir(train_dir: Path, system: str, fold: int) -> Path:
    return Path(train_dir) / system / f"fold{fold}"


def load_runs(train_dir: Path, params: Params) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """All predictions and fold metrics of the study; an incomplete study is an error naming the gaps."""
    folds = range(len(params.data.sessions))
    missing = [
        f"{system}/fold{fold}"
        for system in params.systems
        for fold in folds
        if not (run_dir(train_dir, system, fold) / PREDICTIONS_FILE).is_file()
        or not (run_dir(train_dir, system, fold) / RUN_METRICS_FILE).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{train_dir}: study incomplete, no finished run for {', '.join(missing)}")
    frames, fold_metrics = [], []
    for system in params.systems:
        for fold in folds:
            path = run_dir(train_dir, system, fold)
            frames.append(
                validate_predictions(pd.read_parquet(path / PREDICTIONS_FILE), str(path / PREDICTIONS_FILE))
            )
            fold_metrics.append(json.loads((path / RUN_METRICS_FILE).read_text()))
    return pd.concat(frames, ignore_index=True), fold_metrics


def results_table(
    predictions: pd.DataFrame, fold_metrics: list[dict[str, Any]], params: Params
) -> pd.DataFrame:
    """One row per (system, subset, dimension): pooled metrics and the spread of UAR over folds."""
    rows = []
    for system, frame in predictions.groupby("system", sort=False):
        pooled = evaluate_predictions(frame)
        for subset, by_dimension in pooled.items():
            for dimension in params.eval.dimensions:
                fold_uars = [
                    m["evaluation"][subset][dimension]["uar"]
                    for m in fold_metrics
                    if m["system"] == system and dimension in m["evaluation"].get(subset, {})
                ]
                values = by_dimension[dimension]
                rows.append(
                    {
                        "system": system,
                        "proposed": system == params.eval.proposed_system,
                        "subset": subset,
                        "dimension": dimension,
                        "pooled_uar": values["uar"],
                        "pooled_weighted_accuracy": values["weighted_accuracy"],
                        "pooled_macro_f1": values["macro_f1"],
                        "fold_uar_mean": float(np.nanmean(fold_uars)),
                        "fold_uar_std": float(np.nanstd(fold_uars, ddof=1)) if len(fold_uars) > 1 else 0.0,
                        "folds": len(fold_uars),
                        "n": values["n"],
                        "confusion": values["confusion"],
                    }
                )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, subset: str = "all") -> str:
    """Systems by dimension: pooled UAR, with mean ± sd over folds; the proposed system is starred."""
    frame = table[table["subset"] == subset]
    dimensions = list(dict.fromkeys(frame["dimension"]))
    lines = [
        f"UAR ({subset} utterances; pooled over folds, then mean ± sd over folds; chance = {CHANCE_UAR:.3f})",
        "",
        "| system | " + " | ".join(dimensions) + " |",
        "|---|" + "---|" * len(dimensions),
    ]
    for system, rows in frame.groupby("system", sort=False):
        cells = []
        for dimension in dimensions:
            row = rows[rows["dimension"] == dimension].iloc[0]
            cells.append(f"{row['pooled_uar']:.3f} ({row['fold_uar_mean']:.3f} ± {row['fold_uar_std']:.3f})")
        name = f"**{system}** *" if rows["proposed"].iloc[0] else system
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart_png(table: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = table[table["subset"] == "all"]
    systems = list(dict.fromkeys(frame["system"]))
    dimensions = list(dict.fromkeys(frame["dimension"]))
    width = 0.8 / len(systems)
    figure, axis = plt.subplots(figsize=(8, 4))
    for i, system in enumerate(systems):
        rows = frame[frame["system"] == system].set_index("dimension").loc[dimensions]
        positions = np.arange(len(dimensions)) + i * width
        axis.bar(positions, rows["pooled_uar"], width, yerr=rows["fold_uar_std"], label=system, capsize=2)
    axis.axhline(CHANCE_UAR, color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks(np.arange(len(dimensions)) + 0.4 - width / 2, dimensions)
    axis.set_ylabel("UAR (pooled; error bar: sd over folds)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def to_html(table: pd.DataFrame) -> str:
    import html

    chart = base64.b64encode(_chart_png(table)).decode()
    sections = []
    for subset in dict.fromkeys(table["subset"]):
        frame = table[table["subset"] == subset].drop(columns=["confusion", "subset"])
        sections.append(
            f"<h2>{html.escape(subset)} utterances</h2>" + frame.to_html(index=False, float_format="%.3f")
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sermtl results</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        "<h1>Speech emotion recognition: systems by dimension</h1>"
        f"<img alt='UAR by system and dimension' src='data:image/png;base64,{chart}'>"
        + "".join(sections)
        + "</body></html>\n"
    )


def collect_results(
    train_dir: Path, out_dir: Path, params: Params, store_dir: Path | None = None
) -> pd.DataFrame:
    """Write the study's pooled predictions and results table (JSON, Markdown, HTML) atomically.

    `store_dir` (the ingest folder, when the caller reads it too) is only checked not to overlap `out_dir`.
    """
    check_output_dir(out_dir, RESULTS_OUTPUT, [("train folder", train_dir), ("ingest folder", store_dir)])
    predictions, fold_metrics = load_runs(train_dir, params)
    table = results_table(predictions, fold_metrics, params)
    with atomic_directory(out_dir, RESULTS_OUTPUT) as staging:
        predictions.to_parquet(staging / POOLED_PREDICTIONS, index=False)
        (staging / RESULTS_JSON).write_text(table.to_json(orient="records", indent=2) + "\n")
        (staging / RESULTS_MARKDOWN).write_text(
            to_markdown(table, "all") + "\n" + to_markdown(table, "improvised")
        )
        (staging / RESULTS_HTML).write_text(to_html(table))
    return table
