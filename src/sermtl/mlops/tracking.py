"""MLflow tracking of a study: one parent run per study, one nested child run per (system, fold).

Why a module of its own: training writes plain run directories (artifacts/train/<system>/fold<k>/, see
sermtl.schema) and never talks to MLflow, so a study can be trained offline, re-logged, or logged to a
different server. This module turns those directories into MLflow runs: params, per-epoch curves,
final metrics, plots, the raw files and the trained model as a pyfunc that takes a waveform.

Where runs go: `$MLFLOW_TRACKING_URI` (a server, e.g. sermtl_localstack.MlflowServer or a cluster's),
else a sqlite store under ./mlruns with an explicit artifact root, so nothing lands in a random cwd.
All functions take `tracking_uri=` to override that and use MlflowClient, so no global MLflow state
(active run, tracking URI) is left behind; only model logging briefly needs a fluent active run.

Reaching the server (`mlflow_service`, used by every entry point: the CLI commands and the pipeline
steps): MLflow's HTTP retries are bounded by `tracking.retry_budget_s`, a server that cannot be reached
is one ServiceUnreachable naming it (credentials removed), and a step that fails midway marks the runs
it created FAILED; runs it could not mark (the server was gone) are marked by the next study or
registration in the same experiment once their creator is provably gone (`fail_orphaned_runs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.errors import ServiceUnreachable, redact_text, redact_uri
from sermtl.evaluate.metrics import (
    PROBABILITY_COLUMNS,
    evaluate_predictions,
    flat_metrics,
    validate_predictions,
)
from sermtl.mlops import gitinfo, procinfo
from sermtl.mlops.serving import AudioPyfunc, serving_signature
from sermtl.mlops.serving import output_columns as output_columns  # re-exported: the pyfunc output columns
from sermtl.params import Params, TrackingParams
from sermtl.reports import pyplot, save_png
from sermtl.schema import (
    ATTENTION_FILE,
    CLASS_NAMES,
    DIMENSIONS,
    HISTORY_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    SEED_RUN_PREFIX,
    run_dir,
)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "sermtl"
LOCAL_STORE_DIR = "mlruns"  # under the project dir (cwd); git-ignored
LOCAL_DB_FILE = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "artifacts"

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
MAX_ATTENTION_PLOTS = 8
MODEL_NAME = "model"
ARTIFACT_PLOTS = "plots"


# --- where runs go ----------------------------------------------------------------------------------


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else sqlite at <cwd>/mlruns/mlflow.db (MLflow's own default is ./mlflow.db)."""
    configured = os.environ.get(TRACKING_URI_ENV, "").strip()
    if configured:
        return configured
    return f"sqlite:///{(Path.cwd() / LOCAL_STORE_DIR / LOCAL_DB_FILE).resolve()}"


def resolve_uri(uri: str | None) -> str:
    return uri or tracking_uri()


def _artifact_location(uri: str) -> str | None:
    """Explicit artifact root for a sqlite store (next to the db); servers decide their own (None)."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if not database.is_absolute():
            database = database.resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        return (database.parent / LOCAL_ARTIFACTS_DIR).as_uri()
    return None


def client(uri: str | None = None) -> MlflowClient:
    """A client bound to `uri` (default: tracking_uri()), so no global MLflow state is involved."""
    uri = uri or tracking_uri()
    _artifact_location(uri)  # creates the sqlite store's folder, which sqlite will not do itself
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(name: str, *, tracking_uri: str | None = None) -> str:
    """Experiment id of `name`, created (or restored if deleted) with an explicit artifact root if local."""
    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=_artifact_location(uri))
        except MlflowException as exc:  # created concurrently by another component of the same pipeline
            if is_unreachable(exc):
                raise
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point fluent MLflow calls at `uri` for a moment, then restore both the global and the env var."""
    from mlflow.tracking._tracking_service import utils as service_utils

    saved_global = getattr(service_utils, "_tracking_uri", None)
    saved_env = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)  # None unsets the env var as a side effect
        if saved_env is not None:
            os.environ[TRACKING_URI_ENV] = saved_env
        else:
            os.environ.pop(TRACKING_URI_ENV, None)


