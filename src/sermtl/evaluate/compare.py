"""Compare the systems of one tracked study, read back from MLflow (`sermtl compare`), so a study trained
on a cluster can be compared anywhere that can reach its server. Reading is study_runs, the output
comparison_report; this module computes the table (pooled UAR, bootstrap intervals, significance
markers), writes and logs it, and re-exports the names `sermtl.evaluate.compare` always had."""

from __future__ import annotations

import math
import tempfile
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from sermtl.errors import redact_uri
from sermtl.evaluate.comparison_report import (
    CHANCE_UAR,
    COMPARISON_HTML,
    COMPARISON_JSON,
    COMPARISON_MARKDOWN,
    MARK_ABOVE,
    MARK_BELOW,
    StudyComparison,
    to_html,
    to_markdown,
    write_comparison,
)
from sermtl.evaluate.metrics import SUBSETS, confusion, uar
from sermtl.evaluate.significance import (
    P_VALUE_KEYS,
    SignificanceReport,
    bootstrap_differences,
    cell_counts,
    decisive,
    read_report,
    write_report,
)
from sermtl.evaluate.study_runs import (
    ARTIFACT_SIGNIFICANCE,
    PAGE_SIZE,
    CompareError,
    StudyRuns,
    find_study,
    read_study,
    select_subset,
)
from sermtl.mlops import tracking
from sermtl.params import Params, SignificanceParams
from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_JSON, SIGNIFICANCE_MARKDOWN

__all__ = [  # the public names of compare before it was split
    "ARTIFACT_COMPARISON",
    "ARTIFACT_SIGNIFICANCE",
    "CHANCE_UAR",
    "COMPARISON_HTML",
    "COMPARISON_JSON",
    "COMPARISON_MARKDOWN",
    "DEFAULT_OUT",
    "MARK_ABOVE",
    "MARK_BELOW",
    "PAGE_SIZE",
    "CompareError",
    "StudyComparison",
    "bootstrap_uar_interval",
    "compare_study",
    "find_study",
    "log_comparison",
    "log_significance",
    "run_compare",
    "to_html",
    "to_markdown",
    "write_comparison",
]

ARTIFACT_COMPARISON = "comparison"  # folder of the parent run's artifacts
DEFAULT_OUT = Path("artifacts/comparison")
_TOLERANCE = 1e-9  # pooled UAR recomputed here vs the parent's logged metric


# --- statistics -------------------------------------------------------------------------------------------


def _stream(seed: int, system: str, dimension: str) -> np.random.Generator:
    """One named random stream per (system, dimension), so adding a system leaves the others' intervals."""
    return np.random.default_rng([seed, zlib.crc32(f"compare\0{system}\0{dimension}".encode())])


