"""What a validation says: summary.json's entry per expectation, the statistics beside them, and the
Failures with offending rows that the terminal shows."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.data.validate.checks import Check
from sermtl.data.validate.tables import TABLE_KEYS
from sermtl.params import Params
from sermtl.schema import CLASS_NAMES, DIMENSIONS

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Failure:
    """One unmet expectation, with enough context to fix the data without opening Data Docs."""

    name: str
    expectation_type: str
    table: str
    column: str | None
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


@dataclass
class ValidationSummary:
    """Outcome of `validate`: the verdict, the failures and where the reports were written."""

    success: bool
    failures: list[Failure]
    summary_path: Path
    data_docs_path: Path
    statistics: dict[str, Any] = field(default_factory=dict)

    def describe_failures(self) -> str:
        """Multi-line message for a terminal: each failing expectation and up to 5 offending rows."""
        if self.success:
            return "all expectations met"
        evaluated = self.statistics.get("evaluated_expectations", "?")
        lines = [
            f"{len(self.failures)} of {evaluated} expectations failed "
            f"(Data Docs: {self.data_docs_path}; details: {self.summary_path})"
        ]
        for failure in self.failures:
            where = f"{failure.table}.{failure.column}" if failure.column else failure.table
            count = ""
            if failure.unexpected_count:  # aggregate expectations report 0 and an observed value
                percent = failure.unexpected_percent or 0.0
                count = f": {failure.unexpected_count} unexpected ({percent:.2f}%)"
            lines.append(f"- {failure.name} [{failure.expectation_type} on {where}]{count}")
            if failure.detail:
                lines.append(f"    {failure.detail}")
            for example in failure.examples[:MAX_EXAMPLES]:
                lines.append("    " + ", ".join(f"{k}={_short(v)}" for k, v in example.items()))
        return "\n".join(lines)


def entry(check: Check, result: Any, frame: pd.DataFrame) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: val for k, val in config.kwargs.items() if k != "batch_id"}
    details = result.result or {}
    exception = (result.exception_info or {}) if not result.success else {}
    message = _exception_message(exception)
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    examples: list[dict[str, Any]] = []
    indexes = details.get("partial_unexpected_index_list") or []
    if indexes:
        wanted = list(dict.fromkeys([*TABLE_KEYS[check.table], *columns, *check.show]))
        wanted = [c for c in wanted if c in frame.columns]
        # Derived tables hold counts as float (NaN-able); show 7990 rather than 7990.0.
        tidy = _plain if check.table == "manifest" else _plain_count
        for index in indexes[:MAX_EXAMPLES]:
            examples.append({k: tidy(val) for k, val in frame.loc[index, wanted].to_dict().items()})
    observed = _observed(details)
    return {
        "name": check.name,
        "table": check.table,
        "expectation_type": config.type,
        "column": ", ".join(columns) if columns else None,
        "kwargs": _plain(kwargs),
        "success": bool(result.success),
        "unexpected_count": _plain(details.get("unexpected_count")),
        "unexpected_percent": _plain(details.get("unexpected_percent")),
        "observed": observed,
        "exception": message,
        "examples": examples,
    }


def _observed(details: dict[str, Any]) -> Any:
    """What a table- or set-level expectation saw (they have no offending rows to show)."""
    observed: dict[str, Any] = {}
    mismatched = (details.get("details") or {}).get("mismatched")
    if mismatched:
        observed.update({f"{k}_columns": v for k, v in mismatched.items() if v})
    if "partial_missing_list" in details:
        observed["missing_values"] = details.get("partial_missing_list")
        observed["unexpected_values"] = details.get("partial_unexpected_list")
    if not observed and "observed_value" in details:
        observed["value"] = details["observed_value"]
    return _plain(observed) if observed else None


def _exception_message(info: Any) -> str | None:
    if not info:
        return None
    if "exception_message" in info:
        return info["exception_message"] if info.get("raised_exception") else None
    messages = [v.get("exception_message") for v in info.values() if isinstance(v, dict)]
    return "; ".join(m for m in messages if m) or None


def failure(entry: dict[str, Any]) -> Failure:
    detail_parts = []
    if entry["observed"]:
        detail_parts.append("observed " + json.dumps(entry["observed"], default=str))
    if entry["exception"]:
        detail_parts.append("error: " + entry["exception"])
    return Failure(
        name=entry["name"],
        expectation_type=entry["expectation_type"],
        table=entry["table"],
        column=entry["column"],
        unexpected_count=entry["unexpected_count"],
        unexpected_percent=entry["unexpected_percent"],
        examples=entry["examples"],
        detail="; ".join(detail_parts),
    )


def summary_statistics(
    manifest: pd.DataFrame,
    store_meta: dict[str, Any],
    results: list[tuple[Check, Any]],
    skipped: list[str],
) -> dict[str, Any]:
    failed = sum(not r.success for _, r in results)
    stats: dict[str, Any] = {
        "rows": len(manifest),
        "columns": len(manifest.columns),
        "evaluated_expectations": len(results),
        "successful_expectations": len(results) - failed,
        "unsuccessful_expectations": failed,
        "success_percent": round(100.0 * (len(results) - failed) / len(results), 3) if results else None,
        "skipped_expectations": skipped,
        "store_total_samples": _plain(store_meta.get("total_samples")),
        "great_expectations_version": _gx_version(),
    }
    if "session" in manifest.columns:
        stats["utterances_per_session"] = {
            str(k): int(n) for k, n in manifest["session"].value_counts().items()
        }
    if "speaker" in manifest.columns:
        stats["speakers"] = int(manifest["speaker"].nunique())
    if "duration_s" in manifest.columns:
        stats["audio_hours"] = _plain(
            round(float(pd.to_numeric(manifest["duration_s"], errors="coerce").sum()) / 3600, 4)
        )
    for dim in DIMENSIONS:
        column = f"{dim}_class"
        if column in manifest.columns:
            counts = manifest[column].value_counts()
            stats[f"{column}_counts"] = {name: int(counts.get(i, 0)) for i, name in enumerate(CLASS_NAMES)}
    return stats


def _gx_version() -> str:
    import great_expectations as gx

    return str(gx.__version__)


def params_payload(params: Params) -> dict[str, Any]:
    return {
        "validation": dataclasses.asdict(params.validation),
        "data": {
            "sample_rate": params.data.sample_rate,
            "sessions": list(params.data.sessions),
            "speakers_per_session": params.data.speakers_per_session,
            "thresholds": dataclasses.asdict(params.data.thresholds),
        },
    }


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None, infinities to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _plain_count(value: Any) -> Any:
    value = _plain(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
