"""Promotion and rollback: moving the `champion` alias under the registry lock, as a compare-and-set of the
champion that was read before deciding, with the audit trail and the ordered writes docs/design/registry.md
explains (a crash between them leaves the registry usable)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.mlops import tracking
from sermtl.mlops.registry.common import (
    ARTIFACT_PROMOTIONS,
    CHALLENGER,
    CHAMPION,
    MIN_PAIRED_UTTERANCES,
    PREVIOUS_CHAMPION,
    REASON_REQUIRED,
    TAG_CHAMPION_BY,
    TAG_GATE_PASSED,
    TAG_GATE_REASONS,
    TAG_HISTORY,
    TAG_LAST_REFUSAL,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_PROMOTION_EVIDENCE,
    TAG_PROMOTION_EVIDENCE_ARTIFACT,
    TAG_PROMOTION_FORCED,
    TAG_PROMOTION_REASON,
    TAG_PROMOTION_REPLACED,
    TAG_REGISTRATION_RUN,
    TAG_RESTORED,
    TAG_ROLLED_BACK,
    LockTimeout,
    PromotionRefused,
    PromotionResult,
    actor_name,
    client_for,
    iso,
    now,
    tag_value,
    to_json,
)
from sermtl.mlops.registry.comparison import compare_versions
from sermtl.mlops.registry.lock import PromotionLock
from sermtl.mlops.registry.records import (
    champion_history,
    get_aliases,
    get_version,
    normalised,
    record_champion_change,
    repair,
)
from sermtl.params import Params, PromotionParams


@dataclass(frozen=True)
class _Request:
    """One promotion once its version is known: what is promoted, by whom, why."""

    client: MlflowClient
    name: str
    version: str
    actor: str
    reason: str
    force: bool

    def refused(self, message: str, kind: str, result: PromotionResult | None = None) -> PromotionRefused:
        """Build the exception, after noting the refusal on the version (best effort: it must not mask it)."""
        note = {"by": self.actor, "at": iso(now()), "kind": kind, "why": message}
        with tracking.quick_requests(), contextlib.suppress(Exception):
            self.client.set_model_version_tag(self.name, self.version, TAG_LAST_REFUSAL, tag_value(note))
        return PromotionRefused(message, kind, result)


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
    Then, under the lock (see docs/design/registry.md for the exact semantics), the champion is re-read
    and the promotion refused as stale if it changed since it was first read.

    Returns the PromotionResult; every refusal raises PromotionRefused (its `kind` says why).
    """
    _, mlflow_client = client_for(tracking_uri)
    actor = actor_name(actor)
    reason = (reason or "").strip()
    if force and not reason:
        raise PromotionRefused("--force needs a non-empty reason: it is recorded in the audit trail", "input")
    if not reason:
        raise PromotionRefused(f"a promotion {REASON_REQUIRED}", "input")
    aliases = get_aliases(mlflow_client, name)
    version = _chosen_version(name, version, aliases)
    candidate = get_version(mlflow_client, name, version)
    champion_before = aliases.get(CHAMPION)
    if champion_before == version:
        raise PromotionRefused(f"{name} version {version} is already the champion", "already_champion")
    request = _Request(mlflow_client, name, version, actor, reason, force)
    gate_passed = _check_gate(request, candidate.tags or {})
    evidence = _promotion_evidence(request, candidate, champion_before, params, min_paired)
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
        raise request.refused(str(exc), "lock_timeout") from None
    try:
        model = repair(mlflow_client, name, actor)
        _check_unchanged(request, model, champion_before, lock)
        at = _move_champion(request, model, candidate, champion_before, evidence)
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


def _chosen_version(name: str, version: str | int | None, aliases: Mapping[str, str]) -> str:
    """`version`, or by default the `challenger`; refuses (kind "input") when there is none."""
    if version is None:
        if CHALLENGER not in aliases:
            raise PromotionRefused(
                f"{name} has no `{CHALLENGER}` alias (no version passed the gate since the last promotion); "
                "name a version explicitly",
                "input",
            )
        version = aliases[CHALLENGER]
    return str(version)