def bootstrap_uar_interval(
    labels: np.ndarray, predictions: np.ndarray, resamples: int, confidence: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of one system's UAR over utterances resampled with replacement.

    Reuses the paired cell-count bootstrap of evaluate.significance with a "baseline" that is never right:
    its UAR is 0 in every resample, so the resampled differences are exactly this system's UARs.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return math.nan, math.nan
    correct = np.asarray(predictions, dtype=np.int64) == labels
    counts = cell_counts(labels, correct, np.zeros_like(correct))
    draws = bootstrap_differences(counts, resamples, rng)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def _sd(values: list[float]) -> float:
    """Sample sd over folds (ddof 1), 0 for one fold: as the results table computes it."""
    return float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0


def _order_systems(systems: set[str], proposed: str, params: Params) -> list[str]:
    known = [s for s in params.systems if s in systems and s != proposed]
    rest = sorted(systems - set(known) - {proposed})
    return ([proposed] if proposed in systems else []) + known + rest


def _markers(
    report: SignificanceReport | None, test: str, subset: str, notes: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    if report is None:
        notes.append("no significance report on the study (significance/significance.json): no markers")
        return {}
    if report.subset != subset:
        notes.append(
            f"the study's significance report compares {report.subset} utterances, not {subset}: no markers"
        )
        return {}
    out = {}
    verdicts = decisive(report, test)
    for (baseline, dimension), verdict in verdicts.items():
        item = report.comparison(baseline, dimension)
        # The verdict is the proposed system's; the marker sits on the baseline's cell, from its side.
        p = item.p_adjusted["ztest_opposite" if verdict.worse and test == "ztest" else test]
        out[(baseline, dimension)] = {
            "difference": item.difference,
            "p_adjusted": p,
            "above_proposed": verdict.worse,
            "below_proposed": verdict.better,
            "marker": MARK_ABOVE if verdict.worse else MARK_BELOW if verdict.better else "",
        }
    return out


# --- the comparison ---------------------------------------------------------------------------------------


def _tag(run: Run, key: str) -> str | None:
    return run.data.tags.get(key) or None


def compare_study(
    study: str | None = None,
    *,
    experiment: str | None = None,
    subset: str = "all",
    params: Params | None = None,
    tracking_uri: str | None = None,
) -> StudyComparison:
    """Build the systems x dimensions comparison of one study, from the tracking server alone.

    The study is a parent run carrying the `sermtl.study` tag (sermtl.mlops.tracking.start_study) with
    one child run per (system, fold):

    - fold UAR mean and sd come from the children's metrics (`test_<subset>_<dimension>_uar`);
    - pooled UAR comes from the children's `predictions.parquet` artifacts pooled over the folds, checked
      against the parent's `pooled_<system>_<subset>_<dimension>_uar` metric when the parent has one;
    - its 95% (significance.confidence) percentile bootstrap interval resamples the pooled utterances with
      the vectorised cell-count bootstrap of sermtl.evaluate.significance (fixed seed: significance.seed);
    - markers come from the parent's `significance/significance.json` (logged by `log_significance`),
      decided by registry.gate.test through sermtl.evaluate.significance.decisive.

    `params` gives registry.gate.test (markers), significance.{resamples,confidence,seed} (intervals) and
    the fallback proposed system and dimensions; the study's own logged `eval.*` params win for those.
    """
    if subset not in SUBSETS:
        raise CompareError(f"subset {subset!r} is not one of {', '.join(SUBSETS)}")
    params = params or Params()
    uri = tracking_uri or tracking.tracking_uri()
    mlflow_client = tracking.client(uri)
    parent = find_study(study, experiment=experiment, tracking_uri=uri)
    runs = read_study(mlflow_client, parent, subset, params)
    notes: list[str] = []
    systems = _order_systems(set(runs.frames), runs.proposed, params)
    if runs.proposed not in runs.frames:
        notes.append(f"the proposed system {runs.proposed!r} has no child runs in this study")
    marks = _markers(runs.report, params.registry.gate.test, subset, notes)
    rows = [
        row
        for system in systems
        for row in _system_rows(parent, runs, system, subset, marks, params.significance)
    ]
    return _study_comparison(
        mlflow_client,
        parent,
        runs,
        pd.DataFrame(rows),
        uri=uri,
        subset=subset,
        systems=systems,
        params=params,
        notes=notes,
    )


def _pooled_predictions(parent: Run, runs: StudyRuns, system: str) -> pd.DataFrame:
    """The system's predictions of all folds; an utterance predicted in two folds is an error."""
    pooled_all = pd.concat(runs.frames[system], ignore_index=True)
    duplicated = pooled_all.duplicated(["utterance_id", "dimension"])
    if duplicated.any():
        example = pooled_all.loc[duplicated, "utterance_id"].iloc[0]
        raise CompareError(
            f"study {parent.info.run_id}: system {system!r} predicts utterance {example!r} "
            "in more than one fold"
        )
    return pooled_all


def _check_logged(parent: Run, system: str, subset: str, dimension: str, value: float) -> None:
    """The pooled UAR recomputed from the children must be the one the parent logged, when it did."""
    logged = parent.data.metrics.get(f"pooled_{system}_{subset}_{dimension}_uar")
    if logged is not None and not (
        (math.isnan(value) and math.isnan(logged)) or abs(value - logged) <= _TOLERANCE
    ):
        raise CompareError(
            f"study {parent.info.run_id}: pooled UAR of {system}/{dimension} ({subset}) from the child runs' "
            f"predictions is {value:.6f} but the parent's metric "
            f"pooled_{system}_{subset}_{dimension}_uar is {logged:.6f}; were some folds re-logged "
            "after the study's results?"
        )


def _system_rows(
    parent: Run,
    runs: StudyRuns,
    system: str,
    subset: str,
    marks: Mapping[tuple[str, str], Mapping[str, Any]],
    settings: SignificanceParams,
) -> list[dict[str, Any]]:
    """One table row per dimension of `system`: pooled UAR, its interval, fold UARs and the marker."""
    pooled = select_subset(_pooled_predictions(parent, runs, system), subset)
    rows = []
    for dimension in runs.dimensions:
        rows_d = pooled[pooled["dimension"] == dimension]
        labels = rows_d["label"].to_numpy()
        predicted = rows_d["prediction"].to_numpy()
        value = uar(labels, predicted) if len(rows_d) else math.nan
        _check_logged(parent, system, subset, dimension, value)
        low, high = bootstrap_uar_interval(
            labels,
            predicted,
            settings.resamples,
            settings.confidence,
            _stream(settings.seed, system, dimension),
        )
        per_fold = runs.fold_uars.get(system, {}).get(dimension, [])
        mark = marks.get((system, dimension), {})
        rows.append(
            {
                "system": system,
                "proposed": system == runs.proposed,
                "subset": subset,
                "dimension": dimension,
                "n": len(rows_d),
                "folds": len(per_fold),
                "pooled_uar": value,
                "ci_low": low,
                "ci_high": high,
                "fold_uar_mean": float(np.nanmean(per_fold)) if per_fold else math.nan,
                "fold_uar_std": _sd(per_fold) if per_fold else math.nan,
                "fold_uars": per_fold,
                "difference": mark.get("difference", math.nan),  # proposed - this system (report)
                "p_adjusted": mark.get("p_adjusted", math.nan),
                "above_proposed": bool(mark.get("above_proposed", False)),
                "below_proposed": bool(mark.get("below_proposed", False)),
                "marker": mark.get("marker", ""),
                "confusion": confusion(labels, predicted).tolist(),
            }
        )
    return rows


def _study_comparison(
    mlflow_client: MlflowClient,
    parent: Run,
    runs: StudyRuns,
    table: pd.DataFrame,
    *,
    uri: str,
    subset: str,
    systems: list[str],
    params: Params,
    notes: list[str],
) -> StudyComparison:
    """The table with what identifies the study (its tags, the settings used), the URI redacted."""
    started = datetime.fromtimestamp(parent.info.start_time / 1000, tz=UTC).isoformat(timespec="seconds")
    experiment_name = mlflow_client.get_experiment(parent.info.experiment_id).name
    settings = params.significance
    return StudyComparison(
        table=table,
        study_id=parent.info.run_id,
        study_name=parent.data.tags.get(tracking.TAG_STUDY, ""),
        run_name=parent.info.run_name or "",
        experiment_id=parent.info.experiment_id,
        experiment_name=experiment_name,
        status=parent.info.status,
        started=started,
        tracking_uri=redact_uri(uri),
        subset=subset,
        proposed=runs.proposed,
        systems=systems,
        dimensions=runs.dimensions,
        data_version=_tag(parent, tracking.TAG_DATA_VERSION),
        git_commit=_tag(parent, tracking.TAG_GIT_COMMIT),
        git_dirty=_tag(parent, tracking.TAG_GIT_DIRTY),
        pipeline_run_id=_tag(parent, tracking.TAG_PIPELINE_RUN),
        profile=_tag(parent, tracking.TAG_PROFILE),
        gate_test=params.registry.gate.test,
        confidence=settings.confidence,
        resamples=settings.resamples,
        seed=settings.seed,
        significance=runs.report,
        notes=notes,
    )


# --- outputs ----------------------------------------------------------------------------------------------


def log_comparison(parent_run_id: str, paths: Mapping[str, Path], *, tracking_uri: str | None = None) -> None:
    """Log the written comparison files on the study's parent run under `comparison/`."""
    mlflow_client = tracking.client(tracking_uri)
    for path in paths.values():
        mlflow_client.log_artifact(parent_run_id, str(path), ARTIFACT_COMPARISON)


def run_compare(
    study: str | None = None,
    *,
    experiment: str | None = None,
    out_dir: Path = DEFAULT_OUT,
    subset: str = "all",
    params: Params | None = None,
    log: bool = True,
    tracking_uri: str | None = None,
) -> tuple[StudyComparison, dict[str, Path]]:
    """compare_study, write_comparison into out_dir, and (log=True) log the files on the parent run."""
    uri = tracking_uri or tracking.tracking_uri()
    comparison = compare_study(study, experiment=experiment, subset=subset, params=params, tracking_uri=uri)
    paths = write_comparison(comparison, out_dir)
    if log:
        log_comparison(comparison.study_id, paths, tracking_uri=uri)  # comparison.tracking_uri is redacted
    return comparison, paths


def log_significance(
    parent_run_id: str, out_dir_or_report: Path | str | SignificanceReport, *, tracking_uri: str | None = None
) -> SignificanceReport:
    """Log a significance report on the study's parent run: significance.{json,md,html} under
    `significance/` and metrics `significance_<baseline>_<dimension>_p_<test>` (Holm/none-adjusted,
    tests P_VALUE_KEYS) and `significance_<baseline>_<dimension>_difference` (proposed - baseline UAR).

    `out_dir_or_report` is the folder written by sermtl.evaluate.significance.write_report (or its
    significance.json), or a SignificanceReport, which is written to a temporary folder first.
    """
    mlflow_client = tracking.client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sermtl-significance-") as tmp:
        if isinstance(out_dir_or_report, SignificanceReport):
            folder = Path(tmp)
            write_report(out_dir_or_report, folder)
        else:
            folder = Path(out_dir_or_report)
            if folder.is_file():
                folder = folder.parent
        files = [folder / name for name in (SIGNIFICANCE_MARKDOWN, SIGNIFICANCE_HTML, SIGNIFICANCE_JSON)]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"significance report incomplete, missing {', '.join(missing)}")
        report = read_report(folder)
        for path in files:
            mlflow_client.log_artifact(parent_run_id, str(path), ARTIFACT_SIGNIFICANCE)
    stamp = int(datetime.now(tz=UTC).timestamp() * 1000)
    metrics = []
    for item in report.comparisons:
        prefix = f"significance_{item.baseline}_{item.dimension}"
        metrics.append(Metric(f"{prefix}_difference", float(item.difference), stamp, 0))
        metrics += [
            Metric(f"{prefix}_p_{key}", float(item.p_adjusted[key]), stamp, 0)
            for key in P_VALUE_KEYS
            if key in item.p_adjusted
        ]
    for start in range(0, len(metrics), tracking.METRICS_PER_BATCH):
        mlflow_client.log_batch(parent_run_id, metrics=metrics[start : start + tracking.METRICS_PER_BATCH])
    return report
