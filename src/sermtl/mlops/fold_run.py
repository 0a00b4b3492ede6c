"""One (system, fold) training run folder as a child run of its study: params, per-epoch curves, final
metrics, the raw files, plots and the model. Training never talks to MLflow; this reads what it wrote."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sermtl.evaluate.metrics import evaluate_predictions, flat_metrics, validate_predictions
from sermtl.mlops.fold_model import log_fold_model
from sermtl.mlops.tracking_fields import (
    TAG_FOLD,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_PARENT,
    TAG_SYSTEM,
    as_number,
    flatten,
    log_metrics,
    log_params,
    now_ms,
    numeric_leaves,
    safe_key,
    tag_text,
)
from sermtl.mlops.tracking_plots import plot_attention, plot_confusion, plot_history
from sermtl.mlops.tracking_server import client, mark_failed, process_tags, resolve_uri
from sermtl.schema import (
    ATTENTION_FILE,
    DIMENSIONS,
    HISTORY_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    SEED_RUN_PREFIX,
)

ARTIFACT_PLOTS = "plots"


def _read_run_dir(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, list[dict[str, Any]] | None]:
    for required in (RUN_METRICS_FILE, PREDICTIONS_FILE):
        if not (run_dir / required).is_file():
            raise FileNotFoundError(f"{run_dir / required}: missing; is {run_dir} a finished training run?")
    try:
        fold_metrics = json.loads((run_dir / RUN_METRICS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{run_dir / RUN_METRICS_FILE}: not valid JSON: {exc}") from exc
    if not isinstance(fold_metrics, dict):
        raise ValueError(f"{run_dir / RUN_METRICS_FILE}: expected a JSON object")
    predictions = validate_predictions(
        pd.read_parquet(run_dir / PREDICTIONS_FILE), str(run_dir / PREDICTIONS_FILE)
    )
    history = None
    if (run_dir / HISTORY_FILE).is_file():
        loaded = json.loads((run_dir / HISTORY_FILE).read_text())
        history = [entry for entry in loaded if isinstance(entry, dict)] if isinstance(loaded, list) else None
    return fold_metrics, predictions, history


def _run_identity(run_dir: Path, fold_metrics: dict[str, Any]) -> tuple[str, int]:
    system = fold_metrics.get("system") or run_dir.parent.name
    fold = fold_metrics.get("fold")
    if fold is None:
        fold = int(run_dir.name.removeprefix("fold"))
    return str(system), int(fold)


def _history_metrics(history: list[dict[str, Any]]) -> list[Metric]:
    stamp = now_ms()
    metrics = []
    for index, entry in enumerate(history):
        epoch = as_number(entry.get("epoch"))
        step = int(epoch) if epoch is not None else index
        for key, value in numeric_leaves(entry, skip={"epoch"}).items():
            metrics.append(Metric(key, value, stamp, step))
    return metrics


def _final_metrics(
    fold_metrics: dict[str, Any],
    predictions: pd.DataFrame,
    per_epoch: frozenset[str] | set[str] = frozenset(),
) -> dict[str, float]:
    """Test metrics (flat_metrics names), validation UARs and the other numeric scalars of metrics.json;
    a scalar that is also a per-epoch metric (e.g. audio_seconds_per_second) becomes final_<name> so it
    does not add a step-0 point to the epoch curve."""
    evaluation = fold_metrics.get("evaluation") or evaluate_predictions(predictions)
    final = flat_metrics(evaluation, prefix="test_")
    for subset, by_dimension in evaluation.items():
        uars = [float(v["uar"]) for v in by_dimension.values()]
        if uars and not all(math.isnan(u) for u in uars):
            final[f"test_{subset}_mean_uar"] = float(np.nanmean(uars))
    for dimension, value in (fold_metrics.get("validation") or {}).items():
        number = as_number(value)
        if number is None and isinstance(value, Mapping):
            number = as_number(value.get("uar"))
        if number is not None:
            final[f"validation_{dimension}_uar"] = number
    identity = {"fold", "test_session", "system", "kind", "validation_speaker"}
    for key, value in fold_metrics.items():
        if key in identity or key in ("evaluation", "validation"):
            continue
        # Single-task systems keep some scalars per network: best_epoch {arousal: 3} -> best_epoch_arousal.
        per_network = isinstance(value, Mapping) and all(as_number(v) is not None for v in value.values())
        leaves = numeric_leaves({key: value}, set()) if per_network else {}
        number = as_number(value)
        if number is not None:
            leaves = {safe_key(key): number}
        for name, leaf in leaves.items():
            final[f"final_{name}" if name in per_epoch else name] = leaf
    return final


def _delete_previous_children(
    mlflow_client: MlflowClient, experiment_id: str, parent: str, name: str
) -> None:
    """Re-logging a fold replaces its earlier child run instead of adding a duplicate."""
    filter_string = f"tags.`{TAG_PARENT}` = '{parent}' and tags.`mlflow.runName` = '{name}'"
    for run in mlflow_client.search_runs([experiment_id], filter_string=filter_string, max_results=100):
        mlflow_client.delete_run(run.info.run_id)


@dataclass(frozen=True)
class _FoldFiles:
    """What one finished training run folder holds, read before MLflow is touched."""

    run_dir: Path
    fold_metrics: dict[str, Any]
    predictions: pd.DataFrame
    history: list[dict[str, Any]] | None
    system: str
    fold: int

    @property
    def kind(self) -> str:
        return str(self.fold_metrics.get("kind", ""))

    @property
    def name(self) -> str:
        return f"{self.system}/fold{self.fold}"


def _read_fold(run_dir: Path) -> _FoldFiles:
    fold_metrics, predictions, history = _read_run_dir(run_dir)
    system, fold = _run_identity(run_dir, fold_metrics)
    return _FoldFiles(run_dir, fold_metrics, predictions, history, system, fold)


def log_fold_run(
    parent_run_id: str,
    run_dir: Path,
    *,
    store_dir: Path | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log one training run directory as a child run `<system>/fold<k>` of the study; returns its id.

    Holds params (identity + the training params of metrics.json), per-epoch metrics (step = epoch),
    final test/validation metrics, the raw files (and each seed sub-run's metrics.json and
    predictions.parquet under seed<s>/), plots (confusion, curves, attention over the
    waveform when `store_dir` is given) and the model as a pyfunc. A missing metrics.json or
    predictions.parquet is an error naming the path; other files are optional.
    """
    files = _read_fold(Path(run_dir))  # before touching MLflow
    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    run_id = _create_child(mlflow_client, parent_run_id, files, tags)
    try:
        _log_fold_params(mlflow_client, run_id, files)
        _log_fold_metrics(mlflow_client, run_id, files)
        _log_fold_files(mlflow_client, run_id, files)
        _log_fold_plots(mlflow_client, run_id, files, store_dir)
        model_dir = files.run_dir / MODEL_DIR
        if files.kind in ("neural", "egemaps") and model_dir.is_dir():
            present = set(files.predictions["dimension"])
            dimensions = [d for d in DIMENSIONS if d in present] or list(DIMENSIONS)
            model_uri = log_fold_model(uri, run_id, model_dir, files.kind, dimensions)
            mlflow_client.set_tag(run_id, TAG_MODEL_URI, model_uri)
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        mark_failed(mlflow_client, run_id, exc)
        raise
    return run_id


