"""Where runs go and how the MLflow server is reached: the tracking URI and experiments, MLflow's HTTP
retries fitted to `tracking.retry_budget_s`, one ServiceUnreachable for a server that cannot be reached,
and no run left RUNNING by a failed step (mark_failed now, fail_orphaned_runs by the next study)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.errors import ServiceUnreachable, redact_text, redact_uri
from sermtl.mlops import procinfo
from sermtl.mlops.tracking_fields import (
    MAX_TAG_VALUE,
    TAG_FAILURE,
    TAG_ORPHANED,
    TAG_PARENT,
    TAG_PIPELINE_RUN,
    TAG_PROCESS,
)
from sermtl.params import Params, TrackingParams

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "sermtl"
LOCAL_STORE_DIR = "mlruns"  # under the project dir (cwd); git-ignored
LOCAL_DB_FILE = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "artifacts"


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


def forget_abandoned(run_id: str) -> None:
    """`run_id` was ended after all (e.g. a study closed by end_study): it is no orphan any more."""
    _ABANDONED.discard(run_id)


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
