"""The study's results table: every system by dimension, per fold and pooled over the folds (the pooled
predictions feed the significance tests). Seeds and their spread: docs/design/results.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.evaluate import health
from sermtl.evaluate.metrics import evaluate_predictions, validate_predictions
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir
from sermtl.params import Params
from sermtl.reports import html_page, inline_image, png_bytes, pyplot
from sermtl.schema import PREDICTIONS_FILE, RUN_METRICS_FILE, SEED_RUN_PREFIX, run_dir

SEED_RUNS_KEY = "seeds"  # of a fold's metrics.json: the seeds whose sub-runs fold<k>/seed<s>/ it averages

CHANCE_UAR = 1 / 3
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
RESULTS_HTML = "results.html"
POOLED_PREDICTIONS = "predictions.parquet"
STUDY_RECORD = "study.json"  # written beside the table by pipeline_runner.collect_step (its STUDY_FILE)
# What a results folder holds; one of an earlier sermtl (no marker) is known by its results.json.
RESULTS_OUTPUT = OutputKind.of(
    "results",
    (POOLED_PREDICTIONS, RESULTS_JSON, RESULTS_MARKDOWN, RESULTS_HTML, STUDY_RECORD, health.HEALTH_JSON),
    (RESULTS_JSON,),
)


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


def load_seed_runs(train_dir: Path, fold_metrics: list[dict[str, Any]]) -> dict[str, dict[int, pd.DataFrame]]:
    """{system: {seed: that seed's predictions pooled over the folds}} of the systems whose folds list
    seed sub-runs (metrics.json `seeds`); every fold of such a system must list the same seeds."""
    by_system: dict[str, dict[int, list[int] | None]] = {}
    for metrics in fold_metrics:
        listed = metrics.get(SEED_RUNS_KEY)
        seeds_of = by_system.setdefault(metrics["system"], {})
        seeds_of[int(metrics["fold"])] = None if listed is None else [int(seed) for seed in listed]
    runs: dict[str, dict[int, pd.DataFrame]] = {}
    for system, seeds_of_fold in by_system.items():
        folds = sorted(seeds_of_fold)
        seeds = seeds_of_fold[folds[0]]
        if seeds is None and all(seeds_of_fold[fold] is None for fold in folds):
            continue  # no seed sub-runs (eGeMAPS): one run per fold
        for fold in folds:
            if seeds_of_fold[fold] != seeds:
                named = {k: "no seeds (an earlier sermtl's run)" for k in folds if seeds_of_fold[k] is None}
                raise ValueError(
                    f"{run_dir(train_dir, system, fold)}: trained with "
                    f"{named.get(fold, f'seeds {seeds_of_fold[fold]}')}, fold {folds[0]} with "
                    f"{named.get(folds[0], f'seeds {seeds}')}; retrain the study with one train.seeds"
                )
        runs[system] = {}
        for seed in seeds:
            frames = []
            for fold in folds:
                path = run_dir(train_dir, system, fold) / f"{SEED_RUN_PREFIX}{seed}" / PREDICTIONS_FILE
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path}: missing; the fold lists seed {seed} but has no such run"
                    )
                frames.append(validate_predictions(pd.read_parquet(path), str(path)))
            runs[system][seed] = pd.concat(frames, ignore_index=True)
    return runs


def results_table(
    predictions: pd.DataFrame,
    fold_metrics: list[dict[str, Any]],
    params: Params,
    seed_runs: dict[str, dict[int, pd.DataFrame]] | None = None,
) -> pd.DataFrame:
    """One row per (system, subset, dimension): pooled metrics, the spread of UAR over folds, and over
    seeds (`seed_runs`, see load_seed_runs; a system left out of it counts as one seed)."""
    rows = []
    for system, frame in predictions.groupby("system", sort=False):
        pooled = evaluate_predictions(frame)
        per_seed = [evaluate_predictions(table) for table in (seed_runs or {}).get(system, {}).values()]
        for subset, by_dimension in pooled.items():
            for dimension in params.eval.dimensions:
                fold_uars = [
                    m["evaluation"][subset][dimension]["uar"]
                    for m in fold_metrics
                    if m["system"] == system and dimension in m["evaluation"].get(subset, {})
                ]
                values = by_dimension[dimension]
                seed_uars = [float(e[subset][dimension]["uar"]) for e in per_seed] or [float(values["uar"])]
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
                        "seed_uar_mean": float(np.mean(seed_uars)),
                        "seed_uar_std": float(np.std(seed_uars, ddof=1)) if len(seed_uars) > 1 else 0.0,
                        "seeds": len(seed_uars),
                        "seed_uars": seed_uars,
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
    if "seeds" in frame and (frame["seeds"] > 1).any():
        lines += [
            "",
            f"Spread over training seeds ({subset} utterances): the pooled UAR of each seed's own "
            "predictions, mean ± sd over the seeds (the table above scores the seed-averaged probabilities)",
            "",
            "| system | seeds | " + " | ".join(dimensions) + " |",
            "|---|---|" + "---|" * len(dimensions),
        ]
        for system, rows in frame.groupby("system", sort=False):
            cells = []
            for dimension in dimensions:
                row = rows[rows["dimension"] == dimension].iloc[0]
                spread = f" ± {row['seed_uar_std']:.3f}" if row["seeds"] > 1 else ""
                cells.append(f"{row['seed_uar_mean']:.3f}{spread}")
            name = f"**{system}** *" if rows["proposed"].iloc[0] else system
            lines.append(f"| {name} | {int(rows['seeds'].iloc[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart_png(table: pd.DataFrame) -> bytes:
    plt = pyplot()
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
    return png_bytes(figure, dpi=110)


def to_html(table: pd.DataFrame) -> str:
    import html

    sections = []
    for subset in dict.fromkeys(table["subset"]):
        frame = table[table["subset"] == subset].drop(
            columns=["confusion", "subset", "seed_uars"], errors="ignore"
        )
        sections.append(
            f"<h2>{html.escape(subset)} utterances</h2>" + frame.to_html(index=False, float_format="%.3f")
        )
    body = (
        "<h1>Speech emotion recognition: systems by dimension</h1>"
        + inline_image(_chart_png(table), "UAR by system and dimension")
        + "".join(sections)
    )
    return html_page("sermtl results", body)


def collect_results(
    train_dir: Path, out_dir: Path, params: Params, store_dir: Path | None = None
) -> pd.DataFrame:
    """Write the study's pooled predictions and results table (JSON, Markdown, HTML) atomically.

    `store_dir` (the ingest folder, when the caller reads it too) is only checked not to overlap `out_dir`.
    """
    check_output_dir(out_dir, RESULTS_OUTPUT, [("train folder", train_dir), ("ingest folder", store_dir)])
    predictions, fold_metrics = load_runs(train_dir, params)
    table = results_table(predictions, fold_metrics, params, load_seed_runs(train_dir, fold_metrics))
    fitness = health.training_health(predictions, fold_metrics)
    with atomic_directory(out_dir, RESULTS_OUTPUT) as staging:
        predictions.to_parquet(staging / POOLED_PREDICTIONS, index=False)
        (staging / RESULTS_JSON).write_text(table.to_json(orient="records", indent=2) + "\n")
        (staging / health.HEALTH_JSON).write_text(fitness.to_json(orient="records", indent=2) + "\n")
        (staging / RESULTS_MARKDOWN).write_text(
            to_markdown(table, "all")
            + "\n"
            + to_markdown(table, "improvised")
            + "\n"
            + health.to_markdown(fitness)
        )
        (staging / RESULTS_HTML).write_text(to_html(table))
    return table