# --- reaching the server: bounded retries, one clear error, no run left RUNNING ------------------------

RETRY_ENV = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER",
)
SUPPRESS_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow prints run URLs with the user-info
MAX_RETRIES_LIMIT = 10  # MLflow refuses more (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT)
BACKOFF_JITTER_S = 0.5
MIN_TIMEOUT_S = 5
CLEANUP_TIMEOUT_S = 5  # one attempt (and one immediate retry) per call of a best-effort cleanup

# Runs this process created, failed to mark FAILED (the server was gone) and gave up on.
_ABANDONED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """MLflow's HTTP retry settings (urllib3 Retry: `max_retries` retries, the k-th after
    `backoff_factor * 2**(k-1)` s plus up to `backoff_jitter`, none before the first) fitted to a budget."""

    budget_s: float
    max_retries: int
    backoff_factor: int
    backoff_jitter: float
    timeout_s: int  # per attempt (connect, and each wait for an answer)

    def sleep_before(self, retry: int) -> float:
        return 0.0 if retry <= 1 else self.backoff_factor * 2 ** (retry - 1) + self.backoff_jitter

    @property
    def backoff_s(self) -> float:
        """Longest total wait between the attempts: what a refusing server costs before the error."""
        return sum(self.sleep_before(k) for k in range(1, self.max_retries + 1))

    @property
    def worst_case_s(self) -> float:
        """A server that accepts connections but never answers: every attempt waits its timeout."""
        return (self.max_retries + 1) * self.timeout_s + self.backoff_s

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.max_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.backoff_factor),
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": f"{self.backoff_jitter:g}",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.timeout_s),
            # a Retry-After header could stretch one wait past the whole budget
            "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
        }


def retry_policy(budget_s: float) -> RetryPolicy:
    """As many retries as fit, backoff and jitter included, into `budget_s` (a refused connection or a
    5xx/429 answer fails within it); each attempt times out after max(5, budget/2) s."""
    budget = float(budget_s)
    policy = RetryPolicy(budget, 0, 1, BACKOFF_JITTER_S, max(MIN_TIMEOUT_S, math.ceil(budget / 2)))
    waited = 0.0
    while policy.max_retries < MAX_RETRIES_LIMIT:
        step = policy.sleep_before(policy.max_retries + 1)
        if waited + step > budget:
            break
        waited += step
        policy = dataclasses.replace(policy, max_retries=policy.max_retries + 1)
    return policy


_REASONS = (
    (re.compile(r"too many (\d{3}) error responses"), "answered HTTP {0} to every attempt"),
    (re.compile(r"Connection refused"), "connection refused"),
    (
        re.compile(r"Name or service not known|nodename nor servname|name resolution|getaddrinfo failed"),
        "host name not found",
    ),
    (re.compile(r"No route to host|Network is unreachable"), "no route to host"),
    (re.compile(r"[Tt]imed? ?out"), "no answer (timed out)"),
    (
        re.compile(r"Connection reset|Connection aborted|RemoteDisconnected|closed connection"),
        "connection dropped",
    ),
)


def unreachable_cause(exc: BaseException | None) -> BaseException | None:
    """The transport failure (refused, timed out, retries on 5xx/429 used up) behind an MLflow error, or
    None when the server answered (then the error is the server's own)."""
    import requests

    kinds = (
        ServiceUnreachable,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
    )
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_unreachable(exc: BaseException) -> bool:
    return unreachable_cause(exc) is not None


def _reason(cause: BaseException) -> str:
    text = str(cause)
    for pattern, label in _REASONS:
        found = pattern.search(text)
        if found:
            return label.format(*found.groups())
    return type(cause).__name__


