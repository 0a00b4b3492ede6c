"""MLflow tracking of a study: one parent run per study, one nested child run per (system, fold), made from
the run folders training wrote (it never talks to MLflow). Holds the study's parent run, and re-exports
the names of tracking_fields (tags, limits), tracking_server (where runs go, outages), fold_run (child
runs), tracking_plots and fold_model (the fold's pyfunc), so `tracking.X` keeps working everywhere."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, RunStatus

from sermtl.mlops import gitinfo
from sermtl.mlops.fold_model import (
    MODEL_NAME,
    SerModelPyfunc,
    model_packaging,
    model_requirements,
    model_signature,
    register_model,
)
from sermtl.mlops.fold_run import ARTIFACT_PLOTS, log_fold_run
from sermtl.mlops.serving import output_columns
from sermtl.mlops.tracking_fields import (
    MAX_KEY,
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    TAG_DATA_VERSION,
    TAG_FAILURE,
    TAG_FOLD,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_KFP_RUN,
    TAG_KFP_TASK,
    TAG_KIND,
    TAG_MODEL_URI,
    TAG_NOTE,
    TAG_ORPHANED,
    TAG_PARENT,
    TAG_PIPELINE_RUN,
    TAG_PROCESS,
    TAG_PROFILE,
    TAG_STUDY,
    TAG_SYSTEM,
    as_number,
    flatten,
    log_metrics,
    log_params,
    log_tags,
    now_ms,
    safe_key,
    tag_text,
)
from sermtl.mlops.tracking_plots import MAX_ATTENTION_PLOTS, plot_attention, plot_confusion, plot_history
from sermtl.mlops.tracking_server import (
    BACKOFF_JITTER_S,
    CLEANUP_TIMEOUT_S,
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    LOCAL_ARTIFACTS_DIR,
    LOCAL_DB_FILE,
    LOCAL_STORE_DIR,
    MAX_RETRIES_LIMIT,
    MIN_TIMEOUT_S,
    RETRY_ENV,
    SUPPRESS_URL_ENV,
    TRACKING_URI_ENV,
    RetryPolicy,
    client,
    ensure_experiment,
    fail_orphaned_runs,
    fluent_tracking_uri,
    forget_abandoned,
    is_unreachable,
    mark_failed,
    mlflow_service,
    process_tags,
    quick_requests,
    resolve_uri,
    retry_policy,
    tracking_uri,
    unreachable_cause,
)
from sermtl.params import Params
from sermtl.schema import run_dir

__all__ = [  # the public names of tracking before it was split; their modules are named in the imports
    "ARTIFACT_PLOTS",
    "BACKOFF_JITTER_S",
    "CLEANUP_TIMEOUT_S",
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_ENV",
    "LOCAL_ARTIFACTS_DIR",
    "LOCAL_DB_FILE",
    "LOCAL_STORE_DIR",
    "MAX_ATTENTION_PLOTS",
    "MAX_KEY",
    "MAX_PARAM_VALUE",
    "MAX_RETRIES_LIMIT",
    "MAX_TAG_VALUE",
    "METRICS_PER_BATCH",
    "MIN_TIMEOUT_S",
    "MODEL_NAME",
    "PARAMS_PER_BATCH",
    "RETRY_ENV",
    "SUPPRESS_URL_ENV",
    "TAG_DATA_VERSION",
    "TAG_FAILURE",
    "TAG_FOLD",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
    "TAG_KFP_RUN",
    "TAG_KFP_TASK",
    "TAG_KIND",
    "TAG_MODEL_URI",
    "TAG_NOTE",
    "TAG_ORPHANED",
    "TAG_PARENT",
    "TAG_PIPELINE_RUN",
    "TAG_PROCESS",
    "TAG_PROFILE",
    "TAG_STUDY",
    "TAG_SYSTEM",
    "TRACKING_URI_ENV",
    "RetryPolicy",
    "SerModelPyfunc",
    "client",
    "end_study",
    "ensure_experiment",
    "fail_orphaned_runs",
    "flatten",
    "fluent_tracking_uri",
    "git_commit",
    "is_unreachable",
    "log_fold_run",
    "log_study_results",
    "log_tags",
    "mark_failed",
    "mlflow_service",
    "model_packaging",
    "model_requirements",
    "model_signature",
    "now_ms",
    "output_columns",
    "plot_attention",
    "plot_confusion",
    "plot_history",
    "process_tags",
    "quick_requests",
    "register_model",
    "resolve_uri",
    "retry_policy",
    "start_study",
    "track_study",
    "tracking_uri",
    "unreachable_cause",
]


# --- provenance ---------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """`$SERMTL_GIT_COMMIT` (set in images built without .git), else `git rev-parse HEAD`."""
    return gitinfo.commit()


def _git_dirty() -> bool | None:
    return gitinfo.changed()


# --- the study (parent run) ---------------------------------------------------------------------------


def start_study(
    name: str,
    params: Params,
    tags: Mapping[str, Any] | None = None,
    *,
    data_version: str | None = None,
    pipeline_run_id: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Open the parent run `name` of a study and log every parameter; returns its run id.

    The experiment is `experiment`, else `$MLFLOW_EXPERIMENT_NAME`, else "sermtl". Tags record what
    makes the study reproducible: git commit, data version (DVC md5 or ingest fingerprint: the caller
    knows which), pipeline run ($KFP_RUN_ID) and params profile; `tags` may add to or override them.
    """
    uri = resolve_uri(tracking_uri)
    experiment_id = ensure_experiment(
        experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT, tracking_uri=uri
    )
    commit = git_commit()
    dirty = _git_dirty()
    all_tags: dict[str, Any] = {
        TAG_STUDY: name,
        TAG_PROFILE: params.profile,
        TAG_GIT_COMMIT: commit,
        "mlflow.source.git.commit": commit,
        TAG_GIT_DIRTY: None if dirty is None else str(dirty).lower(),
        TAG_DATA_VERSION: data_version,
        TAG_PIPELINE_RUN: pipeline_run_id or os.environ.get("KFP_RUN_ID") or None,
    }
    all_tags.update(tags or {})
    all_tags.update(process_tags())
    mlflow_client = client(uri)
    # Runs an earlier, failed attempt could not close (the server was gone then) are closed now.
    fail_orphaned_runs(
        mlflow_client, experiment_id, run_name=name, pipeline_run_id=all_tags.get(TAG_PIPELINE_RUN)
    )
    run = mlflow_client.create_run(
        experiment_id,
        run_name=name,
        tags={safe_key(k): tag_text(v) for k, v in all_tags.items() if v is not None},
    )
    try:
        log_params(mlflow_client, run.info.run_id, flatten(params))
    except BaseException as exc:
        mark_failed(mlflow_client, run.info.run_id, exc)
        raise
    return run.info.run_id


