"""Names, errors and small helpers every part of the registry shares: the alias, tag and artifact names
(the registry's format), the exceptions and the promotion result, timestamps and tag values."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.mlops import tracking

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


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | float) -> str:
    """UTC, milliseconds, `Z`: the one timestamp format of the registry's tags and audit entries."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_json(value: Any) -> str:
    """Compact and key-sorted, so that equal values give equal tags."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def tag_value(value: Any) -> str:
    """`value` (JSON unless a string) cut to what every MLflow tag kind accepts."""
    text = value if isinstance(value, str) else to_json(value)
    return text[:MAX_TAG_VALUE]


def error_is(exc: MlflowException, *codes: str) -> bool:
    return getattr(exc, "error_code", None) in codes


def client_for(tracking_uri: str | None) -> tuple[str, MlflowClient]:
    uri = tracking.resolve_uri(tracking_uri)
    return uri, tracking.client(uri)


def actor_name(actor: str | None) -> str:
    """Who acts, for the lock and the audit trail: `actor`, else the login name."""
    if actor and actor.strip():
        return actor.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"
