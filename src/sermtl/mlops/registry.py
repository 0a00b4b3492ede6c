"""MLflow Model Registry: the registration gate, promotion to `champion`, rollback, and the registry's state.

Design notes (why it is built this way): docs/design/registry.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.evaluate.gate import GateDecision, as_report, gate_decision
from sermtl.evaluate.metrics import evaluate_predictions, validate_predictions
from sermtl.mlops import procinfo, tracking
from sermtl.params import Params, PromotionParams
from sermtl.schema import PREDICTIONS_FILE, run_dir

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous_champion"
LOCK_SUFFIX = ".promotion-lock"
BROKEN_LOCK_INFIX = ".broken-"
REGISTRATION_RUN_NAME = "registration"
REASON_REQUIRED = "needs a non-empty reason (--reason): the audit trail records why the champion changed"
MIN_PAIRED_UTTERANCES = 30  # fewer common utterances than this and a promotion comparison is refused

# Artifacts of the registration run (the registered version's source run) and of the study run.
ARTIFACT_OOF = "evaluation/oof_predictions.parquet"
ARTIFACT_SIGNIFICANCE = "evaluation/significance.json"
ARTIFACT_GATE = "evaluation/gate.json"
ARTIFACT_STUDY_GATE = "registry/gate.json"
ARTIFACT_PROMOTIONS = "promotions"  # evidence JSON of each promotion, in the promoted version's run

# Tags on model versions (and, for the gate, on the study run).
TAG_STUDY_RUN = "sermtl.study_run_id"
TAG_REGISTRATION_RUN = "sermtl.registration_run_id"
TAG_OOF = "sermtl.oof_predictions"  # artifact path in the registration run
TAG_N_UTTERANCES = "sermtl.n_utterances"
TAG_UAR = "sermtl.uar"  # sermtl.uar.<dimension> and sermtl.uar.mean: pooled out-of-fold UAR, all utterances
TAG_P = "sermtl.p"  # sermtl.p.<baseline>.<dimension>: corrected p-value of the gate's test
TAG_GATE_PASSED = "sermtl.gate.passed"  # true | false
TAG_GATE_TEST = "sermtl.gate.test"
TAG_GATE_REASONS = "sermtl.gate.reasons"  # JSON list
TAG_GATE_RULE = "sermtl.gate.rule"
TAG_REGISTERED_VERSION = "sermtl.registry.version"  # on the study run: the version, or "none"
TAG_REGISTERED_MODEL = "sermtl.registry.model"
TAG_PROMOTED_BY = "sermtl.promotion.by"
TAG_PROMOTED_AT = "sermtl.promotion.at"
TAG_PROMOTION_REASON = "sermtl.promotion.reason"
TAG_PROMOTION_FORCED = "sermtl.promotion.forced"
TAG_PROMOTION_EVIDENCE = "sermtl.promotion.evidence"  # JSON of the comparison
TAG_PROMOTION_EVIDENCE_ARTIFACT = "sermtl.promotion.evidence_artifact"
TAG_PROMOTION_REPLACED = "sermtl.promotion.replaced"  # the champion it replaced, or "none"
TAG_LAST_REFUSAL = "sermtl.promotion.last_refusal"  # JSON: who, when, why a promotion was refused
TAG_ROLLED_BACK = "sermtl.rollback.demoted"  # JSON on the version a rollback moved the champion away from
TAG_RESTORED = "sermtl.rollback.restored"  # JSON on the version a rollback made champion again
# Tags on the registered model.
TAG_HISTORY = "sermtl.champion.history"  # JSON list of earlier champions, oldest first
TAG_CHAMPION_VERSION = "sermtl.champion.version"
TAG_CHAMPION_BY = "sermtl.champion.by"
TAG_CHAMPION_AT = "sermtl.champion.at"
TAG_CHAMPION_REASON = "sermtl.champion.reason"
TAG_CHAMPION_ACTION = "sermtl.champion.action"  # promote | rollback
TAG_AUDIT = "sermtl.audit"  # sermtl.audit.<NNNNN>: one JSON entry per champion change
# Tags on the lock (a registered model of its own).
LOCK_OWNER = "sermtl.lock.owner"
LOCK_TOKEN = "sermtl.lock.token"
LOCK_HOST = "sermtl.lock.host"
LOCK_PID = "sermtl.lock.pid"
LOCK_PREFIX = "sermtl.lock."  # with host, pid, started, machine: the holder as a procinfo.ProcessId
LOCK_PURPOSE = "sermtl.lock.purpose"
LOCK_ACQUIRED_AT = "sermtl.lock.acquired_at"
LOCK_EXPIRES = "sermtl.lock.expires_unix"  # seconds since the epoch, the holder's clock
LOCK_EXPIRES_AT = "sermtl.lock.expires_at"  # the same, ISO, for people

MAX_TAG_VALUE = 8000  # kept under MLflow's limits for every tag kind (runs: 8000)


class RegistryError(RuntimeError):
    """Something about the registry is wrong or missing (no such model, version or alias)."""


class PromotionRefused(RegistryError):
    """A promotion or rollback that moved nothing, and why. `kind` says which check refused:
    input | gate | evidence | rule | already_champion | stale | lock_timeout | no_history | lock_lost."""

    def __init__(self, message: str, kind: str, result: PromotionResult | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.result = result

    @property
    def conflict(self) -> bool:
        """Refused because of a concurrent change (re-running may succeed), not by policy."""
        return self.kind in ("stale", "lock_timeout", "lock_lost")


class LockTimeout(RegistryError):
    """The registry lock stayed held by someone else for the whole wait."""


# Tokens of the locks this process holds: a lock recorded as held by this very process with a token not
# in here was left by an earlier holder in it whose release failed (e.g. the server was gone).
_HELD_TOKENS: set[str] = set()


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | float) -> str:
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else _json(value)
    return text[:MAX_TAG_VALUE]


def _is(exc: MlflowException, *codes: str) -> bool:
    return getattr(exc, "error_code", None) in codes


# --- the lock --------------------------------------------------------------------------------------------


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


class PromotionLock:
    """Mutual exclusion for alias changes of registered model `name`, through the MLflow API only.

    - acquire: `create_registered_model("<name>.promotion-lock")` with tags owner, token (unique per
      acquisition), host, pid, acquired/expiry times. The store's unique name makes that succeed for
      exactly one caller; the others get RESOURCE_ALREADY_EXISTS and poll every `poll_s` (with jitter)
      until `timeout_s` has passed, then raise LockTimeout naming the holder.
    - expiry: a lock expires `expiry_s` (default `timeout_s`) after it was taken, by the holder's clock
      (clocks are assumed in sync to well under that). A lock whose holder provably no longer runs (it
      records host, pid, the pid's start time, boot id and pid namespace: sermtl.mlops.procinfo) is stale at
      once, so a SIGKILLed promotion on this machine costs no wait; one held from another machine or
      container waits for its expiry. A waiter that finds a stale lock (expired, or its holder gone)
      breaks it: it first creates the marker `<lock>.broken-<token>` (again a unique
      name, so exactly one waiter breaks a given stale lock, and a slow waiter can never delete a
      *newer* lock by mistake), then deletes the lock if its token is still the stale one, and competes
      for it again. The markers stay, tagged with who broke whose lock when: an audit trail.
    - release: deletes the lock if it still holds our token (a lock broken after our expiry is left to
      its new holder); best effort, it never raises. `held()` is checked before the critical write: a
      holder past its expiry refuses.
    """

    def __init__(
        self,
        mlflow_client: MlflowClient,
        name: str,
        *,
        owner: str,
        timeout_s: float,
        expiry_s: float | None = None,
        purpose: str = "promotion",
        poll_s: float = 0.2,
    ) -> None:
        self.client = mlflow_client
        self.name = name
        self.lock_name = lock_name(name)
        self.owner = owner
        self.timeout_s = float(timeout_s)
        self.expiry_s = float(expiry_s if expiry_s is not None else timeout_s)
        self.purpose = purpose
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.expires_unix: float | None = None
        self.broken: list[str] = []  # tokens of stale locks this caller broke
        self.waited_s = 0.0

    def _try_create(self) -> bool:
        now = time.time()
        expires = now + self.expiry_s
        tags = {
            LOCK_OWNER: self.owner,
            LOCK_TOKEN: self.token,
            **procinfo.current().to_tags(LOCK_PREFIX),  # LOCK_HOST, LOCK_PID, start time, machine
            LOCK_PURPOSE: self.purpose,
            LOCK_ACQUIRED_AT: _iso(now),
            LOCK_EXPIRES: f"{expires:.3f}",
            LOCK_EXPIRES_AT: _iso(expires),
        }
        try:
            self.client.create_registered_model(
                self.lock_name,
                tags=tags,
                description=f"Lock on alias changes of {self.name} (sermtl.mlops.registry); "
                "deleted when released, breakable once expired.",
            )
        except MlflowException as exc:
            # DOES_NOT_EXIST: the store's own re-read after a name clash found the lock already released.
            if _is(exc, "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise
        self.expires_unix = expires
        _HELD_TOKENS.add(self.token)
        return True

    def holder(self) -> dict[str, str] | None:
        """Tags of the current lock (plus `created_unix`), or None when nobody holds it."""
        try:
            model = self.client.get_registered_model(self.lock_name)
        except MlflowException as exc:
            if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise
        tags = dict(model.tags or {})
        tags["created_unix"] = f"{(model.creation_timestamp or 0) / 1000:.3f}"
        return tags

    def _expiry_of(self, holder: Mapping[str, str]) -> float:
        try:
            return float(holder[LOCK_EXPIRES])
        except (KeyError, ValueError):  # not one of ours, or damaged: expire from its creation time
            return float(holder.get("created_unix", 0.0)) + self.expiry_s

    def _stale(self, holder: Mapping[str, str]) -> str | None:
        """Why the lock `holder` may be broken now, or None while it must be waited for."""
        if time.time() > self._expiry_of(holder):
            return f"expired at {holder.get(LOCK_EXPIRES_AT, '?')}"
        process = procinfo.ProcessId.from_tags(holder, LOCK_PREFIX)
        if process is None:
            return None
        if process == procinfo.current():
            if holder.get(LOCK_TOKEN) not in _HELD_TOKENS:
                return "left by this process, which no longer holds it"
            return None
        if procinfo.is_gone(process):
            return f"its holder ({process.describe()}) is gone"
        return None

    def _break(self, holder: Mapping[str, str], why: str = "expired") -> None:
        stale = holder.get(LOCK_TOKEN) or f"created-{holder.get('created_unix', '0').replace('.', '')}"
        try:
            self.client.create_registered_model(
                f"{self.lock_name}{BROKEN_LOCK_INFIX}{stale}",
                tags={
                    "sermtl.lock.broken_by": self.owner,
                    "sermtl.lock.broken_at": _iso(time.time()),
                    "sermtl.lock.broken_because": why,
                    "sermtl.lock.stale_owner": holder.get(LOCK_OWNER, "?"),
                    "sermtl.lock.stale_host": holder.get(LOCK_HOST, "?"),
                    "sermtl.lock.stale_pid": holder.get(LOCK_PID, "?"),
                    "sermtl.lock.stale_acquired_at": holder.get(LOCK_ACQUIRED_AT, "?"),
                    "sermtl.lock.stale_expires_at": holder.get(LOCK_EXPIRES_AT, "?"),
                },
                description=f"Marker: the stale lock {stale} on {self.name} was broken here.",
            )
        except MlflowException as exc:
            if _is(exc, "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return  # another waiter is breaking (or broke) this very lock
            raise
        current = self.holder()
        current_token = (current or {}).get(LOCK_TOKEN) or (
            f"created-{(current or {}).get('created_unix', '0').replace('.', '')}" if current else None
        )
        if current is not None and current_token == stale:
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException as exc:
                if tracking.is_unreachable(exc):
                    raise
        self.broken.append(stale)

    def acquire(self) -> PromotionLock:
        started = time.monotonic()
        deadline = started + self.timeout_s
        while True:
            if self._try_create():
                break
            holder = self.holder()
            if holder is not None and holder.get(LOCK_TOKEN) == self.token:
                # our create reached the store but its answer was lost and the request retried
                self.expires_unix = self._expiry_of(holder)
                _HELD_TOKENS.add(self.token)
                break
            why = self._stale(holder) if holder is not None else None
            if why is not None:
                self._break(holder, why)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.waited_s = time.monotonic() - started
                who = (
                    f"{holder.get(LOCK_OWNER, '?')} (pid {holder.get(LOCK_PID, '?')} on "
                    f"{holder.get(LOCK_HOST, '?')}, {holder.get(LOCK_PURPOSE, '?')}) since "
                    f"{holder.get(LOCK_ACQUIRED_AT, '?')}, expiring {holder.get(LOCK_EXPIRES_AT, '?')}"
                    if holder
                    else "someone who keeps re-taking it"
                )
                raise LockTimeout(
                    f"registry lock {self.lock_name!r} held by {who}; gave up after {self.timeout_s:g} s"
                )
            if holder is not None:
                time.sleep(min(remaining, self.poll_s * (0.5 + random.random())))
        self.waited_s = time.monotonic() - started
        return self

    def held(self) -> bool:
        """Still ours: our token on the lock and not past our expiry."""
        if self.expires_unix is None or time.time() >= self.expires_unix:
            return False
        holder = self.holder()
        return holder is not None and holder.get(LOCK_TOKEN) == self.token

    def release(self, *, quick: bool = False) -> None:
        """Delete the lock if it is still ours. Never raises: a lock that cannot be deleted (the server
        is gone) is broken by the next holder, at once if this process has ended by then, else after its
        expiry. `quick`: one attempt per call, for a release after a failure."""
        if self.expires_unix is None:
            return
        self.expires_unix = None
        _HELD_TOKENS.discard(self.token)
        with contextlib.ExitStack() as stack:
            if quick:
                stack.enter_context(tracking.quick_requests())
            with contextlib.suppress(Exception):
                holder = self.holder()
                if holder is not None and holder.get(LOCK_TOKEN) == self.token:
                    self.client.delete_registered_model(self.lock_name)

    def __enter__(self) -> PromotionLock:
        return self.acquire()

    def __exit__(self, kind: object, *exc: object) -> None:
        self.release(quick=kind is not None)


# --- reading the registry ---------------------------------------------------------------------------------


def _client(tracking_uri: str | None) -> tuple[str, MlflowClient]:
    uri = tracking.resolve_uri(tracking_uri)
    return uri, tracking.client(uri)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _versions(mlflow_client: MlflowClient, name: str) -> list[Any]:
    """Every version of `name` (all pages), oldest first; [] when the model does not exist."""
    found, token = [], None
    while True:
        page = mlflow_client.search_model_versions(
            f"name = '{_quote(name)}'", max_results=200, page_token=token
        )
        found.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return sorted(found, key=lambda v: int(v.version))


def _model(mlflow_client: MlflowClient, name: str) -> Any:
    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise RegistryError(f"no registered model named {name!r}") from exc
        raise


def _aliases(mlflow_client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in (_model(mlflow_client, name).aliases or {}).items()}


def _version(mlflow_client: MlflowClient, name: str, version: str) -> Any:
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{name} has no version {version!r}") from exc
        raise


def _history(model: Any) -> list[str]:
    raw = (model.tags or {}).get(TAG_HISTORY)
    if not raw:
        return []
    try:
        loaded = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [str(v) for v in loaded] if isinstance(loaded, list) else []


def _normalised(history: list[str], champion: str | None) -> list[str]:
    """`history` without repeats in a row and without the champion on top: what a promotion or rollback
    killed between its writes leaves (the champion pushed onto its own history). A version is then never
    its own previous champion, and rollback walks to the champion before it."""
    out: list[str] = []
    for version in history:
        if not out or out[-1] != version:
            out.append(version)
    while out and champion is not None and out[-1] == champion:
        out.pop()
    return out


def _repair(mlflow_client: MlflowClient, name: str, actor: str) -> Any:
    """Under the lock, before deciding: undo what an interrupted promotion or rollback left (see
    `_normalised`; `previous_champion` on the top of the history), and audit a champion that moved
    without an audit entry (a rollback killed after its commit point, or an alias set by hand): action
    "repair". Returns the model as re-read."""
    model = _model(mlflow_client, name)
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    champion = aliases.get(CHAMPION)
    recorded = (model.tags or {}).get(TAG_CHAMPION_VERSION)
    audited = champion is not None and recorded is not None and recorded != champion
    if audited:
        record = {
            "action": "repair",
            "version": champion,
            "from": recorded,
            "actor": actor,
            "at": _iso(_now()),
        }
        record["reason"] = (
            f"champion alias found on version {champion} while the audit trail ends at {recorded}: moved "
            "by an interrupted promotion or rollback, or by hand"
        )
        _record_champion_change(mlflow_client, model, champion, record)
    stored = _history(model)
    history = _normalised(stored, champion)
    previous = history[-1] if history else None
    if history == stored and aliases.get(PREVIOUS_CHAMPION) == previous:
        return _model(mlflow_client, name) if audited else model
    if history != stored:
        mlflow_client.set_registered_model_tag(name, TAG_HISTORY, _json(history))
    if previous is not None and aliases.get(PREVIOUS_CHAMPION) != previous:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
    elif previous is None and PREVIOUS_CHAMPION in aliases:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    return _model(mlflow_client, name)


# --- registration ----------------------------------------------------------------------------------------


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
        TAG_GATE_REASONS: _tag_value(decision.reasons),
        TAG_GATE_RULE: _tag_value(decision.rule),
    }


def _find_study_version(mlflow_client: MlflowClient, name: str, study_run_id: str) -> Any | None:
    for version in _versions(mlflow_client, name):
        if (version.tags or {}).get(TAG_STUDY_RUN) == study_run_id:
            return version
    return None


def record_gate_decision(
    study_run_id: str, decision: GateDecision, params: Params, *, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Record a gate decision on the study run: tags `sermtl.gate.*` (passed, test, reasons, rule),
    `sermtl.registry.model`, the artifact registry/gate.json; a failed gate also sets
    `sermtl.registry.version=none` (nothing registered). Returns the JSON record."""
    _, mlflow_client = _client(tracking_uri)
    name = params.registry.model_name
    record = {"model": name, "recorded_at": _iso(_now()), **decision.to_dict()}
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
    uri, mlflow_client = _client(tracking_uri)
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
    uars = _pooled_uars(oof, list(params.eval.dimensions))
    provenance = {
        tracking.TAG_DATA_VERSION: data_version or study_tags.get(tracking.TAG_DATA_VERSION),
        tracking.TAG_PIPELINE_RUN: pipeline_run_id or study_tags.get(tracking.TAG_PIPELINE_RUN),
        tracking.TAG_GIT_COMMIT: study_tags.get(tracking.TAG_GIT_COMMIT) or tracking.git_commit(),
    }
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
    run_id = run.info.run_id
    try:
        from sermtl.mlops import model_logging

        model_uri = model_logging.log_ensemble_model(
            Path(train_dir), system, folds, params, run_id=run_id, tracking_uri=uri
        )
        with tempfile.TemporaryDirectory(prefix="sermtl-registration-") as tmp:
            folder = Path(tmp) / "evaluation"
            folder.mkdir()
            oof.to_parquet(folder / Path(ARTIFACT_OOF).name, index=False)
            (folder / Path(ARTIFACT_SIGNIFICANCE).name).write_text(json.dumps(report.to_dict(), indent=2))
            (folder / Path(ARTIFACT_GATE).name).write_text(json.dumps(record, indent=2) + "\n")
            mlflow_client.log_artifacts(run_id, str(folder), "evaluation")
        mlflow_client.log_batch(
            run_id,
            metrics=[
                Metric(f"pooled_uar_{key}", value, tracking.now_ms(), 0)
                for key, value in uars.items()
                if math.isfinite(value)
            ],
            tags=[RunTag(k, v) for k, v in _gate_tags(decision).items()],
        )
        version_tags = {
            TAG_STUDY_RUN: study_run_id,
            TAG_REGISTRATION_RUN: run_id,
            tracking.TAG_SYSTEM: system,
            TAG_OOF: ARTIFACT_OOF,
            TAG_N_UTTERANCES: str(int(oof["utterance_id"].nunique())),
            **{f"{TAG_UAR}.{key}": f"{value:.6f}" for key, value in uars.items()},
            **{
                f"{TAG_P}.{baseline}.{dimension}": f"{p:.6g}"
                for baseline, by_dimension in decision.p_values.items()
                for dimension, p in by_dimension.items()
            },
            **_gate_tags(decision),
            **{k: v for k, v in provenance.items() if v},
        }
        with PromotionLock(
            mlflow_client,
            name,
            owner=_actor(None),
            timeout_s=params.registry.promotion.lock_timeout_s,
            purpose="registration",
        ):
            existing = _find_study_version(mlflow_client, name, study_run_id)  # a concurrent twin?
            if existing is not None:
                mlflow_client.set_tag(run_id, "sermtl.registration.duplicate_of", str(existing.version))
                version, reused = str(existing.version), True
            else:
                with tracking.fluent_tracking_uri(uri):
                    registered = mlflow.register_model(model_uri, name, tags=version_tags)
                version, reused = str(registered.version), False
                mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        tracking.mark_failed(mlflow_client, run_id, exc)
        raise
    mlflow_client.set_tag(study_run_id, TAG_REGISTERED_VERSION, version)
    return RegistrationResult(name, version, decision, model_uri, run_id, reused)


# --- comparing two versions --------------------------------------------------------------------------------


def _version_predictions(mlflow_client: MlflowClient, version: Any, folder: Path) -> pd.DataFrame | None:
    """The out-of-fold predictions a version was registered with, or None if it has none."""
    tags = version.tags or {}
    run_id = tags.get(TAG_REGISTRATION_RUN) or version.run_id
    if not run_id:
        return None
    try:
        local = mlflow_client.download_artifacts(run_id, tags.get(TAG_OOF, ARTIFACT_OOF), str(folder))
    except (MlflowException, OSError) as exc:
        if tracking.is_unreachable(exc):
            raise
        return None
    where = f"{version.name} version {version.version} ({TAG_OOF})"
    return validate_predictions(pd.read_parquet(local), where)


# The test whose corrected p-values make "significantly better" (rule `better`) and the informative
# "significantly worse": the paired resampling test at significance.unit, whose interval `not_worse` reads.
PROMOTION_TEST = "resampling"
_MARGIN_SLACK = 1e-12  # floating-point slack when comparing a lower bound with -margin


@dataclass(frozen=True)
class PromotionDecision:
    """`registry.promotion.rule` applied to one challenger-vs-champion significance report."""

    passed: bool
    rule: str  # not_worse | better
    margin: float  # registry.promotion.margin, in UAR units
    reasons: list[str]  # why it passed or was refused, naming dimensions and intervals
    non_inferior: list[str]  # dimensions whose interval's lower bound is at least -margin
    better: list[str]  # dimensions where the challenger is significantly better (PROMOTION_TEST)
    worse: list[str]  # where it is significantly worse (within the margin this does not refuse)
    intervals: dict[str, list[float]]  # dimension -> [low, high] of (challenger - champion) UAR
    confidence: float  # of the intervals (significance.confidence)
    unit: str  # what the test and the intervals resampled (significance.unit)
    test: str = PROMOTION_TEST

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def promotion_decision(
    report: Any, promotion: PromotionParams, champion: str = "champion"
) -> PromotionDecision:
    """Whether the report's proposed system (the challenger) may replace `champion` (its baseline).

    - `not_worse` (non-inferiority): on EVERY dimension of the report the lower bound of the interval of
      (challenger - champion) UAR, `Comparison.ci_low` (at significance.confidence, resampling
      significance.unit: at the default unit speaker the inversion of the sign-flip test), is at least
      -`promotion.margin`. Each dimension is a one-sided test at level (1 - confidence) / 2 of "the
      challenger is more than `margin` worse"; requiring every one of them (an intersection-union test)
      keeps that level without a correction for the dimensions. "No significant difference" is not
      "not worse": a wide interval (few speakers, noisy systems) refuses, whatever the point estimate.
    - `better`: the same, and significantly better on at least one dimension by the resampling test's
      corrected p-values (significance.correction over the dimensions, at significance.alpha).

    A significant loss smaller than the margin does not refuse (the margin says it is acceptable); it is
    listed in `worse` and in the reasons. `report` is a SignificanceReport or its `to_dict()`.
    """
    from sermtl.evaluate.significance import decisive

    report = as_report(report)
    verdicts = decisive(report, PROMOTION_TEST)
    comparisons = [c for c in report.comparisons if c.baseline == champion]
    confidence = float(report.params.get("confidence", float("nan")))
    unit = comparisons[0].unit if comparisons else str(report.params.get("unit", ""))
    margin = float(promotion.margin)
    level = f"{confidence:.0%} interval" if math.isfinite(confidence) else "interval"
    intervals = {c.dimension: [c.ci_low, c.ci_high] for c in comparisons}
    non_inferior = [c.dimension for c in comparisons if c.ci_low >= -margin - _MARGIN_SLACK]
    better = [c.dimension for c in comparisons if verdicts[(champion, c.dimension)].better]
    worse = [c.dimension for c in comparisons if verdicts[(champion, c.dimension)].worse]
    reasons: list[str] = []
    if not comparisons:
        reasons.append(f"the significance report holds no comparison with {champion!r}")
    for c in comparisons:
        if c.dimension not in non_inferior:
            significant = ", significantly worse" if c.dimension in worse else ""
            reasons.append(
                f"{c.dimension}: challenger - champion UAR {c.difference:+.4f}, {level} "
                f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] by {unit}: its lower bound is below -margin = "
                f"{-margin:+.4f}{significant}; not shown to be at most {margin:g} worse"
            )
    passed = bool(comparisons) and len(non_inferior) == len(comparisons)
    if passed:
        bounds = ", ".join(f"{c.dimension} {c.ci_low:+.4f}" for c in comparisons)
        reasons.append(
            f"non-inferior on every dimension: lower bounds of the {level}s of challenger - champion UAR "
            f"by {unit} ({bounds}) are all at least -margin = {-margin:+.4f}"
        )
        within = [d for d in worse if d in non_inferior]
        if within:
            reasons.append(f"significantly worse on {', '.join(within)}, by less than the margin")
    if promotion.rule == "better":
        tested = (
            f"{PROMOTION_TEST} test by {unit}, {report.params.get('correction')}-corrected p at alpha "
            f"{report.params.get('alpha')}"
        )
        if better:
            reasons.append(f"significantly better than the champion on {', '.join(better)} ({tested})")
        else:
            passed = False
            reasons.append(
                f"rule `better`: not significantly better than the champion on any dimension ({tested})"
            )
    return PromotionDecision(
        passed=passed,
        rule=promotion.rule,
        margin=margin,
        reasons=reasons,
        non_inferior=non_inferior,
        better=better,
        worse=worse,
        intervals=intervals,
        confidence=confidence,
        unit=unit,
    )