def _current_timeout() -> int:
    try:
        return int(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    except ValueError:
        return 120


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow calls inside make one attempt and one immediate retry, each timing out after
    CLEANUP_TIMEOUT_S: for best-effort cleanups after a failure, which must not spend the budget again."""
    with _env(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(min(CLEANUP_TIMEOUT_S, _current_timeout())),
        }
    ):
        yield


@contextlib.contextmanager
def mlflow_service(
    params: Params | None = None, *, tracking_uri: str | None = None, budget_s: float | None = None
) -> Iterator[str]:
    """Around the MLflow calls of one entry point (a CLI command, a pipeline step); yields the URI.

    - sets MLflow's HTTP retry variables (RETRY_ENV) from `params.tracking.retry_budget_s` (or
      `budget_s`) before the first call, and restores them after; `retry_policy` says what they are;
    - with user-info in the URI, stops MLflow printing run URLs (they would show the password);
    - turns an MLflow failure to reach the server into ServiceUnreachable("MLflow", uri, why), one line
      with the credentials removed (the original exception is not chained: its text holds the URL).
    """
    uri = resolve_uri(tracking_uri)
    if budget_s is None:
        budget_s = (params.tracking if params is not None else TrackingParams()).retry_budget_s
    policy = retry_policy(budget_s)
    target = redact_uri(uri)
    values = policy.env()
    if target != uri:
        values[SUPPRESS_URL_ENV] = "true"
    try:
        with _env(values):
            yield uri
    except Exception as exc:
        import requests

        cause = unreachable_cause(exc)
        if cause is None or not isinstance(exc, MlflowException | requests.exceptions.RequestException):
            raise  # ServiceUnreachable already, or not an MLflow call's failure (e.g. a CLI exit)
        raise ServiceUnreachable(
            "MLflow",
            uri,
            f"{_reason(cause)}; gave up after {policy.max_retries + 1} attempts "
            f"(tracking.retry_budget_s = {policy.budget_s:g} s)",
        ) from None


def mark_failed(mlflow_client: MlflowClient, run_id: str, error: BaseException | None = None) -> bool:
    """Best effort, quickly: `run_id` FAILED, the error (credentials removed) in its sermtl.failure tag.
    Never raises (the error being handled is what the caller re-raises); a run that cannot be marked is
    remembered for fail_orphaned_runs."""
    try:
        with quick_requests():
            mlflow_client.set_terminated(run_id, "FAILED")
            if error is not None:
                with contextlib.suppress(Exception):
                    text = redact_text(f"{type(error).__name__}: {error}".splitlines()[0])
                    mlflow_client.set_tag(run_id, TAG_FAILURE, text[:MAX_TAG_VALUE])
    except Exception:
        _ABANDONED.add(run_id)
        return False
    _ABANDONED.discard(run_id)
    return True


def process_tags() -> dict[str, str]:
    """The creating process, on every run this module creates (see sermtl.mlops.procinfo)."""
    return procinfo.current().to_tags(TAG_PROCESS)


def fail_orphaned_runs(
    mlflow_client: MlflowClient,
    experiment_id: str,
    *,
    run_name: str | None = None,
    parent: str | None = None,
    pipeline_run_id: str | None = None,
) -> list[str]:
    """Mark FAILED the RUNNING runs of `experiment_id` that nobody will ever end; returns their ids.

    A run is orphaned when (1) this process created it and could not mark it FAILED (the server was
    gone), (2) its sermtl.process.* tags name a process on this machine that provably no longer runs
    (sermtl.mlops.procinfo.is_gone), or (3) it is an earlier attempt of the run about to be created: the same
    non-empty pipeline run id, run name and parent (a Kubeflow retry of the same step, in another pod);
    RUNNING children of an orphan are orphans too. A RUNNING run of a live process, or of another
    machine outside rule 3, is left alone: that cannot be decided from here.
    """
    running = _search(mlflow_client, experiment_id, "attributes.status = 'RUNNING'")
    orphans: dict[str, str] = {}
    for run in running:
        run_id, tags = run.info.run_id, run.data.tags
        creator = procinfo.ProcessId.from_tags(tags, TAG_PROCESS)
        if run_id in _ABANDONED:
            orphans[run_id] = "this process could not mark it FAILED when its step failed"
        elif creator is not None and procinfo.is_gone(creator):
            orphans[run_id] = f"the process that created it ({creator.describe()}) is gone"
        elif (
            pipeline_run_id
            and tags.get(TAG_PIPELINE_RUN) == pipeline_run_id
            and run.info.run_name == run_name
            and tags.get(TAG_PARENT) == parent
        ):
            orphans[run_id] = f"an earlier attempt of the same step of pipeline run {pipeline_run_id}"
    for run in running:
        parent_id = run.data.tags.get(TAG_PARENT)
        if parent_id in orphans and run.info.run_id not in orphans:
            orphans[run.info.run_id] = f"its parent run {parent_id} was left RUNNING"
    me = procinfo.current().describe()
    marked = []
    for run_id, why in orphans.items():
        try:
            mlflow_client.set_terminated(run_id, "FAILED")
            mlflow_client.set_tag(run_id, TAG_ORPHANED, f"{why}; marked FAILED by {me} at {_iso_now()}")
        except MlflowException as exc:
            if is_unreachable(exc):
                raise
            continue  # e.g. deleted meanwhile
        _ABANDONED.discard(run_id)
        marked.append(run_id)
    return marked


def _search(mlflow_client: MlflowClient, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- provenance ---------------------------------------------------------------------------------------


def git_commit() -> str | None:
    """`$SERMTL_GIT_COMMIT` (set in images built without .git), else `git rev-parse HEAD`."""
    return gitinfo.commit()


def _git_dirty() -> bool | None:
    return gitinfo.changed()


# --- flattening ---------------------------------------------------------------------------------------


def _safe_key(key: str) -> str:
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


def _param_value(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, list | tuple) else str(value)
    return redact_text(text)[:MAX_PARAM_VALUE]  # e.g. an endpoint URL with user-info: never logged


def _tag_text(value: Any) -> str:
    return redact_text(str(value))[:MAX_TAG_VALUE]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


def _numeric_leaves(entry: Mapping[str, Any], skip: set[str]) -> dict[str, float]:
    """Numeric leaves of a flat or nested dict, nested keys joined with _ (e.g. arousal_train_loss)."""
    out: dict[str, float] = {}
    for key, value in flatten({k: v for k, v in entry.items() if k not in skip}, sep="_").items():
        number = _number(value)
        if number is not None:
            out[_safe_key(key)] = number
    return out


# --- batched logging ----------------------------------------------------------------------------------


def _log_params(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(_safe_key(k), _param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


def _log_metrics(mlflow_client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])


def log_tags(mlflow_client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(_safe_key(k), _tag_text(v)) for k, v in tags.items() if v is not None]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, tags=items[start : start + PARAMS_PER_BATCH])


def now_ms() -> int:
    return int(time.time() * 1000)


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
        tags={_safe_key(k): _tag_text(v) for k, v in all_tags.items() if v is not None},
    )
    try:
        _log_params(mlflow_client, run.info.run_id, flatten(params))
    except BaseException as exc:
        mark_failed(mlflow_client, run.info.run_id, exc)
        raise
    return run.info.run_id


def end_study(parent_run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Close the parent run (FINISHED, FAILED or KILLED)."""
    RunStatus.from_string(status)  # a typo is an error here, not a silently RUNNING run
    client(tracking_uri).set_terminated(parent_run_id, status)
    _ABANDONED.discard(parent_run_id)


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
            number = _number(value)
            if number is None or column in ("folds", "seeds", "n"):
                continue
            if column in renames:
                name = f"{renames[column]}_{key}_uar"
            elif column.startswith("pooled_"):
                name = f"pooled_{key}_{column.removeprefix('pooled_')}"
            else:
                continue
            metrics.append(Metric(_safe_key(name), number, stamp, 0))
    _log_metrics(mlflow_client, parent_run_id, metrics)
    mlflow_client.set_tag(parent_run_id, TAG_NOTE, _tag_text(results_markdown))