def _create_child(
    mlflow_client: MlflowClient, parent_run_id: str, files: _FoldFiles, tags: Mapping[str, Any] | None
) -> str:
    """The child run, replacing an earlier one of the same fold, with the parent's sermtl.* tags."""
    parent = mlflow_client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    _delete_previous_children(mlflow_client, experiment_id, parent_run_id, files.name)
    inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("sermtl.") and k != TAG_MODEL_URI}
    child_tags: dict[str, Any] = {
        **inherited,
        TAG_PARENT: parent_run_id,
        TAG_SYSTEM: files.system,
        TAG_FOLD: str(files.fold),
        TAG_KIND: files.kind or None,
        **(tags or {}),
        **process_tags(),
    }
    run = mlflow_client.create_run(
        experiment_id,
        run_name=files.name,
        tags={safe_key(k): tag_text(v) for k, v in child_tags.items() if v is not None},
    )
    return run.info.run_id


def _log_fold_params(mlflow_client: MlflowClient, run_id: str, files: _FoldFiles) -> None:
    fold_metrics = files.fold_metrics
    params: dict[str, Any] = {
        "system": files.system,
        "kind": files.kind,
        "fold": files.fold,
        "test_session": fold_metrics.get("test_session"),
        "validation_speaker": fold_metrics.get("validation_speaker"),
        "device": fold_metrics.get("device"),
    }
    params = {k: v for k, v in params.items() if v is not None}
    params.update(flatten(fold_metrics.get("params") or {}))
    log_params(mlflow_client, run_id, params)


def _log_fold_metrics(mlflow_client: MlflowClient, run_id: str, files: _FoldFiles) -> None:
    metrics = _history_metrics(files.history or [])
    stamp = now_ms()
    final = _final_metrics(files.fold_metrics, files.predictions, {m.key for m in metrics})
    metrics += [Metric(k, v, stamp, 0) for k, v in final.items()]
    log_metrics(mlflow_client, run_id, metrics)


def _log_fold_files(mlflow_client: MlflowClient, run_id: str, files: _FoldFiles) -> None:
    run_dir = files.run_dir
    for file_name in (RUN_METRICS_FILE, HISTORY_FILE, PREDICTIONS_FILE, ATTENTION_FILE):
        if (run_dir / file_name).is_file():
            mlflow_client.log_artifact(run_id, str(run_dir / file_name))
    for seed in files.fold_metrics.get("seeds") or []:  # each seed's own predictions, beside the ensemble's
        for file_name in (RUN_METRICS_FILE, PREDICTIONS_FILE):
            path = run_dir / f"{SEED_RUN_PREFIX}{seed}" / file_name
            if path.is_file():
                mlflow_client.log_artifact(run_id, str(path), path.parent.name)


def _log_fold_plots(
    mlflow_client: MlflowClient, run_id: str, files: _FoldFiles, store_dir: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="sermtl-plots-") as tmp:
        plots = Path(tmp)
        _write_plots(
            plots, files.fold_metrics, files.predictions, files.history, files.run_dir, store_dir, files.name
        )
        if any(plots.rglob("*.png")):
            mlflow_client.log_artifacts(run_id, str(plots), ARTIFACT_PLOTS)


# --- plots --------------------------------------------------------------------------------------------


def _write_plots(
    out: Path,
    fold_metrics: dict[str, Any],
    predictions: pd.DataFrame,
    history: list[dict[str, Any]] | None,
    run_dir: Path,
    store_dir: Path | None,
    title: str,
) -> None:
    evaluation = fold_metrics.get("evaluation") or evaluate_predictions(predictions)
    plot_confusion(evaluation.get("all", {}), out / "confusion.png", title)
    if history:
        plot_history(history, out / "training_curves.png", title)
    if store_dir is not None and (run_dir / ATTENTION_FILE).is_file():
        plot_attention(run_dir / ATTENTION_FILE, Path(store_dir), out / "attention", title)
