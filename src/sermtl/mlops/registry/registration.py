"""Registration: record a study's gate decision and, when it passed, register the study's proposed system
as a new version with alias `challenger`, from a child run "registration" that holds what promotion reads."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from sermtl.evaluate.gate import GateDecision, as_report, gate_decision
from sermtl.evaluate.metrics import evaluate_predictions, validate_predictions
from sermtl.mlops import tracking
from sermtl.mlops.registry.common import (
    ARTIFACT_GATE,
    ARTIFACT_OOF,
    ARTIFACT_SIGNIFICANCE,
    ARTIFACT_STUDY_GATE,
    CHALLENGER,
    REGISTRATION_RUN_NAME,
    TAG_GATE_PASSED,
    TAG_GATE_REASONS,
    TAG_GATE_RULE,
    TAG_GATE_TEST,
    TAG_N_UTTERANCES,
    TAG_OOF,
    TAG_P,
    TAG_REGISTERED_MODEL,
    TAG_REGISTERED_VERSION,
    TAG_REGISTRATION_RUN,
    TAG_STUDY_RUN,
    TAG_UAR,
    RegistryError,
    actor_name,
    client_for,
    iso,
    now,
    tag_value,
)
from sermtl.mlops.registry.lock import PromotionLock
from sermtl.mlops.registry.records import all_versions
from sermtl.params import Params
from sermtl.schema import PREDICTIONS_FILE, run_dir


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str | None  # None: the gate failed, nothing registered
    decision: GateDecision
    model_uri: str | None = None
    registration_run_id: str | None = None
    reused: bool = False  # the study already had a version: nothing new registered

    def describe(self) -> str:
        if self.version is None:
            return f"gate failed, nothing registered: {'; '.join(self.decision.reasons)}"
        state = "already registered as" if self.reused else "registered"
        return f"gate passed; {state} {self.name} version {self.version} (alias {CHALLENGER})"


@dataclass(frozen=True)
class _Evaluation:
    """What a registration logs and tags besides the model: the pooled out-of-fold evaluation and the gate."""

    oof: pd.DataFrame
    uars: dict[str, float]
    report: Any  # the study's SignificanceReport
    record: dict[str, Any]  # the gate decision as recorded on the study run
    decision: GateDecision


def pooled_predictions(train_dir: Path, system: str, folds: list[int]) -> pd.DataFrame:
    """The out-of-fold predictions of `system` over `folds` (one table); a missing fold is an error."""
    frames = []
    for fold in folds:
        path = run_dir(train_dir, system, fold) / PREDICTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; has fold {fold} of {system} been trained?")
        frames.append(validate_predictions(pd.read_parquet(path), str(path)))
    return pd.concat(frames, ignore_index=True)


def _pooled_uars(predictions: pd.DataFrame, dimensions: list[str]) -> dict[str, float]:
    by_dimension = evaluate_predictions(predictions)["all"]
    uars = {d: float(by_dimension[d]["uar"]) for d in dimensions if d in by_dimension}
    finite = [v for v in uars.values() if math.isfinite(v)]
    uars["mean"] = float(sum(finite) / len(finite)) if finite else float("nan")
    return uars


def _gate_tags(decision: GateDecision) -> dict[str, str]:
    return {
        TAG_GATE_PASSED: str(decision.passed).lower(),
        TAG_GATE_TEST: decision.test,
        TAG_GATE_REASONS: tag_value(decision.reasons),
        TAG_GATE_RULE: tag_value(decision.rule),
    }


def _find_study_version(mlflow_client: MlflowClient, name: str, study_run_id: str) -> Any | None:
    for version in all_versions(mlflow_client, name):
        if (version.tags or {}).get(TAG_STUDY_RUN) == study_run_id:
            return version
    return None


def record_gate_decision(
    study_run_id: str, decision: GateDecision, params: Params, *, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Record a gate decision on the study run: tags `sermtl.gate.*` (passed, test, reasons, rule),
    `sermtl.registry.model`, the artifact registry/gate.json; a failed gate also sets
    `sermtl.registry.version=none` (nothing registered). Returns the JSON record."""
    _, mlflow_client = client_for(tracking_uri)
    name = params.registry.model_name
    record = {"model": name, "recorded_at": iso(now()), **decision.to_dict()}
    tags = {**_gate_tags(decision), TAG_REGISTERED_MODEL: name}
    if not decision.passed:
        tags[TAG_REGISTERED_VERSION] = "none"
    tracking.log_tags(mlflow_client, study_run_id, tags)
    mlflow_client.log_text(study_run_id, json.dumps(record, indent=2) + "\n", ARTIFACT_STUDY_GATE)
    return record