# --- one (system, fold) run (child) -------------------------------------------------------------------


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
        epoch = _number(entry.get("epoch"))
        step = int(epoch) if epoch is not None else index
        for key, value in _numeric_leaves(entry, skip={"epoch"}).items():
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
        number = _number(value)
        if number is None and isinstance(value, Mapping):
            number = _number(value.get("uar"))
        if number is not None:
            final[f"validation_{dimension}_uar"] = number
    identity = {"fold", "test_session", "system", "kind", "validation_speaker"}
    for key, value in fold_metrics.items():
        if key in identity or key in ("evaluation", "validation"):
            continue
        # Single-task systems keep some scalars per network: best_epoch {arousal: 3} -> best_epoch_arousal.
        per_network = isinstance(value, Mapping) and all(_number(v) is not None for v in value.values())
        leaves = _numeric_leaves({key: value}, set()) if per_network else {}
        number = _number(value)
        if number is not None:
            leaves = {_safe_key(key): number}
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
    run_dir = Path(run_dir)
    fold_metrics, predictions, history = _read_run_dir(run_dir)  # before touching MLflow
    system, fold = _run_identity(run_dir, fold_metrics)
    kind = str(fold_metrics.get("kind", ""))
    name = f"{system}/fold{fold}"
    uri = resolve_uri(tracking_uri)
    mlflow_client = client(uri)
    parent = mlflow_client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    _delete_previous_children(mlflow_client, experiment_id, parent_run_id, name)

    inherited = {k: v for k, v in parent.data.tags.items() if k.startswith("sermtl.") and k != TAG_MODEL_URI}
    child_tags: dict[str, Any] = {
        **inherited,
        TAG_PARENT: parent_run_id,
        TAG_SYSTEM: system,
        TAG_FOLD: str(fold),
        TAG_KIND: kind or None,
        **(tags or {}),
        **process_tags(),
    }
    run = mlflow_client.create_run(
        experiment_id,
        run_name=name,
        tags={_safe_key(k): _tag_text(v) for k, v in child_tags.items() if v is not None},
    )
    run_id = run.info.run_id
    try:
        params: dict[str, Any] = {
            "system": system,
            "kind": kind,
            "fold": fold,
            "test_session": fold_metrics.get("test_session"),
            "validation_speaker": fold_metrics.get("validation_speaker"),
            "device": fold_metrics.get("device"),
        }
        params = {k: v for k, v in params.items() if v is not None}
        params.update(flatten(fold_metrics.get("params") or {}))
        _log_params(mlflow_client, run_id, params)

        metrics = _history_metrics(history or [])
        stamp = now_ms()
        final = _final_metrics(fold_metrics, predictions, {m.key for m in metrics})
        metrics += [Metric(k, v, stamp, 0) for k, v in final.items()]
        _log_metrics(mlflow_client, run_id, metrics)

        for file_name in (RUN_METRICS_FILE, HISTORY_FILE, PREDICTIONS_FILE, ATTENTION_FILE):
            if (run_dir / file_name).is_file():
                mlflow_client.log_artifact(run_id, str(run_dir / file_name))
        for seed in fold_metrics.get("seeds") or []:  # each seed's own predictions, beside the ensemble's
            for file_name in (RUN_METRICS_FILE, PREDICTIONS_FILE):
                path = run_dir / f"{SEED_RUN_PREFIX}{seed}" / file_name
                if path.is_file():
                    mlflow_client.log_artifact(run_id, str(path), path.parent.name)
        with tempfile.TemporaryDirectory(prefix="sermtl-plots-") as tmp:
            plots = Path(tmp)
            _write_plots(plots, fold_metrics, predictions, history, run_dir, store_dir, name)
            if any(plots.rglob("*.png")):
                mlflow_client.log_artifacts(run_id, str(plots), ARTIFACT_PLOTS)

        model_dir = run_dir / MODEL_DIR
        if kind in ("neural", "egemaps") and model_dir.is_dir():
            dimensions = [d for d in DIMENSIONS if d in set(predictions["dimension"])] or list(DIMENSIONS)
            model_uri = _log_model(uri, run_id, model_dir, kind, dimensions)
            mlflow_client.set_tag(run_id, TAG_MODEL_URI, model_uri)
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        mark_failed(mlflow_client, run_id, exc)
        raise
    return run_id


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


