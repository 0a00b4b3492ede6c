"""The validate stage: read an ingest folder, run the suite on its tables, and write Data Docs and
summary.json atomically into the output folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from sermtl.data.audio import audio_checksum
from sermtl.data.validate.checkpoint import DATA_DOCS_DIR, TABLES_DIR, run_checkpoint
from sermtl.data.validate.checks import build_checks
from sermtl.data.validate.summary import (
    ValidationSummary,
    entry,
    failure,
    params_payload,
    summary_statistics,
)
from sermtl.data.validate.tables import build_tables
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir, write_json
from sermtl.params import Params
from sermtl.schema import AUDIO_FILE, MANIFEST_FILE, REPORT_FILE, STORE_META_FILE

log = logging.getLogger(__package__)  # sermtl.data.validate, as before the stage had modules of its own

SUMMARY_FILE = "summary.json"
_REQUIRED_FILES = (MANIFEST_FILE, STORE_META_FILE, AUDIO_FILE, REPORT_FILE)
# What a validation folder holds; one of an earlier sermtl (no marker) is known by its summary.json.
VALIDATION_OUTPUT = OutputKind.of("validate", (SUMMARY_FILE, DATA_DOCS_DIR, TABLES_DIR), (SUMMARY_FILE,))


class ValidationInputError(ValueError):
    """The ingest folder lacks a file or holds one that cannot be read at all."""


def validate(ingest_dir: Path, out_dir: Path, params: Params) -> ValidationSummary:
    """Validate an ingest folder; write Data Docs and summary.json to `out_dir` atomically.

    Returns the verdict instead of raising on unmet expectations, so callers can still publish
    the reports; raises ValidationInputError only when the inputs cannot be read.
    """
    started = time.perf_counter()
    check_output_dir(out_dir, VALIDATION_OUTPUT, [("ingest folder", ingest_dir)])
    ingest_dir, out_dir = Path(ingest_dir).absolute(), Path(out_dir).absolute()
    manifest, store_meta, audio_bytes = _read_inputs(ingest_dir)
    tables = build_tables(
        manifest,
        store_meta,
        audio_bytes,
        params,
        audio_sha256=audio_checksum(ingest_dir / AUDIO_FILE),
        report=_read_json_object(ingest_dir / REPORT_FILE),
    )
    checks, skipped = build_checks(tables, params)

    with atomic_directory(out_dir, VALIDATION_OUTPUT) as staging:
        results = run_checkpoint(tables, checks, staging)
        statistics = summary_statistics(manifest, store_meta, results, skipped)
        entries = [entry(check, result, tables[check.table]) for check, result in results]
        statistics["elapsed_s"] = round(time.perf_counter() - started, 3)
        payload = {
            "success": all(e["success"] for e in entries),
            "ingest_dir": str(ingest_dir),
            "statistics": statistics,
            "evaluated_expectations": len(entries),
            "unsuccessful_expectations": sum(not e["success"] for e in entries),
            "expectations": entries,
            "data_docs": f"{DATA_DOCS_DIR}/index.html",
            "params": params_payload(params),
        }
        write_json(staging / SUMMARY_FILE, payload)

    failures = [failure(e) for e in entries if not e["success"]]
    summary = ValidationSummary(
        success=payload["success"],
        failures=failures,
        summary_path=out_dir / SUMMARY_FILE,
        data_docs_path=out_dir / DATA_DOCS_DIR / "index.html",
        statistics=statistics,
    )
    log.info(
        "validated %d rows with %d expectations in %.1f s: %s",
        len(manifest),
        len(entries),
        time.perf_counter() - started,
        "passed" if summary.success else f"{len(failures)} failed",
    )
    return summary


def _read_inputs(ingest_dir: Path) -> tuple[pd.DataFrame, dict[str, Any], int]:
    if not ingest_dir.is_dir():
        raise ValidationInputError(f"{ingest_dir}: ingest folder not found (run `sermtl ingest` first)")
    missing = [name for name in _REQUIRED_FILES if not (ingest_dir / name).is_file()]
    if missing:
        raise ValidationInputError(
            f"{ingest_dir}: missing {', '.join(missing)} (expected the output of `sermtl ingest`)"
        )
    try:
        manifest = pd.read_parquet(ingest_dir / MANIFEST_FILE)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ValidationInputError(f"{ingest_dir / MANIFEST_FILE}: cannot read parquet: {exc}") from exc
    store_meta = _read_json_object(ingest_dir / STORE_META_FILE)
    _read_json_object(ingest_dir / REPORT_FILE)  # its form here; build_tables reads its counts
    audio_bytes = (ingest_dir / AUDIO_FILE).stat().st_size
    return manifest.reset_index(drop=True), store_meta, audio_bytes


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationInputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValidationInputError(f"{path}: expected a JSON object, got {type(parsed).__name__}")
    return parsed
