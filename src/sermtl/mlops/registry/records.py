"""Reading the registered model (versions, aliases, the champion history) and writing its champion
records: the audit trail, and the repair of what an interrupted promotion or rollback left."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sermtl.mlops.registry.common import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    TAG_AUDIT,
    TAG_CHAMPION_ACTION,
    TAG_CHAMPION_AT,
    TAG_CHAMPION_BY,
    TAG_CHAMPION_REASON,
    TAG_CHAMPION_VERSION,
    TAG_HISTORY,
    RegistryError,
    error_is,
    iso,
    now,
    tag_value,
    to_json,
)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def all_versions(mlflow_client: MlflowClient, name: str) -> list[Any]:
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


def get_model(mlflow_client: MlflowClient, name: str) -> Any:
    """The registered model `name`; a missing one is a RegistryError that names it."""
    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if error_is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise RegistryError(f"no registered model named {name!r}") from exc
        raise


def get_aliases(mlflow_client: MlflowClient, name: str) -> dict[str, str]:
    """Alias -> version number (as a string) of `name`, as stored now."""
    return {alias: str(version) for alias, version in (get_model(mlflow_client, name).aliases or {}).items()}


def get_version(mlflow_client: MlflowClient, name: str, version: str) -> Any:
    """Version `version` of `name`; a missing one is a RegistryError that names it."""
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException as exc:
        if error_is(exc, "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{name} has no version {version!r}") from exc
        raise


def champion_history(model: Any) -> list[str]:
    """The earlier champions recorded on `model`, oldest first; [] when the tag is missing or damaged."""
    raw = (model.tags or {}).get(TAG_HISTORY)
    if not raw:
        return []
    try:
        loaded = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [str(v) for v in loaded] if isinstance(loaded, list) else []


def normalised(history: list[str], champion: str | None) -> list[str]:
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


def repair(mlflow_client: MlflowClient, name: str, actor: str) -> Any:
    """Under the lock, before deciding: undo what an interrupted promotion or rollback left (see
    `normalised`; `previous_champion` on the top of the history), and audit a champion that moved
    without an audit entry (a rollback killed after its commit point, or an alias set by hand): action
    "repair". Returns the model as re-read."""
    model = get_model(mlflow_client, name)
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
            "at": iso(now()),
        }
        record["reason"] = (
            f"champion alias found on version {champion} while the audit trail ends at {recorded}: moved "
            "by an interrupted promotion or rollback, or by hand"
        )
        record_champion_change(mlflow_client, model, champion, record)
    stored = champion_history(model)
    history = normalised(stored, champion)
    previous = history[-1] if history else None
    if history == stored and aliases.get(PREVIOUS_CHAMPION) == previous:
        return get_model(mlflow_client, name) if audited else model
    if history != stored:
        mlflow_client.set_registered_model_tag(name, TAG_HISTORY, to_json(history))
    if previous is not None and aliases.get(PREVIOUS_CHAMPION) != previous:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
    elif previous is None and PREVIOUS_CHAMPION in aliases:
        mlflow_client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    return get_model(mlflow_client, name)


def _next_audit_key(model: Any) -> str:
    numbers = [
        int(key.rsplit(".", 1)[1])
        for key in (model.tags or {})
        if key.startswith(f"{TAG_AUDIT}.") and key.rsplit(".", 1)[1].isdigit()
    ]
    return f"{TAG_AUDIT}.{max(numbers, default=0) + 1:05d}"


def record_champion_change(
    mlflow_client: MlflowClient, model: Any, version: str, record: Mapping[str, Any]
) -> None:
    """The registered model's champion tags and one new audit entry, for a promotion or a rollback."""
    tags = {
        TAG_CHAMPION_VERSION: version,
        TAG_CHAMPION_BY: record["actor"],
        TAG_CHAMPION_AT: record["at"],
        TAG_CHAMPION_REASON: record["reason"],
        TAG_CHAMPION_ACTION: record["action"],
        _next_audit_key(model): tag_value(dict(record)),
    }
    for key, value in tags.items():
        mlflow_client.set_registered_model_tag(model.name, key, value)