def plot_confusion(by_dimension: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """One figure, a row-normalised confusion matrix per dimension, counts written in the cells."""
    dimensions = [d for d in DIMENSIONS if d in by_dimension] + [
        d for d in by_dimension if d not in DIMENSIONS
    ]
    if not dimensions:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, len(dimensions), figsize=(3.6 * len(dimensions), 3.4), squeeze=False)
    for axis, dimension in zip(axes[0], dimensions, strict=True):
        counts = np.asarray(by_dimension[dimension]["confusion"], dtype=np.float64)
        rows = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(counts):
            axis.text(
                j,
                i,
                f"{int(count)}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
            )
        axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        axis.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{dimension}  UAR {float(by_dimension[dimension]['uar']):.3f}")
    figure.suptitle(f"{title}  (all test utterances)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(figure, path, dpi=90)


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Losses and validation UARs per epoch, whatever the exact (flat or per-task) key names."""
    steps = []
    series: dict[str, list[tuple[int, float]]] = {}
    for index, entry in enumerate(history):
        epoch = _number(entry.get("epoch"))
        step = int(epoch) if epoch is not None else index
        steps.append(step)
        for key, value in _numeric_leaves(entry, skip={"epoch"}).items():
            series.setdefault(key, []).append((step, value))
    panels = {
        "loss": {k: v for k, v in series.items() if "loss" in k},
        "validation UAR": {k: v for k, v in series.items() if "uar" in k},
    }
    panels = {name: lines for name, lines in panels.items() if lines}
    if not panels:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for axis, (panel, lines) in zip(axes[0], panels.items(), strict=True):
        for key, points in sorted(lines.items()):
            x, y = zip(*points, strict=True)
            axis.plot(x, y, marker="o", markersize=3, label=key, linewidth=2.2 if "mean" in key else 1.2)
        axis.set_xlabel("epoch")
        axis.set_title(panel)
        if panel == "validation UAR":
            axis.axhline(1 / 3, color="grey", linestyle="--", linewidth=1)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(figure, path, dpi=90)


def plot_attention(npz_path: Path, store_dir: Path, out_dir: Path, title: str = "") -> list[Path]:
    """Per utterance, one row per task: waveform with the attention weights as a heat-map behind it."""
    from sermtl.data.audio import AudioStore

    with np.load(npz_path) as archive:
        arrays = {key: np.asarray(archive[key]) for key in archive.files}
    hop = arrays.pop("frame_hop_s", None)
    hop_s = float(hop.reshape(-1)[0]) if hop is not None and hop.size else None
    by_utterance: dict[str, dict[str, np.ndarray]] = {}
    for key, weights in arrays.items():
        if "__" in key:
            uid, task = key.rsplit("__", 1)
            by_utterance.setdefault(uid, {})[task] = weights.reshape(-1).astype(np.float64)
    if not by_utterance:
        return []
    store = AudioStore(store_dir)
    known = set(store.manifest["utterance_id"])
    plt = pyplot()
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for uid in sorted(by_utterance)[:MAX_ATTENTION_PLOTS]:
        if uid not in known:
            continue
        waveform = store.waveform(uid)
        seconds = np.arange(waveform.size) / store.sample_rate
        duration = waveform.size / store.sample_rate
        tasks = [t for t in DIMENSIONS if t in by_utterance[uid]] + sorted(
            t for t in by_utterance[uid] if t not in DIMENSIONS
        )
        figure, axes = plt.subplots(len(tasks), 1, figsize=(9, 1.8 * len(tasks)), sharex=True, squeeze=False)
        peak = float(np.max(np.abs(waveform))) or 1.0
        for axis, task in zip(axes[:, 0], tasks, strict=True):
            weights = by_utterance[uid][task]
            span = weights.size * hop_s if hop_s else duration
            axis.imshow(
                weights[np.newaxis, :],
                aspect="auto",
                cmap="magma",
                extent=(0.0, span, -peak, peak),
                alpha=0.75,
                interpolation="nearest",
            )
            axis.plot(seconds, waveform, color="tab:cyan", linewidth=0.4)
            axis.set_xlim(0.0, max(duration, span))
            axis.set_ylim(-peak, peak)
            axis.set_ylabel(task)
            axis.set_yticks([])
        axes[-1, 0].set_xlabel("time (s)")
        figure.suptitle(f"{title}  {uid}: attention over frames")
        figure.tight_layout()
        path = out_dir / f"{_safe_key(uid).replace('/', '_')}.png"
        save_png(figure, path, dpi=80)
        written.append(path)
    return written


# --- the model ----------------------------------------------------------------------------------------


class SerModelPyfunc(AudioPyfunc):
    """A trained fold as an MLflow pyfunc: waveform(s) at the store's sample rate -> class and probabilities.

    The predictor is rebuilt by `train.training.load_predictor` from the run's model/ folder (shipped as
    the pyfunc artifact `model_dir`), so loading needs the sermtl package (the project image has it).
    Requests are parsed and checked by sermtl.mlops.serving (the same path as the registered ensemble, which
    is this with K members); the predict-time param `return_attention` adds the attention columns. The
    length limit is ServingParams' default (the fold model is not given params.yaml).
    """

    def load_context(self, context: Any) -> None:
        from sermtl.train.training import (
            load_predictor,  # lazy: torch is only needed when the model is loaded
        )

        predictor = load_predictor(Path(context.artifacts["model_dir"]))
        self.predictors = [predictor]
        self.sample_rate = int(getattr(predictor, "sample_rate", self.sample_rate))


def model_signature(dimensions: list[str] | tuple[str, ...] = DIMENSIONS) -> Any:
    """A fold model's signature: unnamed float32 (-1,) tensor in (a named TensorSpec breaks the PyTorch
    flavour), columns out, the `return_attention` param. (The registered ensemble has no input schema, so
    that it takes wav files as well: see sermtl.mlops.serving.)"""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    outputs = []
    for dimension in dimensions:
        outputs.append(ColSpec("long", f"{dimension}_class"))
        outputs += [ColSpec("double", f"{dimension}_{column}") for column in PROBABILITY_COLUMNS]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
        outputs=Schema(outputs),
        params=serving_signature(dimensions).params,
    )


def _pinned(*packages: str) -> list[str]:
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def model_requirements(kind: str) -> list[str]:
    """Explicit pip requirements: MLflow's inference would load the model in a subprocess (slow, and
    it cannot see sermtl.train.training stand-ins)."""
    common = ("mlflow", "numpy", "pandas", "pyarrow", "soundfile", "pyyaml", "scipy")
    extra = ("torch", "torchaudio") if kind == "neural" else ("scikit-learn", "joblib", "opensmile")
    return _pinned(*common, *extra)


def model_packaging(kind: str) -> dict[str, Any]:
    """log_model arguments that ship the code and pin the environment of a sermtl pyfunc."""
    import sermtl

    package = Path(sermtl.__file__).resolve().parent
    project = package.parents[1]
    return {
        "pip_requirements": model_requirements(kind),
        "code_paths": [str(package)],
        # The project's uv.lock, when there is one, pins the whole environment of the model.
        "uv_project_path": str(project) if (project / "uv.lock").is_file() else None,
    }


def _log_model(uri: str, run_id: str, model_dir: Path, kind: str, dimensions: list[str]) -> str:
    """Log the pyfunc inside the child run (MLflow 3 makes it a LoggedModel linked to the run)."""
    with fluent_tracking_uri(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=SerModelPyfunc(),
                artifacts={"model_dir": str(model_dir)},
                signature=model_signature(dimensions),
                metadata={"sermtl.kind": kind, "sermtl.dimensions": dimensions},
                **model_packaging(kind),
            )
        except BaseException:
            # not `with mlflow.start_run()`: its exit would spend a whole retry budget on a dead server
            with quick_requests(), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            raise
        mlflow.end_run()
    return info.model_uri


def register_model(
    model_uri: str, name: str, *, alias: str | None = None, tracking_uri: str | None = None
) -> str:
    """Register a fold's logged model (`models:/m-...`) as a new version of `name`; optionally alias it
    (aliases such as `champion` replace the removed stages). Returns the version."""
    uri = resolve_uri(tracking_uri)
    with fluent_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name)
    if alias:
        client(uri).set_registered_model_alias(name, alias, version.version)
    return str(version.version)


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