def register_study_model(
    study_run_id: str,
    train_dir: Path,
    report: Any,
    params: Params,
    *,
    data_version: str | None = None,
    pipeline_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> RegistrationResult:
    """Gate a finished study and, if it passes, register its proposed system as a new `challenger`.

    `report` is the study's SignificanceReport (or its dict, e.g. significance.json). The gate decision is
    always recorded on the study run. Re-running for a study that already has a version (tag
    `sermtl.study_run_id`) registers nothing new and returns that version (`reused=True`), without moving
    `challenger` (a newer study may hold it by now). Provenance tags not given here (data version,
    pipeline run, git commit) are taken from the study run.
    """
    uri, mlflow_client = client_for(tracking_uri)
    report = as_report(report)
    name = params.registry.model_name
    system = params.eval.proposed_system
    decision = gate_decision(report, params.registry.gate)
    study = mlflow_client.get_run(study_run_id)
    study_tags = study.data.tags
    if report.proposed != system:
        raise RegistryError(
            f"the significance report tests {report.proposed!r} but eval.proposed_system is {system!r}"
        )

    record = record_gate_decision(study_run_id, decision, params, tracking_uri=uri)
    if not decision.passed:
        return RegistrationResult(name, None, decision)

    existing = _find_study_version(mlflow_client, name, study_run_id)
    if existing is not None:
        mlflow_client.set_tag(study_run_id, TAG_REGISTERED_VERSION, str(existing.version))
        return RegistrationResult(
            name,
            str(existing.version),
            decision,
            model_uri=existing.source,
            registration_run_id=existing.run_id,
            reused=True,
        )

    folds = list(range(len(params.data.sessions)))
    oof = pooled_predictions(Path(train_dir), system, folds)
    evaluation = _Evaluation(oof, _pooled_uars(oof, list(params.eval.dimensions)), report, record, decision)
    provenance = {
        tracking.TAG_DATA_VERSION: data_version or study_tags.get(tracking.TAG_DATA_VERSION),
        tracking.TAG_PIPELINE_RUN: pipeline_run_id or study_tags.get(tracking.TAG_PIPELINE_RUN),
        tracking.TAG_GIT_COMMIT: study_tags.get(tracking.TAG_GIT_COMMIT) or tracking.git_commit(),
    }
    run_id = _open_registration_run(mlflow_client, study_run_id, study, system, provenance)
    try:
        from sermtl.mlops import model_logging

        model_uri = model_logging.log_ensemble_model(
            Path(train_dir), system, folds, params, run_id=run_id, tracking_uri=uri
        )
        _log_evaluation(mlflow_client, run_id, evaluation)
        version_tags = _version_tags(study_run_id, run_id, system, evaluation, provenance)
        version, reused = _register_version(
            mlflow_client,
            uri=uri,
            params=params,
            study_run_id=study_run_id,
            run_id=run_id,
            model_uri=model_uri,
            version_tags=version_tags,
        )
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        tracking.mark_failed(mlflow_client, run_id, exc)
        raise
    mlflow_client.set_tag(study_run_id, TAG_REGISTERED_VERSION, version)
    return RegistrationResult(name, version, decision, model_uri, run_id, reused)


def _open_registration_run(
    mlflow_client: MlflowClient,
    study_run_id: str,
    study: Any,
    system: str,
    provenance: dict[str, str | None],
) -> str:
    """The child run "registration" of the study run, after closing one an earlier attempt left open."""
    study_tags = study.data.tags
    # an earlier attempt that could not close its registration run (the server was gone) is closed now
    tracking.fail_orphaned_runs(
        mlflow_client,
        study.info.experiment_id,
        run_name=REGISTRATION_RUN_NAME,
        parent=study_run_id,
        pipeline_run_id=provenance[tracking.TAG_PIPELINE_RUN],
    )
    run = mlflow_client.create_run(
        study.info.experiment_id,
        run_name=REGISTRATION_RUN_NAME,
        tags={
            tracking.TAG_PARENT: study_run_id,
            tracking.TAG_KIND: "registration",
            tracking.TAG_SYSTEM: system,
            tracking.TAG_STUDY: study_tags.get(tracking.TAG_STUDY, ""),
            TAG_STUDY_RUN: study_run_id,
            **{k: v for k, v in provenance.items() if v},
            **{k: v for k, v in study_tags.items() if k in (tracking.TAG_KFP_RUN, tracking.TAG_KFP_TASK)},
            **tracking.process_tags(),
        },
    )
    return run.info.run_id


def _log_evaluation(mlflow_client: MlflowClient, run_id: str, evaluation: _Evaluation) -> None:
    """The artifacts promotion downloads (out-of-fold predictions, report, gate) and the pooled UARs."""
    with tempfile.TemporaryDirectory(prefix="sermtl-registration-") as tmp:
        folder = Path(tmp) / "evaluation"
        folder.mkdir()
        evaluation.oof.to_parquet(folder / Path(ARTIFACT_OOF).name, index=False)
        report = json.dumps(evaluation.report.to_dict(), indent=2)
        (folder / Path(ARTIFACT_SIGNIFICANCE).name).write_text(report)
        (folder / Path(ARTIFACT_GATE).name).write_text(json.dumps(evaluation.record, indent=2) + "\n")
        mlflow_client.log_artifacts(run_id, str(folder), "evaluation")
    mlflow_client.log_batch(
        run_id,
        metrics=[
            Metric(f"pooled_uar_{key}", value, tracking.now_ms(), 0)
            for key, value in evaluation.uars.items()
            if math.isfinite(value)
        ],
        tags=[RunTag(k, v) for k, v in _gate_tags(evaluation.decision).items()],
    )


def _version_tags(
    study_run_id: str,
    run_id: str,
    system: str,
    evaluation: _Evaluation,
    provenance: dict[str, str | None],
) -> dict[str, str]:
    return {
        TAG_STUDY_RUN: study_run_id,
        TAG_REGISTRATION_RUN: run_id,
        tracking.TAG_SYSTEM: system,
        TAG_OOF: ARTIFACT_OOF,
        TAG_N_UTTERANCES: str(int(evaluation.oof["utterance_id"].nunique())),
        **{f"{TAG_UAR}.{key}": f"{value:.6f}" for key, value in evaluation.uars.items()},
        **{
            f"{TAG_P}.{baseline}.{dimension}": f"{p:.6g}"
            for baseline, by_dimension in evaluation.decision.p_values.items()
            for dimension, p in by_dimension.items()
        },
        **_gate_tags(evaluation.decision),
        **{k: v for k, v in provenance.items() if v},
    }


def _register_version(
    mlflow_client: MlflowClient,
    *,
    uri: str,
    params: Params,
    study_run_id: str,
    run_id: str,
    model_uri: str,
    version_tags: dict[str, str],
) -> tuple[str, bool]:
    """Under the lock: the new version with alias `challenger`, unless a concurrent twin registered this
    study first (then its version, reused). Returns the version and whether it was reused."""
    name = params.registry.model_name
    with PromotionLock(
        mlflow_client,
        name,
        owner=actor_name(None),
        timeout_s=params.registry.promotion.lock_timeout_s,
        purpose="registration",
    ):
        existing = _find_study_version(mlflow_client, name, study_run_id)  # a concurrent twin?
        if existing is not None:
            mlflow_client.set_tag(run_id, "sermtl.registration.duplicate_of", str(existing.version))
            return str(existing.version), True
        with tracking.fluent_tracking_uri(uri):
            registered = mlflow.register_model(model_uri, name, tags=version_tags)
        version = str(registered.version)
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
        return version, False
