"""Compare the systems of one tracked study, read back from MLflow: `sermtl compare`.

Everything comes from the tracking server, not from local run folders, so a study trained on a cluster
can be compared anywhere that can reach its server. The study is a parent run carrying the
`sermtl.study` tag (sermtl.mlops.tracking.start_study) with one child run per (system, fold):

- fold UAR mean and sd come from the children's metrics (`test_<subset>_<dimension>_uar`);
- pooled UAR comes from the children's `predictions.parquet` artifacts pooled over the folds, checked
  against the parent's `pooled_<system>_<subset>_<dimension>_uar` metric when the parent has one;
- its 95% (significance.confidence) percentile bootstrap interval resamples the pooled utterances with
  the vectorised cell-count bootstrap of sermtl.evaluate.significance (fixed seed: significance.seed);
- markers come from the parent's `significance/significance.json` (logged by `log_significance`),
  decided by registry.gate.test through sermtl.evaluate.significance.decisive.

The result is written as comparison.{md,html,json} and logged on the parent run under `comparison/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.errors import redact_uri
from sermtl.evaluate.metrics import SUBSETS, confusion, uar, validate_predictions
from sermtl.evaluate.significance import (
    P_VALUE_KEYS,
    SignificanceReport,
    bootstrap_differences,
    cell_counts,
    decisive,
    read_report,
    write_report,
)
from sermtl.fsutil import write_report_files
from sermtl.mlops import tracking
from sermtl.params import Params
from sermtl.reports import html_page, inline_image, png_bytes, pyplot
from sermtl.schema import (
    CLASS_NAMES,
    PREDICTIONS_FILE,
    SIGNIFICANCE_HTML,
    SIGNIFICANCE_JSON,
    SIGNIFICANCE_MARKDOWN,
)

CHANCE_UAR = 1 / 3
COMPARISON_JSON = "comparison.json"
COMPARISON_MARKDOWN = "comparison.md"
COMPARISON_HTML = "comparison.html"
ARTIFACT_COMPARISON = "comparison"  # folder of the parent run's artifacts
ARTIFACT_SIGNIFICANCE = "significance"
DEFAULT_OUT = Path("artifacts/comparison")
MARK_ABOVE = "*"  # this system is significantly better than the proposed system
MARK_BELOW = "v"  # this system is significantly worse than the proposed system
PAGE_SIZE = 1000  # runs per search request
_TOLERANCE = 1e-9  # pooled UAR recomputed here vs the parent's logged metric


class CompareError(ValueError):
    """The study cannot be compared: no such run or experiment, not a study, incomplete children."""


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


# --- finding the study ----------------------------------------------------------------------------------


def _is_child(run: Run) -> bool:
    return bool(run.data.tags.get(tracking.TAG_PARENT))


def _search_all(mlflow_client: MlflowClient, experiment_ids: list[str], **kwargs: Any) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = mlflow_client.search_runs(
            experiment_ids,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=PAGE_SIZE,
            page_token=token,
            **kwargs,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_name(experiment: str | None) -> str:
    return experiment or os.environ.get(tracking.EXPERIMENT_ENV) or tracking.DEFAULT_EXPERIMENT


def find_study(
    study: str | None = None, *, experiment: str | None = None, tracking_uri: str | None = None
) -> Run:
    """The parent run `study`, else the latest FINISHED study (parent run with the sermtl.study tag) in
    `experiment` (default: $MLFLOW_EXPERIMENT_NAME, else "sermtl"). Errors are CompareError."""
    uri = tracking_uri or tracking.tracking_uri()
    where = redact_uri(uri)
    mlflow_client = tracking.client(uri)
    if study:
        try:
            run = mlflow_client.get_run(study)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise CompareError(f"no run {study!r} at {where}") from exc
            raise
        if run.info.lifecycle_stage == "deleted":
            raise CompareError(f"run {study!r} at {where} is deleted")
        tags = run.data.tags
        if _is_child(run):
            raise CompareError(
                f"run {study!r} ({run.info.run_name}) is a child run, not a study; its study is the parent "
                f"run {tags[tracking.TAG_PARENT]!r}"
            )
        if tracking.TAG_STUDY not in tags:
            raise CompareError(
                f"run {study!r} ({run.info.run_name}) is not a study: it has no {tracking.TAG_STUDY!r} tag "
                "(studies are logged by `sermtl results` / sermtl.mlops.tracking.track_study)"
            )
        if experiment:
            wanted = mlflow_client.get_experiment_by_name(experiment)
            if wanted is None or wanted.experiment_id != run.info.experiment_id:
                actual = mlflow_client.get_experiment(run.info.experiment_id).name
                raise CompareError(f"run {study!r} belongs to experiment {actual!r}, not {experiment!r}")
        return run

    name = _experiment_name(experiment)
    found = mlflow_client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage == "deleted":
        raise CompareError(f"no experiment named {name!r} at {where}")
    # Children inherit the sermtl.* tags, so parents are told apart by having no parent themselves.
    token = None
    while True:
        page = mlflow_client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.status = 'FINISHED' and tags.`{tracking.TAG_STUDY}` LIKE '%'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
            max_results=PAGE_SIZE,
            page_token=token,
        )
        for run in page:
            if not _is_child(run):
                return run
        token = page.token
        if not token:
            break
    raise CompareError(
        f"no finished study in experiment {name!r} at {where} (a study is a parent run tagged "
        f"{tracking.TAG_STUDY!r}; pass --study RUN_ID for an unfinished one)"
    )


# --- reading the children ---------------------------------------------------------------------------------

_PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per downloaded file (one per child run), unless the user asked for them."""
    saved = os.environ.get(_PROGRESS_ENV)
    if saved is None:
        os.environ[_PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_PROGRESS_ENV, None)


