"""What compiling and talking to the KFP server share: KfpError, the compiled version on disk, and the
checks of a run's parameters and cron schedule, made before any request is sent."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class KfpError(RuntimeError):
    """A pipeline could not be compiled, uploaded, run or scheduled; the message says why."""


@dataclasses.dataclass(frozen=True)
class CompiledVersion:
    """A compiled pipeline version on disk."""

    name: str  # the version name (also metadata.name of the PipelineVersion manifest)
    pipeline_name: str  # the KFP pipeline the version belongs to
    directory: Path
    pipeline_path: Path  # IR YAML
    manifests_path: Path  # Pipeline + PipelineVersion manifests
    params_sha256: str
    commit: str | None
    dirty: bool
    description: str = ""

    def ir(self) -> list[dict[str, Any]]:
        """The IR YAML's documents: the PipelineSpec, then the PlatformSpec if there is one."""
        return [doc for doc in yaml.safe_load_all(self.pipeline_path.read_text()) if doc is not None]

    def parameters(self) -> dict[str, dict[str, Any]]:
        """The pipeline's input parameters: name -> {parameterType, defaultValue?, isOptional?}."""
        root = self.ir()[0].get("root", {})
        return dict(root.get("inputDefinitions", {}).get("parameters", {}))


def parse_param_pairs(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """['key=value', ...] -> {key: value}; the value may contain '='."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KfpError(f"--param {pair!r} is not key=value")
        parsed[key.strip()] = value
    return parsed


def _typed(name: str, value: Any, parameter_type: str) -> Any:
    if not isinstance(value, str) or parameter_type in ("STRING", ""):
        return value
    try:
        if parameter_type == "NUMBER_INTEGER":
            return int(value)
        if parameter_type == "NUMBER_DOUBLE":
            return float(value)
        if parameter_type == "BOOLEAN":
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if parameter_type in ("LIST", "STRUCT"):
            return json.loads(value)
    except (ValueError, json.JSONDecodeError) as exc:
        raise KfpError(f"pipeline parameter {name}={value!r} is not a valid {parameter_type}") from exc
    return value


def run_parameters(compiled: CompiledVersion, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check `params` against the compiled pipeline's inputs (names, required ones) and type them."""
    declared = compiled.parameters()
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise KfpError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(declared))}"
        )
    missing = sorted(
        name
        for name, body in declared.items()
        if name not in params and "defaultValue" not in body and not body.get("isOptional")
    )
    if missing:
        flags = " ".join(f"--param {name}=VALUE" for name in missing)
        raise KfpError(f"missing required pipeline parameter(s) {', '.join(missing)}: pass {flags}")
    return {
        name: _typed(name, value, declared[name].get("parameterType", "STRING"))
        for name, value in params.items()
    }


# robfig/cron (KFP's scheduler): second minute hour day-of-month month day-of-week.
_CRON_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(
                ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
            )
        },
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}),
)
_CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _cron_value(text: str, low: int, high: int, names: dict[str, int], field: str, expr: str) -> int:
    value = names.get(text.lower()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        raise KfpError(f"cron expression {expr!r}: {field} value {text!r} is not in {low}-{high}")
    return value


def normalize_cron(expression: str) -> str:
    """A 6-field cron expression (seconds first) as KFP wants it; 5 fields get `0 ` prefixed.

    Also accepts robfig descriptors (@daily, @every 1h, ...). Anything else is refused with the reason.
    """
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        head, _, rest = expr.partition(" ")
        if head in _CRON_DESCRIPTORS and not rest:
            return expr
        if head == "@every" and _GO_DURATION.match(rest):
            return expr
        raise KfpError(
            f"cron expression {expression!r}: unknown descriptor; use {', '.join(sorted(_CRON_DESCRIPTORS))} "
            "or '@every <duration>' (e.g. @every 6h)"
        )
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise KfpError(
            f"cron expression {expression!r} has {len(fields)} field(s); expected 5 (minute hour day month "
            "weekday) or 6 (second first, as KFP uses), e.g. '0 3 * * *'"
        )
    for text, (field, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            span, slash, step = item.partition("/")
            if slash and (not step.isdigit() or int(step) == 0):
                raise KfpError(
                    f"cron expression {expression!r}: {field} step {step!r} is not a positive number"
                )
            if span in ("*", "?"):
                continue
            start, dash, end = span.partition("-")
            first = _cron_value(start, low, high, names, field, expression)
            if dash and _cron_value(end, low, high, names, field, expression) < first:
                raise KfpError(f"cron expression {expression!r}: {field} range {span!r} is reversed")
    return " ".join(fields)