def compare_predictions(
    challenger: pd.DataFrame,
    champion: pd.DataFrame,
    params: Params,
    *,
    min_paired: int = MIN_PAIRED_UTTERANCES,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Challenger vs champion on their common utterances with the study's paired tests (no server).

    `challenger` and `champion` are out-of-fold prediction tables (evaluate.metrics.PREDICTION_COLUMNS; their
    `system` column is replaced). They are paired per dimension on utterance ids present in both (labels
    must agree: otherwise it is not the same evaluation data), then sermtl.evaluate.significance runs with the
    challenger as proposed system and the champion as the only baseline (same settings: resampling, unit,
    resamples, confidence, alpha, correction over the dimensions, subset), and `promotion_decision`
    applies `registry.promotion.rule`. Returns the evidence (JSON-able) including `rule_passed` and
    `reasons`; raises PromotionRefused(kind="evidence") if the two cannot be compared. `names` label the
    two in messages (e.g. {"challenger": "v3", "champion": "v2"}).
    """
    from sermtl.evaluate.significance import significance_tests

    label = {"challenger": "challenger", "champion": "champion", **(names or {})}
    frames = {
        "challenger": challenger.assign(system="challenger"),
        "champion": champion.assign(system="champion"),
    }
    promotion = params.registry.promotion
    dimensions = [
        d
        for d in params.eval.dimensions
        if d in set(frames["challenger"]["dimension"]) and d in set(frames["champion"]["dimension"])
    ]
    counts = {role: int(frame["utterance_id"].nunique()) for role, frame in frames.items()}
    if not dimensions:
        raise PromotionRefused(
            f"challenger {label['challenger']} and champion {label['champion']} share no dimension of "
            f"{list(params.eval.dimensions)}",
            "evidence",
        )
    keys = ["utterance_id", "dimension"]
    common = frames["challenger"][keys].merge(frames["champion"][keys], on=keys)
    common = common[common["dimension"].isin(dimensions)]
    per_dimension = common.groupby("dimension")["utterance_id"].nunique()
    paired = int(min((per_dimension.get(d, 0) for d in dimensions), default=0))
    if paired < min_paired:
        raise PromotionRefused(
            f"challenger {label['challenger']} has predictions for {counts['challenger']} utterances and "
            f"champion {label['champion']} for {counts['champion']}; {paired} are common to both on every "
            f"dimension, at least {min_paired} are needed to compare them on the same evaluation data",
            "evidence",
        )
    pairs = pd.concat(
        [frame.merge(common, on=keys) for frame in frames.values()],
        ignore_index=True,
    )
    labels = pairs.pivot_table(index=keys, columns="system", values="label", aggfunc="first")
    differ = labels[labels["challenger"] != labels["champion"]]
    if len(differ):
        example = ", ".join(f"{u}/{d}" for u, d in list(differ.index)[:3])
        raise PromotionRefused(
            f"labels of challenger {label['challenger']} and champion {label['champion']} differ on "
            f"{len(differ)} of {len(labels)} common (utterance, dimension) pairs (e.g. {example}): "
            "not the same evaluation data (different label thresholds or data version?)",
            "evidence",
        )
    test_params = dataclasses.replace(
        params,
        eval=dataclasses.replace(params.eval, proposed_system="challenger", dimensions=dimensions),
        significance=dataclasses.replace(params.significance, baselines=["champion"]),
    )
    try:
        report = significance_tests(pairs, test_params)
    except ValueError as exc:  # e.g. duplicate predictions of an utterance in one version's artifact
        raise PromotionRefused(f"the two versions cannot be tested together: {exc}", "evidence") from exc
    decision = promotion_decision(report, promotion)
    by_dimension = {
        c.dimension: {
            "uar_challenger": c.uar_proposed,
            "uar_champion": c.uar_baseline,
            "difference": c.difference,
            "ci": [c.ci_low, c.ci_high],
            "non_inferior": c.dimension in decision.non_inferior,
            "p_adjusted": c.p_adjusted[decision.test],
            "better": c.dimension in decision.better,
            "worse": c.dimension in decision.worse,
            "n": c.n,
            "clusters": c.clusters,
        }
        for c in report.comparisons
    }
    mean_challenger = sum(v["uar_challenger"] for v in by_dimension.values()) / len(by_dimension)
    mean_champion = sum(v["uar_champion"] for v in by_dimension.values()) / len(by_dimension)
    return {
        "rule": decision.rule,
        "margin": decision.margin,
        "test": decision.test,
        "unit": decision.unit,
        "confidence": decision.confidence,
        "alpha": report.params.get("alpha"),
        "correction": report.params.get("correction"),
        "resampling": report.params.get("resampling"),
        "subset": report.subset,
        "utterances": {**counts, "paired": paired},
        "dimensions": by_dimension,
        "intervals": decision.intervals,
        "non_inferior": decision.non_inferior,
        "better": decision.better,
        "worse": decision.worse,
        "mean_uar": {"challenger": mean_challenger, "champion": mean_champion},
        "rule_passed": decision.passed,
        "reasons": decision.reasons,
    }


def compare_versions(
    mlflow_client: MlflowClient,
    challenger: Any,
    champion: Any,
    params: Params,
    *,
    min_paired: int = MIN_PAIRED_UTTERANCES,
) -> dict[str, Any]:
    """Challenger vs champion version: their registered out-of-fold predictions through
    `compare_predictions`. Returns the evidence with both version numbers; raises
    PromotionRefused(kind="evidence") if a version has no predictions or the two cannot be compared.
    """
    label = {"challenger": f"v{challenger.version}", "champion": f"v{champion.version}"}
    with tempfile.TemporaryDirectory(prefix="sermtl-promotion-") as tmp:
        frames = {}
        for role, version in (("challenger", challenger), ("champion", champion)):
            frame = _version_predictions(mlflow_client, version, Path(tmp) / role)
            if frame is None:
                raise PromotionRefused(
                    f"{role} {label[role]} has no out-of-fold predictions (tag {TAG_OOF} / artifact "
                    f"{ARTIFACT_OOF} of its run): the two versions cannot be compared",
                    "evidence",
                )
            frames[role] = frame
    evidence = compare_predictions(
        frames["challenger"], frames["champion"], params, min_paired=min_paired, names=label
    )
    return {"challenger": challenger.version, "champion": champion.version, **evidence}


# --- promotion and rollback --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str
    promoted: bool
    action: str  # promote | rollback
    champion_before: str | None
    actor: str
    at: str
    reason: str
    forced: bool = False
    evidence: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    lock_waited_s: float = 0.0
    broken_locks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _actor(actor: str | None) -> str:
    if actor and actor.strip():
        return actor.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _next_audit_key(model: Any) -> str:
    numbers = [
        int(key.rsplit(".", 1)[1])
        for key in (model.tags or {})
        if key.startswith(f"{TAG_AUDIT}.") and key.rsplit(".", 1)[1].isdigit()
    ]
    return f"{TAG_AUDIT}.{max(numbers, default=0) + 1:05d}"


def _refusal(
    mlflow_client: MlflowClient,
    name: str,
    version: str | None,
    actor: str,
    message: str,
    kind: str,
    result: PromotionResult | None = None,
) -> PromotionRefused:
    """Build the exception, after noting the refusal on the version (best effort: it must not mask it)."""
    if version is not None:
        note = {"by": actor, "at": _iso(_now()), "kind": kind, "why": message}
        with tracking.quick_requests(), contextlib.suppress(Exception):
            mlflow_client.set_model_version_tag(name, version, TAG_LAST_REFUSAL, _tag_value(note))
    return PromotionRefused(message, kind, result)


def _record_champion_change(
    mlflow_client: MlflowClient, model: Any, version: str, record: Mapping[str, Any]
) -> None:
    """The registered model's champion tags and one new audit entry, for a promotion or a rollback."""
    tags = {
        TAG_CHAMPION_VERSION: version,
        TAG_CHAMPION_BY: record["actor"],
        TAG_CHAMPION_AT: record["at"],
        TAG_CHAMPION_REASON: record["reason"],
        TAG_CHAMPION_ACTION: record["action"],
        _next_audit_key(model): _tag_value(dict(record)),
    }
    for key, value in tags.items():
        mlflow_client.set_registered_model_tag(model.name, key, value)


def promote(
    name: str,
    version: str | int | None = None,
    *,
    params: Params,
    actor: str | None = None,
    reason: str = "",
    force: bool = False,
    tracking_uri: str | None = None,
    min_paired: int = MIN_PAIRED_UTTERANCES,
) -> PromotionResult:
    """Make `version` (default: the `challenger` alias) the `champion` of registered model `name`.

    Checks, in order: the version exists and is not already champion; its gate passed (tag
    `sermtl.gate.passed`); with a champion, `compare_versions` and `registry.promotion.rule`. Without
    a champion the version is promoted on its gate alone. `force=True` overrides the gate, the rule and
    missing evidence, never the lock; it is recorded as forced. A non-empty `reason` is required (kind
    "input" otherwise), forced or not: it goes into the audit trail.
    Then, under the lock (see the module docstring for the exact semantics), the champion is re-read
    and the promotion refused as stale if it changed since it was first read.

    Returns the PromotionResult; every refusal raises PromotionRefused (its `kind` says why).
    """
    _, mlflow_client = _client(tracking_uri)
    actor = _actor(actor)
    reason = (reason or "").strip()
    if force and not reason:
        raise PromotionRefused("--force needs a non-empty reason: it is recorded in the audit trail", "input")
    if not reason:
        raise PromotionRefused(f"a promotion {REASON_REQUIRED}", "input")
    aliases = _aliases(mlflow_client, name)
    if version is None:
        if CHALLENGER not in aliases:
            raise PromotionRefused(
                f"{name} has no `{CHALLENGER}` alias (no version passed the gate since the last promotion); "
                "name a version explicitly",
                "input",
            )
        version = aliases[CHALLENGER]
    version = str(version)
    candidate = _version(mlflow_client, name, version)
    champion_before = aliases.get(CHAMPION)
    if champion_before == version:
        raise PromotionRefused(f"{name} version {version} is already the champion", "already_champion")

    tags = candidate.tags or {}
    gate_passed = tags.get(TAG_GATE_PASSED) == "true"
    if not gate_passed and not force:
        why = tags.get(TAG_GATE_REASONS) or "no gate decision recorded (tag sermtl.gate.passed missing)"
        raise _refusal(
            mlflow_client,
            name,
            version,
            actor,
            f"{name} version {version} did not pass the registration gate ({why}); promoting it needs "
            "force with a reason",
            "gate",
        )

    evidence: dict[str, Any]
    rule = {"rule": params.registry.promotion.rule, "margin": params.registry.promotion.margin}
    if champion_before is None:
        evidence = {"champion": None, **rule, "rule_passed": True, "reasons": ["no champion yet"]}
    else:
        try:
            evidence = compare_versions(
                mlflow_client,
                candidate,
                _version(mlflow_client, name, champion_before),
                params,
                min_paired=min_paired,
            )
        except PromotionRefused as exc:
            if not force:
                raise _refusal(mlflow_client, name, version, actor, str(exc), exc.kind) from None
            evidence = {"champion": champion_before, **rule, "rule_passed": False, "reasons": [str(exc)]}
        if not evidence["rule_passed"] and not force:
            raise _refusal(
                mlflow_client,
                name,
                version,
                actor,
                f"{name} version {version} not promoted over champion {champion_before}: "
                + "; ".join(evidence["reasons"]),
                "rule",
                PromotionResult(
                    name=name,
                    version=version,
                    promoted=False,
                    action="promote",
                    champion_before=champion_before,
                    actor=actor,
                    at=_iso(_now()),
                    reason=reason,
                    evidence=evidence,
                ),
            )
    evidence = {**evidence, "gate_passed": gate_passed, "forced": force}

    lock = PromotionLock(
        mlflow_client,
        name,
        owner=actor,
        timeout_s=params.registry.promotion.lock_timeout_s,
        purpose=f"promote v{version}",
    )
    try:
        lock.acquire()
    except LockTimeout as exc:
        raise _refusal(mlflow_client, name, version, actor, str(exc), "lock_timeout") from None
    try:
        model = _repair(mlflow_client, name, actor)
        champion_now = (model.aliases or {}).get(CHAMPION)
        champion_now = str(champion_now) if champion_now is not None else None
        if champion_now != champion_before:
            changed_by = (model.tags or {}).get(TAG_CHAMPION_BY, "?")
            raise _refusal(
                mlflow_client,
                name,
                version,
                actor,
                f"stale: the champion of {name} changed from {champion_before or 'none'} to "
                f"{champion_now or 'none'} (by {changed_by}) while this promotion of version {version} was "
                "deciding; nothing changed, re-run to compare with the new champion",
                "stale",
            )
        if not lock.held():
            raise _refusal(
                mlflow_client,
                name,
                version,
                actor,
                "the registry lock expired before the champion could be moved; nothing changed",
                "lock_lost",
            )
        at = _iso(_now())
        history = _normalised(_history(model), champion_before) + (
            [champion_before] if champion_before else []
        )
        evidence_path = f"{ARTIFACT_PROMOTIONS}/{at.replace(':', '')}-v{version}.json"
        record = {"action": "promote", "version": version, "from": champion_before, "actor": actor, "at": at}
        record |= {"reason": reason, "forced": force}
        run_id = tags.get(TAG_REGISTRATION_RUN) or candidate.run_id
        if run_id:
            try:
                mlflow_client.log_text(
                    run_id, json.dumps({**record, "evidence": evidence}, indent=2), evidence_path
                )
            except (MlflowException, OSError) as exc:
                if tracking.is_unreachable(exc):
                    raise
        # history first, then the alias (commit point), then the audit: a crash leaves rollback working
        mlflow_client.set_registered_model_tag(name, TAG_HISTORY, _json(history))
        if champion_before:
            mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion_before)
        mlflow_client.set_registered_model_alias(name, CHAMPION, version)
        if (model.aliases or {}).get(CHALLENGER) is not None and str(model.aliases[CHALLENGER]) == version:
            mlflow_client.delete_registered_model_alias(name, CHALLENGER)
        version_tags = {
            TAG_PROMOTED_BY: actor,
            TAG_PROMOTED_AT: at,
            TAG_PROMOTION_REASON: reason,
            TAG_PROMOTION_FORCED: str(force).lower(),
            TAG_PROMOTION_REPLACED: champion_before or "none",
            TAG_PROMOTION_EVIDENCE: _tag_value(evidence),
            TAG_PROMOTION_EVIDENCE_ARTIFACT: f"runs:/{run_id}/{evidence_path}" if run_id else "",
        }
        for key, value in version_tags.items():
            mlflow_client.set_model_version_tag(name, version, key, value)
        _record_champion_change(
            mlflow_client, model, version, {**record, "evidence": _evidence_summary(evidence)}
        )
    except BaseException:
        lock.release(quick=True)
        raise
    lock.release()
    message = (
        f"{name} version {version} is now champion"
        + (f" (replacing {champion_before})" if champion_before else " (first champion)")
        + (" [forced]" if force else "")
    )
    return PromotionResult(
        name=name,
        version=version,
        promoted=True,
        action="promote",
        champion_before=champion_before,
        actor=actor,
        at=at,
        reason=reason,
        forced=force,
        evidence=evidence,
        message=message,
        lock_waited_s=lock.waited_s,
        broken_locks=list(lock.broken),
    )