def _child_label(run: Run) -> str:
    return f"{run.info.run_name or '?'} (run {run.info.run_id})"


def _children(mlflow_client: MlflowClient, parent: Run) -> list[Run]:
    runs = _search_all(
        mlflow_client,
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent.info.run_id}'",
    )
    # (system, fold) runs only: the registration run is a child of the study too, with no fold.
    children = [
        run for run in runs if tracking.TAG_SYSTEM in run.data.tags and tracking.TAG_FOLD in run.data.tags
    ]
    if not children:
        raise CompareError(
            f"study {parent.info.run_id} ({parent.info.run_name}) has no (system, fold) child runs"
        )
    seen: dict[tuple[str, str], Run] = {}
    for run in children:
        key = (run.data.tags[tracking.TAG_SYSTEM], run.data.tags.get(tracking.TAG_FOLD, "?"))
        if key in seen:
            raise CompareError(
                f"study {parent.info.run_id}: two child runs for {key[0]} fold {key[1]}: "
                f"{_child_label(seen[key])} and {_child_label(run)}"
            )
        seen[key] = run
    return children


def _download_predictions(mlflow_client: MlflowClient, run: Run, folder: Path) -> pd.DataFrame:
    destination = folder / run.info.run_id
    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow_client.download_artifacts(run.info.run_id, PREDICTIONS_FILE, str(destination))
        frame = pd.read_parquet(local)
    except (MlflowException, OSError) as exc:
        if tracking.is_unreachable(exc):
            raise
        raise CompareError(f"child {_child_label(run)}: cannot read its {PREDICTIONS_FILE}: {exc}") from exc
    where = f"{PREDICTIONS_FILE} of child {_child_label(run)}"
    try:
        frame = validate_predictions(frame, where)
    except ValueError as exc:
        raise CompareError(str(exc)) from exc
    system = run.data.tags[tracking.TAG_SYSTEM]
    other = sorted(set(frame["system"].astype(str)) - {system})
    if other:
        raise CompareError(f"{where}: rows of system(s) {', '.join(other)}, expected only {system!r}")
    return frame


def _subset(frame: pd.DataFrame, subset: str) -> pd.DataFrame:
    return frame if subset == "all" else frame[frame["improvised"]]


def _fold_uars(
    child: Run, predictions: pd.DataFrame, subset: str, dimensions: list[str]
) -> dict[str, float | None]:
    """The child's test UAR per dimension; None where the fold has no such utterances (improvised only)."""
    rows = _subset(predictions, subset)
    out: dict[str, float | None] = {}
    for dimension in dimensions:
        key = f"test_{subset}_{dimension}_uar"
        has_rows = bool((rows["dimension"] == dimension).any())
        if key in child.data.metrics:
            out[dimension] = float(child.data.metrics[key])
        elif has_rows or subset == "all":
            raise CompareError(
                f"child {_child_label(child)} lacks metric {key!r}"
                + ("" if has_rows else f" and has no {dimension} predictions")
                + " (was it logged by sermtl.mlops.tracking.log_fold_run of a finished training run?)"
            )
        else:
            out[dimension] = None
    return out


def _parent_list_param(parent: Run, key: str) -> list[str] | None:
    raw = parent.data.params.get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


