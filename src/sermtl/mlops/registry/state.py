"""The registry's state as people read it (`sermtl registry NAME`): versions with aliases, gate results and
pooled UARs, the champion history, the recent audit trail and a held lock."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from sermtl.mlops.registry.common import (
    CHALLENGER,
    CHAMPION,
    LOCK_EXPIRES_AT,
    LOCK_OWNER,
    LOCK_PURPOSE,
    TAG_AUDIT,
    TAG_GATE_PASSED,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_STUDY_RUN,
    TAG_UAR,
    client_for,
    iso,
)
from sermtl.mlops.registry.lock import PromotionLock
from sermtl.mlops.registry.records import all_versions, champion_history, get_model, normalised


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
    _, mlflow_client = client_for(tracking_uri)
    model = get_model(mlflow_client, name)
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    versions = []
    for item in all_versions(mlflow_client, name):
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
                created_at=iso((item.creation_timestamp or 0) / 1000)[:19],
                promoted_by=tags.get(TAG_PROMOTED_BY, ""),
                promoted_at=tags.get(TAG_PROMOTED_AT, "")[:19],
            )
        )
    audit = []
    for key in sorted(k for k in (model.tags or {}) if k.startswith(f"{TAG_AUDIT}.")):
        with contextlib.suppress(json.JSONDecodeError):
            audit.append(json.loads(model.tags[key]))
    lock = PromotionLock(mlflow_client, name, owner="reader", timeout_s=0).holder()
    history = normalised(champion_history(model), aliases.get(CHAMPION))
    return RegistryState(name, aliases, versions, history, audit, lock)