def _evidence_summary(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The audit entry's short form of the evidence (the full one is a version tag and an artifact)."""
    keys = (
        "champion",
        "rule",
        "margin",
        "test",
        "unit",
        "confidence",
        "intervals",
        "non_inferior",
        "better",
        "worse",
        "mean_uar",
        "rule_passed",
        "reasons",
        "forced",
    )
    return {k: evidence[k] for k in keys if k in evidence}


def rollback(
    name: str,
    *,
    actor: str | None = None,
    reason: str = "",
    tracking_uri: str | None = None,
    lock_timeout_s: float = PromotionParams().lock_timeout_s,
) -> PromotionResult:
    """Move `champion` back to the previous champion (the last entry of the history tag), under the lock.

    The entry is removed from the history, so repeated rollbacks walk further back; the version rolled
    back from is not pushed anywhere (promote it again to bring it back). History entries that are the
    current champion or whose version was deleted are skipped. Refuses (kind "no_history") when no
    earlier champion is left, and (kind "input") without a non-empty `reason`.
    """
    _, mlflow_client = _client(tracking_uri)
    actor = _actor(actor)
    reason = (reason or "").strip()
    if not reason:
        raise PromotionRefused(f"a rollback {REASON_REQUIRED}", "input")
    lock = PromotionLock(mlflow_client, name, owner=actor, timeout_s=lock_timeout_s, purpose="rollback")
    try:
        lock.acquire()
    except LockTimeout as exc:
        raise PromotionRefused(str(exc), "lock_timeout") from None
    try:
        model = _repair(mlflow_client, name, actor)
        current = (model.aliases or {}).get(CHAMPION)
        if current is None:
            raise PromotionRefused(f"{name} has no champion: nothing to roll back", "no_history")
        current = str(current)
        history = _normalised(_history(model), current)
        target, skipped = None, []
        while history:
            candidate = history.pop()
            if candidate == current:
                skipped.append(candidate)
                continue
            try:
                mlflow_client.get_model_version(name, candidate)
            except MlflowException:
                skipped.append(candidate)
                continue
            target = candidate
            history = _normalised(history, target)
            break
        if target is None:
            raise PromotionRefused(
                f"{name}: no previous champion recorded before version {current}"
                + (f" (skipped {', '.join(skipped)}: current or deleted)" if skipped else "")
                + "; nothing to roll back to",
                "no_history",
            )
        if not lock.held():
            raise PromotionRefused(
                "the registry lock expired before the rollback; nothing changed", "lock_lost"
            )
        at = _iso(_now())
        record = {"action": "rollback", "version": target, "from": current, "actor": actor, "at": at}
        record |= {"reason": reason, "skipped": skipped}
        # the alias first (commit point), then the history: a crash in between leaves the target on top of
        # its own history, which _repair removes; the other order would lose the target from the history
        mlflow_client.set_registered_model_alias(name, CHAMPION, target)
        mlflow_client.set_registered_model_tag(name, TAG_HISTORY, _json(history))
        if history:
            mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, history[-1])
        elif PREVIOUS_CHAMPION in (model.aliases or {}):
            mlflow_client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        mlflow_client.set_model_version_tag(name, current, TAG_ROLLED_BACK, _tag_value(record))
        mlflow_client.set_model_version_tag(name, target, TAG_RESTORED, _tag_value(record))
        _record_champion_change(mlflow_client, model, target, record)
    except BaseException:
        lock.release(quick=True)
        raise
    lock.release()
    return PromotionResult(
        name=name,
        version=target,
        promoted=True,
        action="rollback",
        champion_before=current,
        actor=actor,
        at=at,
        reason=reason,
        evidence={"skipped": skipped, "history_left": history},
        message=f"{name}: champion rolled back from version {current} to {target}",
        lock_waited_s=lock.waited_s,
        broken_locks=list(lock.broken),
    )


