"""Reading one tracked study back from MLflow for `sermtl compare`: its parent run (by id, or the latest
finished study of an experiment), its (system, fold) children, their predictions, the significance report."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.errors import redact_uri
from sermtl.evaluate.metrics import validate_predictions
from sermtl.evaluate.significance import SignificanceReport, read_report
from sermtl.mlops import tracking
from sermtl.params import Params
from sermtl.schema import PREDICTIONS_FILE, SIGNIFICANCE_JSON

PAGE_SIZE = 1000  # runs per search request
ARTIFACT_SIGNIFICANCE = "significance"


class CompareError(ValueError):
    """The study cannot be compared: no such run or experiment, not a study, incomplete children."""


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


def select_subset(frame: pd.DataFrame, subset: str) -> pd.DataFrame:
    return frame if subset == "all" else frame[frame["improvised"]]


def _fold_uars(
    child: Run, predictions: pd.DataFrame, subset: str, dimensions: list[str]
) -> dict[str, float | None]:
    """The child's test UAR per dimension; None where the fold has no such utterances (improvised only)."""
    rows = select_subset(predictions, subset)
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


# --- everything compare_study reads -----------------------------------------------------------------------


@dataclass
class StudyRuns:
    """What a study's runs say: its significance report, proposed system and dimensions (the study's own
    logged `eval.*` params win over params.yaml), and per system its fold predictions and fold UARs."""

    report: SignificanceReport | None
    proposed: str
    dimensions: list[str]
    frames: dict[str, list[pd.DataFrame]]
    fold_uars: dict[str, dict[str, list[float]]]


def read_study(mlflow_client: MlflowClient, parent: Run, subset: str, params: Params) -> StudyRuns:
    """The children (checked: one per system and fold), then the report and each child's predictions."""
    children = _children(mlflow_client, parent)
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
    return StudyRuns(report, proposed, dimensions, frames, fold_uars)