def _check_gate(request: _Request, tags: Mapping[str, str]) -> bool:
    """Whether the version passed the registration gate; refuses a failed one unless forced."""
    gate_passed = tags.get(TAG_GATE_PASSED) == "true"
    if not gate_passed and not request.force:
        why = tags.get(TAG_GATE_REASONS) or "no gate decision recorded (tag sermtl.gate.passed missing)"
        raise request.refused(
            f"{request.name} version {request.version} did not pass the registration gate ({why}); "
            "promoting it needs force with a reason",
            "gate",
        )
    return gate_passed


def _promotion_evidence(
    request: _Request, candidate: Any, champion_before: str | None, params: Params, min_paired: int
) -> dict[str, Any]:
    """The comparison with the champion and the rule's verdict; refuses what the rule refuses, or what
    cannot be compared, unless forced (the evidence then says why it would have been refused)."""
    name, version = request.name, request.version
    rule = {"rule": params.registry.promotion.rule, "margin": params.registry.promotion.margin}
    if champion_before is None:
        return {"champion": None, **rule, "rule_passed": True, "reasons": ["no champion yet"]}
    try:
        evidence = compare_versions(
            request.client,
            candidate,
            get_version(request.client, name, champion_before),
            params,
            min_paired=min_paired,
        )
    except PromotionRefused as exc:
        if not request.force:
            raise request.refused(str(exc), exc.kind) from None
        evidence = {"champion": champion_before, **rule, "rule_passed": False, "reasons": [str(exc)]}
    if not evidence["rule_passed"] and not request.force:
        raise request.refused(
            f"{name} version {version} not promoted over champion {champion_before}: "
            + "; ".join(evidence["reasons"]),
            "rule",
            PromotionResult(
                name=name,
                version=version,
                promoted=False,
                action="promote",
                champion_before=champion_before,
                actor=request.actor,
                at=iso(now()),
                reason=request.reason,
                evidence=evidence,
            ),
        )
    return evidence


def _check_unchanged(request: _Request, model: Any, champion_before: str | None, lock: PromotionLock) -> None:
    """Under the lock: refuse as stale when the champion moved since it was read, or when the lock expired."""
    champion_now = (model.aliases or {}).get(CHAMPION)
    champion_now = str(champion_now) if champion_now is not None else None
    if champion_now != champion_before:
        changed_by = (model.tags or {}).get(TAG_CHAMPION_BY, "?")
        raise request.refused(
            f"stale: the champion of {request.name} changed from {champion_before or 'none'} to "
            f"{champion_now or 'none'} (by {changed_by}) while this promotion of version {request.version} "
            "was deciding; nothing changed, re-run to compare with the new champion",
            "stale",
        )
    if not lock.held():
        raise request.refused(
            "the registry lock expired before the champion could be moved; nothing changed", "lock_lost"
        )


