"""The library side of the Kubeflow components: one call per component, plain paths in, plain data out.

Components stay thin (import sermtl, call one function here, attach the result to their artifacts),
so the logic is tested without kfp and runs identically in the local runner and on a cluster.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sermtl.params import params_from_yaml

PARAMS_WHERE = "params_yaml (pipeline parameter)"
# Ingest report fields put on the corpus-store artifact; the long per-file lists stay in report.json.
INGEST_METADATA_KEYS = (
    "source",
    "fingerprint",
    "sample_rate",
    "annotated",
    "kept",
    "dropped",
    "drops_by_reason",
    "kept_by_session",
    "resampled_by_rate",
    "excluded_sessions",
    "audio_hours",
)
INGEST_COUNTED_LISTS = ("unannotated_wavs", "stray_wavs", "hidden_files")


class ValidationFailed(RuntimeError):
    """The corpus store broke data-quality expectations; raised so the DAG stops before training."""


def ingest_step(corpus_uri: str, params_yaml: str, out_dir: str | Path) -> dict[str, Any]:
    """Ingest ``corpus_uri`` into ``out_dir``; return the metadata for the corpus-store artifact."""
    from sermtl.ingest import ingest

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    report = ingest(corpus_uri, Path(out_dir), params, progress=False).to_dict()
    metadata = {key: report[key] for key in INGEST_METADATA_KEYS if key in report}
    metadata.update({key: len(report[key]) for key in INGEST_COUNTED_LISTS if key in report})
    metadata["utterances"] = report.get("kept", 0)
    metadata["params_data_hash"] = params.section_hash("data")
    return metadata


def validate_step(
    corpus_dir: str | Path, params_yaml: str, report_html: str | Path, docs_dir: str | Path
) -> dict[str, float]:
    """Validate the corpus store: Data Docs + summary.json to ``docs_dir``, one HTML page to ``report_html``.

    Returns scalar metrics for a KFP Metrics artifact. Raises ValidationFailed (after writing both
    reports, so they can be inspected) when any expectation failed.
    """
    from sermtl.validation import validate

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    summary = validate(Path(corpus_dir), Path(docs_dir), params)
    payload = _read_json(summary.summary_path)
    metrics = validation_metrics(summary.success, payload)
    failures = "" if summary.success else summary.describe_failures()
    report_html = Path(report_html)
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(render_report(summary.success, metrics, failures, payload, summary.data_docs_path))
    if not summary.success:
        raise ValidationFailed(f"corpus validation failed:\n{failures}")
    return metrics


def _read_json(path: Any) -> dict[str, Any]:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def validation_metrics(success: bool, payload: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics from summary.json (KFP Metrics hold numbers only): success as 0/1 and counts."""
    entries = payload.get("expectations") or []
    evaluated = payload.get("evaluated_expectations", len(entries))
    failed = payload.get("unsuccessful_expectations", sum(not e.get("success", True) for e in entries))
    metrics = {
        "success": 1.0 if success else 0.0,
        "evaluated_expectations": float(evaluated),
        "failed_expectations": float(failed),
    }
    rows = (payload.get("statistics") or {}).get("rows")
    if isinstance(rows, int | float):
        metrics["validated_utterances"] = float(rows)
    return metrics


def _expectation_row(entry: dict[str, Any]) -> str:
    ok = bool(entry.get("success"))
    cells = (
        entry.get("name", "?"),
        entry.get("table", ""),
        entry.get("column") or "",
        "ok" if ok else "FAILED",
        "" if entry.get("unexpected_count") is None else entry["unexpected_count"],
    )
    tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
    return f"<tr class='{'ok' if ok else 'bad'}'>{tds}</tr>"


def render_report(
    success: bool,
    metrics: dict[str, float],
    failures: str,
    payload: dict[str, Any],
    data_docs_path: Any = None,
) -> str:
    """One self-contained HTML page (no scripts, no CDN): what the KFP UI shows for the HTML artifact.

    The great-expectations Data Docs are a multi-page site that loads assets from a CDN, so they
    travel in their own artifact; this page summarises them from summary.json.
    """
    verdict = "passed" if success else "FAILED"
    entries = sorted(payload.get("expectations") or [], key=lambda e: bool(e.get("success")))
    rows = "".join(_expectation_row(e) for e in entries)
    header = "".join(f"<th>{h}</th>" for h in ("expectation", "table", "column", "result", "unexpected"))
    table = f"<h2>Expectations</h2><table><tr>{header}</tr>{rows}</table>" if rows else ""
    metric_items = "".join(f"<li>{html.escape(k)}: {v:g}</li>" for k, v in metrics.items())
    failure_block = f"<h2>Failures</h2><pre>{html.escape(failures)}</pre>" if failures else ""
    docs = (
        f"<p>Great-expectations Data Docs: {html.escape(str(data_docs_path))}</p>" if data_docs_path else ""
    )
    raw = html.escape(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>sermtl corpus validation</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.ok td:nth-child(4){color:#1a7f37}"
        ".bad td:nth-child(4){color:#cf222e;font-weight:bold}"
        "pre{background:#f6f8fa;padding:1em;overflow:auto}"
        ".passed{color:#1a7f37}.FAILED{color:#cf222e}</style></head><body>"
        f"<h1>Corpus validation <span class='{verdict}'>{verdict}</span></h1>"
        f"<ul>{metric_items}</ul>{failure_block}{table}{docs}"
        f"<details><summary>summary.json</summary><pre>{raw}</pre></details>"
        "</body></html>\n"
    )
