"""The names sermtl gives its MLflow tags, and keys and values fitted to MLflow's limits, written in batches
of the sizes a log_batch request accepts: shared by the study, fold, plot and server modules of tracking."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sermtl.errors import redact_text

TAG_GIT_COMMIT = "sermtl.git_commit"
TAG_GIT_DIRTY = "sermtl.git_dirty"
TAG_DATA_VERSION = "sermtl.data_version"
TAG_PIPELINE_RUN = "sermtl.pipeline_run_id"
TAG_KFP_RUN = "sermtl.kfp_run_id"  # the Kubeflow run that logged the study (its run id)
TAG_KFP_TASK = "sermtl.kfp_task"  # the task of that run that logged it (e.g. collect-study)
TAG_PROFILE = "sermtl.profile"
TAG_STUDY = "sermtl.study"
TAG_SYSTEM = "sermtl.system"
TAG_FOLD = "sermtl.fold"
TAG_KIND = "sermtl.kind"
TAG_MODEL_URI = "sermtl.model_uri"  # models:/m-<id> of the fold's logged model (MLflow 3 LoggedModel)
TAG_PARENT = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
TAG_PROCESS = "sermtl.process."  # sermtl.process.{host,pid,started,machine}: who created the run
TAG_FAILURE = "sermtl.failure"  # why a run was marked FAILED (the error, credentials removed)
TAG_ORPHANED = "sermtl.orphaned"  # on a run left RUNNING by a dead process: who marked it FAILED, why
TAG_NOTE = "mlflow.note.content"  # the run's description in the UI

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_KEY = 250
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100  # MLflow's per-request limits of log_batch
METRICS_PER_BATCH = 1000


# --- fitting keys and values ---------------------------------------------------------------------------


def safe_key(key: str) -> str:
    """MLflow keys allow alphanumerics, _ - . / : and space; anything else becomes _."""
    cleaned = "".join(c if c.isalnum() or c in "_-./: " else "_" for c in str(key))
    return cleaned[:MAX_KEY] or "_"


def flatten(value: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts/dataclasses -> {"a.b.c": leaf}; lists stay leaves."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{sep}{key}" if prefix else str(key), sep))
        return flat
    return {prefix: value} if prefix else {}


def param_value(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, list | tuple) else str(value)
    return redact_text(text)[:MAX_PARAM_VALUE]  # e.g. an endpoint URL with user-info: never logged


def tag_text(value: Any) -> str:
    return redact_text(str(value))[:MAX_TAG_VALUE]


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


def numeric_leaves(entry: Mapping[str, Any], skip: set[str]) -> dict[str, float]:
    """Numeric leaves of a flat or nested dict, nested keys joined with _ (e.g. arousal_train_loss)."""
    out: dict[str, float] = {}
    for key, value in flatten({k: v for k, v in entry.items() if k not in skip}, sep="_").items():
        number = as_number(value)
        if number is not None:
            out[safe_key(key)] = number
    return out


# --- batched logging ----------------------------------------------------------------------------------


def log_params(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(safe_key(k), param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


def log_metrics(mlflow_client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])


def log_tags(mlflow_client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(safe_key(k), tag_text(v)) for k, v in tags.items() if v is not None]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, tags=items[start : start + PARAMS_PER_BATCH])


def now_ms() -> int:
    return int(time.time() * 1000)