def _move_champion(
    request: _Request, model: Any, candidate: Any, champion_before: str | None, evidence: dict[str, Any]
) -> str:
    """The promotion's writes, in crash-safe order; returns their time."""
    mlflow_client, name, version = request.client, request.name, request.version
    at = iso(now())
    history = normalised(champion_history(model), champion_before) + (
        [champion_before] if champion_before else []
    )
    evidence_path = f"{ARTIFACT_PROMOTIONS}/{at.replace(':', '')}-v{version}.json"
    record = {"action": "promote", "version": version, "from": champion_before, "actor": request.actor}
    record |= {"at": at, "reason": request.reason, "forced": request.force}
    run_id = (candidate.tags or {}).get(TAG_REGISTRATION_RUN) or candidate.run_id
    if run_id:
        try:
            text = json.dumps({**record, "evidence": evidence}, indent=2)
            mlflow_client.log_text(run_id, text, evidence_path)
        except (MlflowException, OSError) as exc:
            if tracking.is_unreachable(exc):
                raise
    # history first, then the alias (commit point), then the audit: a crash leaves rollback working
    mlflow_client.set_registered_model_tag(name, TAG_HISTORY, to_json(history))
    if champion_before:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion_before)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    if (model.aliases or {}).get(CHALLENGER) is not None and str(model.aliases[CHALLENGER]) == version:
        mlflow_client.delete_registered_model_alias(name, CHALLENGER)
    version_tags = {
        TAG_PROMOTED_BY: request.actor,
        TAG_PROMOTED_AT: at,
        TAG_PROMOTION_REASON: request.reason,
        TAG_PROMOTION_FORCED: str(request.force).lower(),
        TAG_PROMOTION_REPLACED: champion_before or "none",
        TAG_PROMOTION_EVIDENCE: tag_value(evidence),
        TAG_PROMOTION_EVIDENCE_ARTIFACT: f"runs:/{run_id}/{evidence_path}" if run_id else "",
    }
    for key, value in version_tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    record_champion_change(mlflow_client, model, version, {**record, "evidence": _evidence_summary(evidence)})
    return at


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
    _, mlflow_client = client_for(tracking_uri)
    actor = actor_name(actor)
    reason = (reason or "").strip()
    if not reason:
        raise PromotionRefused(f"a rollback {REASON_REQUIRED}", "input")
    lock = PromotionLock(mlflow_client, name, owner=actor, timeout_s=lock_timeout_s, purpose="rollback")
    try:
        lock.acquire()
    except LockTimeout as exc:
        raise PromotionRefused(str(exc), "lock_timeout") from None
    try:
        model = repair(mlflow_client, name, actor)
        current = (model.aliases or {}).get(CHAMPION)
        if current is None:
            raise PromotionRefused(f"{name} has no champion: nothing to roll back", "no_history")
        current = str(current)
        target, skipped, history = _rollback_target(
            mlflow_client, name, current, normalised(champion_history(model), current)
        )
        if not lock.held():
            raise PromotionRefused(
                "the registry lock expired before the rollback; nothing changed", "lock_lost"
            )
        at = iso(now())
        record = {"action": "rollback", "version": target, "from": current, "actor": actor, "at": at}
        record |= {"reason": reason, "skipped": skipped}
        _move_back(mlflow_client, name=name, model=model, current=current, history=history, record=record)
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


def _rollback_target(
    mlflow_client: MlflowClient, name: str, current: str, history: list[str]
) -> tuple[str, list[str], list[str]]:
    """The latest earlier champion that still exists, the entries skipped on the way, and the history left
    below it; refuses (kind "no_history") when none is left."""
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
        history = normalised(history, target)
        break
    if target is None:
        raise PromotionRefused(
            f"{name}: no previous champion recorded before version {current}"
            + (f" (skipped {', '.join(skipped)}: current or deleted)" if skipped else "")
            + "; nothing to roll back to",
            "no_history",
        )
    return target, skipped, history


def _move_back(
    mlflow_client: MlflowClient,
    *,
    name: str,
    model: Any,
    current: str,
    history: list[str],
    record: dict[str, Any],
) -> None:
    """The rollback's writes, in crash-safe order (the target is `record["version"]`)."""
    target = record["version"]
    # the alias first (commit point), then the history: a crash in between leaves the target on top of
    # its own history, which `repair` removes; the other order would lose the target from the history
    mlflow_client.set_registered_model_alias(name, CHAMPION, target)
    mlflow_client.set_registered_model_tag(name, TAG_HISTORY, to_json(history))
    if history:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, history[-1])
    elif PREVIOUS_CHAMPION in (model.aliases or {}):
        mlflow_client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    mlflow_client.set_model_version_tag(name, current, TAG_ROLLED_BACK, tag_value(record))
    mlflow_client.set_model_version_tag(name, target, TAG_RESTORED, tag_value(record))
    record_champion_change(mlflow_client, model, target, record)