def end_study(parent_run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Close the parent run (FINISHED, FAILED or KILLED)."""
    RunStatus.from_string(status)  # a typo is an error here, not a silently RUNNING run
    client(tracking_uri).set_terminated(parent_run_id, status)
    forget_abandoned(parent_run_id)


def log_study_results(
    parent_run_id: str,
    results_markdown: str,
    results_html: str,
    table: pd.DataFrame,
    *,
    tracking_uri: str | None = None,
) -> None:
    """Results table artifacts (md, html, json) and pooled summary metrics on the parent run.

    Metrics are named `pooled_<system>_<subset>_<dimension>_<metric>` (uar, weighted_accuracy, macro_f1),
    `fold_mean_/fold_std_<system>_<subset>_<dimension>_uar` (over folds) and
    `seed_mean_/seed_std_<system>_<subset>_<dimension>_uar` (over training seeds: of the pooled UAR of
    each seed's own predictions; sd 0 for one seed), so the UI can compare studies.
    """
    mlflow_client = client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sermtl-results-") as tmp:
        folder = Path(tmp)
        (folder / "results.md").write_text(results_markdown)
        (folder / "results.html").write_text(results_html)
        (folder / "results.json").write_text(table.to_json(orient="records", indent=2) + "\n")
        mlflow_client.log_artifacts(parent_run_id, str(folder), "results")
    metrics: list[Metric] = []
    stamp = now_ms()
    renames = {
        "pooled_uar": "pooled",
        "fold_uar_mean": "fold_mean",
        "fold_uar_std": "fold_std",
        "seed_uar_mean": "seed_mean",
        "seed_uar_std": "seed_std",
    }
    for row in table.to_dict(orient="records"):
        if "system" not in row or "dimension" not in row:
            continue
        key = f"{row['system']}_{row.get('subset', 'all')}_{row['dimension']}"
        for column, value in row.items():
            number = as_number(value)
            if number is None or column in ("folds", "seeds", "n"):
                continue
            if column in renames:
                name = f"{renames[column]}_{key}_uar"
            elif column.startswith("pooled_"):
                name = f"pooled_{key}_{column.removeprefix('pooled_')}"
            else:
                continue
            metrics.append(Metric(safe_key(name), number, stamp, 0))
    log_metrics(mlflow_client, parent_run_id, metrics)
    mlflow_client.set_tag(parent_run_id, TAG_NOTE, tag_text(results_markdown))


def track_study(
    train_dir: Path,
    store_dir: Path | None,
    results_dir: Path,
    table: pd.DataFrame,
    params: Params,
    data_version: str,
    pipeline_run_id: str = "",
    *,
    name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log a finished study: parent run, one child per (system, fold), the results on the parent.

    `tags` go onto the parent (start_study) and, as children inherit the parent's `sermtl.*` tags, onto
    every child too (e.g. the KFP run and task). A failure while logging marks the parent (and the child
    being logged) FAILED instead of leaving it running; if the server is gone by then, the next study
    in the experiment does (fail_orphaned_runs).
    """
    from sermtl.evaluate.results import RESULTS_HTML, RESULTS_MARKDOWN

    study = name or f"study-{pipeline_run_id or time.strftime('%Y%m%d-%H%M%S')}"
    parent = start_study(
        study,
        params,
        tags,
        data_version=data_version,
        pipeline_run_id=pipeline_run_id or None,
        tracking_uri=tracking_uri,
    )
    try:
        for system in params.systems:
            for fold in range(len(params.data.sessions)):
                log_fold_run(
                    parent,
                    run_dir(train_dir, system, fold),
                    store_dir=store_dir,
                    tracking_uri=tracking_uri,
                )
        log_study_results(
            parent,
            (Path(results_dir) / RESULTS_MARKDOWN).read_text(),
            (Path(results_dir) / RESULTS_HTML).read_text(),
            table,
            tracking_uri=tracking_uri,
        )
        end_study(parent, tracking_uri=tracking_uri)
    except BaseException as exc:
        mark_failed(client(tracking_uri), parent, exc)
        raise
    return parent