# --- state ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionState:
    version: str
    aliases: list[str]
    gate: str  # passed | failed | -
    uar: dict[str, float]  # pooled out-of-fold UAR per dimension and "mean"
    study_run_id: str
    created_at: str
    promoted_by: str
    promoted_at: str


@dataclass(frozen=True)
class RegistryState:
    name: str
    aliases: dict[str, str]
    versions: list[VersionState]
    history: list[str]
    audit: list[dict[str, Any]]
    lock: dict[str, str] | None  # tags of a held lock, or None

    @property
    def champion(self) -> str | None:
        return self.aliases.get(CHAMPION)

    @property
    def challenger(self) -> str | None:
        return self.aliases.get(CHALLENGER)

    def table(self) -> str:
        """Versions as an aligned text table, newest first, then champion history and recent audit."""
        dimensions: list[str] = []
        for version in self.versions:
            dimensions += [d for d in version.uar if d != "mean" and d not in dimensions]
        header = ["version", "aliases", "gate", "UAR mean", *[f"UAR {d}" for d in dimensions]]
        header += ["created", "promoted by", "study run"]
        rows = []
        for v in sorted(self.versions, key=lambda item: int(item.version), reverse=True):
            uar = [f"{v.uar[k]:.3f}" if k in v.uar else "-" for k in ("mean", *dimensions)]
            promoted = f"{v.promoted_by} {v.promoted_at}" if v.promoted_by else "-"
            rows.append(
                [v.version, ",".join(v.aliases) or "-", v.gate, *uar, v.created_at, promoted, v.study_run_id]
            )
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
        lines = [f"registered model {self.name}: {len(self.versions)} version(s)"]
        for row in [header, *rows]:
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
        lines.append(f"champion: {self.champion or 'none'}; challenger: {self.challenger or 'none'}")
        lines.append(f"champion history (oldest first): {', '.join(self.history) or 'none'}")
        for entry in self.audit[-5:]:
            lines.append(
                f"  {entry.get('at', '?')} {entry.get('action', '?')} {entry.get('from') or 'none'} -> "
                f"{entry.get('version', '?')} by {entry.get('actor', '?')}"
                + (" [forced]" if entry.get("forced") else "")
                + (f": {entry['reason']}" if entry.get("reason") else "")
            )
        if self.lock:
            lines.append(
                f"lock held by {self.lock.get(LOCK_OWNER, '?')} ({self.lock.get(LOCK_PURPOSE, '?')}) "
                f"until {self.lock.get(LOCK_EXPIRES_AT, '?')}"
            )
        return "\n".join(lines)