def _read_significance(mlflow_client: MlflowClient, parent: Run, folder: Path) -> SignificanceReport | None:
    try:
        names = {
            Path(item.path).name for item in mlflow_client.list_artifacts(parent.info.run_id, "significance")
        }
    except MlflowException as exc:
        if tracking.is_unreachable(exc):
            raise
        return None
    if SIGNIFICANCE_JSON not in names:
        return None
    try:
        local = mlflow_client.download_artifacts(
            parent.info.run_id, f"{ARTIFACT_SIGNIFICANCE}/{SIGNIFICANCE_JSON}", str(folder)
        )
        return read_report(Path(local))
    except (MlflowException, OSError, ValueError, KeyError, TypeError) as exc:
        if tracking.is_unreachable(exc):
            raise
        raise CompareError(
            f"study {parent.info.run_id}: {ARTIFACT_SIGNIFICANCE}/{SIGNIFICANCE_JSON} is unreadable: {exc}"
        ) from exc


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
    """Build the systems x dimensions comparison of one study (see the module docstring).

    `params` gives registry.gate.test (markers), significance.{resamples,confidence,seed} (intervals) and
    the fallback proposed system and dimensions; the study's own logged `eval.*` params win for those.
    """
    if subset not in SUBSETS:
        raise CompareError(f"subset {subset!r} is not one of {', '.join(SUBSETS)}")
    params = params or Params()
    uri = tracking_uri or tracking.tracking_uri()
    mlflow_client = tracking.client(uri)
    parent = find_study(study, experiment=experiment, tracking_uri=uri)
    parent_id = parent.info.run_id
    children = _children(mlflow_client, parent)
    settings = params.significance
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="sermtl-compare-") as tmp, _quiet_downloads():
        folder = Path(tmp)
        report = _read_significance(mlflow_client, parent, folder)
        frames: dict[str, list[pd.DataFrame]] = {}
        fold_uars: dict[str, dict[str, list[float]]] = {}
        proposed = (
            report.proposed
            if report is not None
            else parent.data.params.get("eval.proposed_system") or params.eval.proposed_system
        )
        dimensions = _parent_list_param(parent, "eval.dimensions") or list(params.eval.dimensions)
        for child in sorted(
            children, key=lambda r: (r.data.tags[tracking.TAG_SYSTEM], r.info.run_name or "")
        ):
            system = child.data.tags[tracking.TAG_SYSTEM]
            predictions = _download_predictions(mlflow_client, child, folder)
            frames.setdefault(system, []).append(predictions)
            for dimension, value in _fold_uars(child, predictions, subset, dimensions).items():
                if value is not None:
                    fold_uars.setdefault(system, {}).setdefault(dimension, []).append(value)

    systems = _order_systems(set(frames), proposed, params)
    if proposed not in frames:
        notes.append(f"the proposed system {proposed!r} has no child runs in this study")
    marks = _markers(report, params.registry.gate.test, subset, notes)
    rows = []
    for system in systems:
        pooled_all = pd.concat(frames[system], ignore_index=True)
        duplicated = pooled_all.duplicated(["utterance_id", "dimension"])
        if duplicated.any():
            example = pooled_all.loc[duplicated, "utterance_id"].iloc[0]
            raise CompareError(
                f"study {parent_id}: system {system!r} predicts utterance {example!r} in more than one fold"
            )
        pooled = _subset(pooled_all, subset)
        for dimension in dimensions:
            rows_d = pooled[pooled["dimension"] == dimension]
            labels = rows_d["label"].to_numpy()
            predicted = rows_d["prediction"].to_numpy()
            value = uar(labels, predicted) if len(rows_d) else math.nan
            logged = parent.data.metrics.get(f"pooled_{system}_{subset}_{dimension}_uar")
            if logged is not None and not (
                (math.isnan(value) and math.isnan(logged)) or abs(value - logged) <= _TOLERANCE
            ):
                raise CompareError(
                    f"study {parent_id}: pooled UAR of {system}/{dimension} ({subset}) from the child runs' "
                    f"predictions is {value:.6f} but the parent's metric "
                    f"pooled_{system}_{subset}_{dimension}_uar is {logged:.6f}; were some folds re-logged "
                    "after the study's results?"
                )
            low, high = bootstrap_uar_interval(
                labels,
                predicted,
                settings.resamples,
                settings.confidence,
                _stream(settings.seed, system, dimension),
            )
            per_fold = fold_uars.get(system, {}).get(dimension, [])
            mark = marks.get((system, dimension), {})
            rows.append(
                {
                    "system": system,
                    "proposed": system == proposed,
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
    started = datetime.fromtimestamp(parent.info.start_time / 1000, tz=UTC).isoformat(timespec="seconds")
    experiment_name = mlflow_client.get_experiment(parent.info.experiment_id).name
    return StudyComparison(
        table=pd.DataFrame(rows),
        study_id=parent_id,
        study_name=parent.data.tags.get(tracking.TAG_STUDY, ""),
        run_name=parent.info.run_name or "",
        experiment_id=parent.info.experiment_id,
        experiment_name=experiment_name,
        status=parent.info.status,
        started=started,
        tracking_uri=redact_uri(uri),
        subset=subset,
        proposed=proposed,
        systems=systems,
        dimensions=dimensions,
        data_version=_tag(parent, tracking.TAG_DATA_VERSION),
        git_commit=_tag(parent, tracking.TAG_GIT_COMMIT),
        git_dirty=_tag(parent, tracking.TAG_GIT_DIRTY),
        pipeline_run_id=_tag(parent, tracking.TAG_PIPELINE_RUN),
        profile=_tag(parent, tracking.TAG_PROFILE),
        gate_test=params.registry.gate.test,
        confidence=settings.confidence,
        resamples=settings.resamples,
        seed=settings.seed,
        significance=report,
        notes=notes,
    )


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