def registry_state(name: str, *, tracking_uri: str | None = None) -> RegistryState:
    """Versions of `name` with their aliases, gate result and pooled UARs; history, audit and lock."""
    _, mlflow_client = _client(tracking_uri)
    model = _model(mlflow_client, name)
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    versions = []
    for item in _versions(mlflow_client, name):
        tags = item.tags or {}
        uar = {}
        for key, value in tags.items():
            if key.startswith(f"{TAG_UAR}."):
                with contextlib.suppress(ValueError):
                    uar[key.removeprefix(f"{TAG_UAR}.")] = float(value)
        gate = {"true": "passed", "false": "failed"}.get(tags.get(TAG_GATE_PASSED, ""), "-")
        versions.append(
            VersionState(
                version=str(item.version),
                aliases=by_version.get(str(item.version), []),
                gate=gate,
                uar=uar,
                study_run_id=tags.get(TAG_STUDY_RUN, "-"),
                created_at=_iso((item.creation_timestamp or 0) / 1000)[:19],
                promoted_by=tags.get(TAG_PROMOTED_BY, ""),
                promoted_at=tags.get(TAG_PROMOTED_AT, "")[:19],
            )
        )
    audit = []
    for key in sorted(k for k in (model.tags or {}) if k.startswith(f"{TAG_AUDIT}.")):
        with contextlib.suppress(json.JSONDecodeError):
            audit.append(json.loads(model.tags[key]))
    lock = PromotionLock(mlflow_client, name, owner="reader", timeout_s=0).holder()
    history = _normalised(_history(model), aliases.get(CHAMPION))
    return RegistryState(name, aliases, versions, history, audit, lock)
