"""Data validation of an ingested corpus with great-expectations (GX Core 1.x).

Ingestion writes `manifest.parquet` + a flat audio store; everything later (folds, training,
significance tests) silently trusts that table. This stage states the contract as a GX suite, runs it
through one Checkpoint and keeps two outputs: rendered Data Docs (for people) and `summary.json`
(for the CLI, DVC and the KFP component). A failed expectation names the offending rows.

Besides the raw manifest, GX validates derived tables so that cross-row rules appear in Data Docs
with readable rows: per-column dtypes, per-utterance consistency (sample counts, store layout,
identity fields, class bins), speakers per session, class counts per test fold, and the store
metadata.
"""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.data.audio import audio_checksum
from sermtl.data.corpus import UTTERANCE_ID_RE
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir, write_json
from sermtl.params import Params
from sermtl.schema import (
    AUDIO_FILE,
    CLASS_NAMES,
    DIMENSIONS,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REPORT_FILE,
    STORE_META_FILE,
)

log = logging.getLogger(__name__)
# GX narrates its internals at INFO (from import on); under the KFP executor, whose root logger is at
# INFO, that buries the report.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

SUMMARY_FILE = "summary.json"
DATA_DOCS_DIR = "data_docs"
RATING_MIN, RATING_MAX = 1.0, 5.0
# duration_s is the source length; after resampling to data.sample_rate the sample count may differ
# by the resampler's rounding (torchaudio: ceil), never by more than this.
SAMPLE_COUNT_TOLERANCE = 2
MAX_EXAMPLES = 5
SHA256_RE = r"^[0-9a-f]{64}$"
# The ingestion's id pattern with its named groups made non-capturing (pandas warns about groups).
_UTTERANCE_ID_REGEX = re.sub(r"\(\?P<\w+>", "(?:", UTTERANCE_ID_RE.pattern)
STORE_DTYPE = "int16"
_PARTIAL_UNEXPECTED = 20  # rows GX keeps per failed expectation (Data Docs show them)
_TABLES_DIR = "_tables"  # derived tables as parquet, inside the staging dir while GX runs
_REQUIRED_FILES = (MANIFEST_FILE, STORE_META_FILE, AUDIO_FILE, REPORT_FILE)
# What a validation folder holds; one of an earlier sermtl (no marker) is known by its summary.json.
VALIDATION_OUTPUT = OutputKind.of("validate", (SUMMARY_FILE, DATA_DOCS_DIR, _TABLES_DIR), (SUMMARY_FILE,))

# Columns that identify a row of each validated table: they lead every example row.
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "manifest": ("utterance_id",),
    "manifest_columns": ("column",),
    "utterances": ("utterance_id",),
    "sessions": ("session",),
    "speakers": ("speaker",),
    "class_counts": ("fold", "dimension", "class_name"),
    "store": (),
    "wavs": (),
}


class ValidationInputError(ValueError):
    """The ingest folder lacks a file or holds one that cannot be read at all."""


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


@dataclass(frozen=True)
class _Check:
    """An expectation plus what the summary needs to explain it."""

    table: str
    name: str
    expectation: Any  # a great_expectations Expectation
    show: tuple[str, ...] = ()  # extra columns to print with each example row


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
        results = _run_checkpoint(tables, checks, staging)
        statistics = _statistics(manifest, store_meta, results, skipped)
        entries = [_entry(check, result, tables[check.table]) for check, result in results]
        statistics["elapsed_s"] = round(time.perf_counter() - started, 3)
        payload = {
            "success": all(e["success"] for e in entries),
            "ingest_dir": str(ingest_dir),
            "statistics": statistics,
            "evaluated_expectations": len(entries),
            "unsuccessful_expectations": sum(not e["success"] for e in entries),
            "expectations": entries,
            "data_docs": f"{DATA_DOCS_DIR}/index.html",
            "params": _params_payload(params),
        }
        write_json(staging / SUMMARY_FILE, payload)

    failures = [_failure(e) for e in entries if not e["success"]]
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


# --------------------------------------------------------------------------- inputs


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


# --------------------------------------------------------------------------- derived tables


def build_tables(
    manifest: pd.DataFrame,
    store_meta: dict[str, Any],
    audio_bytes: int,
    params: Params,
    *,
    audio_sha256: str | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """The manifest plus the derived tables the suite validates (all with a plain RangeIndex).

    `audio_sha256` is the checksum of audio.pcm16 as read now and `report` ingestion's report.json;
    without them (unit tests of single tables) their expectations see an unverified store.
    """
    tables = {
        "manifest": manifest,
        "manifest_columns": _columns_table(manifest),
        "utterances": _utterances_table(manifest, store_meta, params),
        "sessions": _sessions_table(manifest, params),
        "speakers": _speakers_table(manifest),
        "class_counts": _class_counts_table(manifest, params),
        "store": _store_table(store_meta, audio_bytes, audio_sha256),
        "wavs": _wavs_table(report or {}),
    }
    return {name: df.reset_index(drop=True) for name, df in tables.items()}


def _col(df: pd.DataFrame, name: str, numeric: bool = False) -> pd.Series:
    """A column, or all-missing when absent (the schema check reports the absence once)."""
    if name not in df.columns:
        return pd.Series(np.nan if numeric else None, index=df.index, dtype="float64" if numeric else object)
    return pd.to_numeric(df[name], errors="coerce") if numeric else df[name]


def _number(value: Any) -> float | int:
    """A store.json number; NaN when absent or not a number (the store expectations then fail)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return math.nan
    try:
        number = float(value)
    except ValueError:
        return math.nan
    return int(number) if number.is_integer() else number


def _dtype_ok(expected: str, series: pd.Series) -> bool:
    if expected == "string":
        return pd.api.types.is_string_dtype(series)
    if expected == "int64":
        return pd.api.types.is_integer_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if expected == "float64":
        return pd.api.types.is_float_dtype(series)
    if expected == "bool":
        return pd.api.types.is_bool_dtype(series)
    return str(series.dtype) == expected


def _columns_table(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in [*MANIFEST_COLUMNS, *(c for c in manifest.columns if c not in MANIFEST_COLUMNS)]:
        expected = MANIFEST_COLUMNS.get(name)
        present = name in manifest.columns
        actual = str(manifest[name].dtype) if present else "(missing)"
        rows.append(
            {
                "column": str(name),
                "expected_dtype": expected or "(not in contract)",
                "actual_dtype": actual,
                "in_contract": expected is not None,
                "present": present,
                "dtype_ok": bool(present and expected is not None and _dtype_ok(expected, manifest[name])),
            }
        )
    return pd.DataFrame(rows)


def _utterances_table(manifest: pd.DataFrame, store_meta: dict[str, Any], params: Params) -> pd.DataFrame:
    uid = _col(manifest, "utterance_id").astype(object)
    parts = uid.astype("string").str.extract(UTTERANCE_ID_RE.pattern)
    table = pd.DataFrame({"utterance_id": uid})

    contract = [c for c in MANIFEST_COLUMNS if c in manifest.columns]
    table["null_columns"] = manifest[contract].isna().dot(pd.Index(contract) + ",").str.rstrip(",")

    duration = _col(manifest, "duration_s", numeric=True)
    num_samples = _col(manifest, "num_samples", numeric=True)
    offset = _col(manifest, "offset", numeric=True)
    table["duration_s"] = duration
    table["num_samples"] = num_samples
    table["expected_num_samples"] = (duration * params.data.sample_rate).round()
    table["num_samples_error"] = num_samples - table["expected_num_samples"]

    # Store layout: in offset order, an utterance must start at or after every earlier one's end.
    table["offset"] = offset
    table["end_sample"] = offset + num_samples
    table["store_total_samples"] = _number(store_meta.get("total_samples"))
    order = offset.sort_values(kind="stable").index
    ends = table["end_sample"].loc[order]
    previous_end = ends.cummax().shift(1)
    table["previous_utterance_id"] = uid.loc[order].shift(1).reindex(table.index)
    table["overlap_samples"] = (previous_end - offset.loc[order]).clip(lower=0).fillna(0).reindex(table.index)

    # Identity fields must agree with the id (speaker = letter starting the LAST segment).
    session = _col(manifest, "session", numeric=True)
    table["session"] = session
    table["id_session"] = pd.to_numeric(parts["session"], errors="coerce")
    for name in ("dialog", "speaker", "gender", "improvised"):
        table[name] = _col(manifest, name).astype(object)
    table["id_dialog"] = parts["dialog"].astype(object)
    table["id_gender"] = parts["speaker"].astype(object)
    table["id_speaker"] = ("Ses" + parts["session"] + "_" + parts["speaker"]).astype(object)
    table["id_improvised"] = parts["kind"].map({"impro": True, "script": False}).astype(object)

    # Classes must follow the configured bins of the rating they came from.
    low_max, high_min = params.data.thresholds.low_max, params.data.thresholds.high_min
    for dim in DIMENSIONS:
        rating = _col(manifest, dim, numeric=True)
        expected = pd.Series(np.where(rating <= low_max, 0.0, np.where(rating >= high_min, 2.0, 1.0)))
        table[dim] = rating
        table[f"{dim}_class"] = _col(manifest, f"{dim}_class", numeric=True)
        table[f"expected_{dim}_class"] = expected.where(rating.notna())
    return table.astype({c: object for c in table.columns if table[c].dtype.kind not in "biuf"})


def _sessions_table(manifest: pd.DataFrame, params: Params) -> pd.DataFrame:
    session = _col(manifest, "session", numeric=True)
    speaker = _col(manifest, "speaker").astype(object)
    observed = sorted(int(s) for s in session.dropna().unique())
    rows = []
    for s in sorted(set(params.data.sessions) | set(observed)):
        in_session = session == s
        speakers = sorted(str(x) for x in speaker[in_session].dropna().unique())
        rows.append(
            {
                "session": s,
                "configured": s in params.data.sessions,
                "n_utterances": int(in_session.sum()),
                "n_speakers": len(speakers),
                "speakers": " ".join(speakers),
            }
        )
    return pd.DataFrame(rows, columns=["session", "configured", "n_utterances", "n_speakers", "speakers"])


def _speakers_table(manifest: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "speaker": _col(manifest, "speaker").astype(object),
            "session": _col(manifest, "session", numeric=True),
        }
    ).dropna(subset=["speaker"])
    rows = []
    for speaker, group in frame.groupby("speaker", sort=True):
        sessions = sorted(int(s) for s in group["session"].dropna().unique())
        rows.append(
            {
                "speaker": str(speaker),
                "n_sessions": len(sessions),
                "sessions": " ".join(map(str, sessions)),
                "n_utterances": len(group),
            }
        )
    return pd.DataFrame(rows, columns=["speaker", "n_sessions", "sessions", "n_utterances"])


def _class_counts_table(manifest: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Utterances per (test session, dimension, class): the full cross product, zero-filled."""
    session = _col(manifest, "session", numeric=True)
    rows = []
    for fold in params.data.sessions:
        in_fold = session == fold
        for dim in DIMENSIONS:
            counts = _col(manifest, f"{dim}_class", numeric=True)[in_fold].value_counts()
            for cls, class_name in enumerate(CLASS_NAMES):
                rows.append(
                    {
                        "fold": fold,
                        "dimension": dim,
                        "class": cls,
                        "class_name": class_name,
                        "count": int(counts.get(float(cls), 0)),
                    }
                )
    return pd.DataFrame(rows, columns=["fold", "dimension", "class", "class_name", "count"])


def _store_table(store_meta: dict[str, Any], audio_bytes: int, audio_sha256: str | None) -> pd.DataFrame:
    itemsize = np.dtype(STORE_DTYPE).itemsize
    recorded = store_meta.get("sha256")
    row = {
        "sample_rate": _number(store_meta.get("sample_rate")),
        "dtype": str(store_meta.get("dtype")),
        "total_samples": _number(store_meta.get("total_samples")),
        "audio_file_bytes": audio_bytes,
        "audio_file_samples": audio_bytes / itemsize,
        "recorded_sha256": str(recorded),
        "checksum": "missing" if not recorded else "match" if recorded == audio_sha256 else "mismatch",
    }
    # GX column expectations skip nulls, so an absent field must be its own failure.
    row["missing_fields"] = ",".join(
        k for k in ("sample_rate", "dtype", "total_samples") if k not in store_meta or row[k] != row[k]
    )
    return pd.DataFrame([row])


def _wavs_table(report: dict[str, Any]) -> pd.DataFrame:
    """Wavs that no annotation names, as a share of the wavs ingestion found (report.json)."""
    found, unannotated = report.get("wavs_found"), report.get("unannotated_wavs")
    if not isinstance(found, int) or not isinstance(unannotated, list):
        # An absent count must fail, not be skipped as a null: the report predates the count.
        row = {
            "wavs_found": -1,
            "unannotated_wavs": -1,
            "unannotated_share": 1.0,
            "examples": "report.json has no wavs_found/unannotated_wavs: re-run `sermtl ingest --force`",
        }
    else:
        row = {
            "wavs_found": found,
            "unannotated_wavs": len(unannotated),
            "unannotated_share": len(unannotated) / found if found else 0.0,
            "examples": ", ".join(map(str, unannotated[:5])),
        }
    return pd.DataFrame([row])


# --------------------------------------------------------------------------- the suite


def rating_grid(step: float) -> list[float]:
    """Allowed rating values: RATING_MIN, RATING_MIN + step, ... up to RATING_MAX."""
    count = math.floor((RATING_MAX - RATING_MIN) / step + 1e-9)
    return [round(RATING_MIN + i * step, 9) for i in range(count + 1)]


def build_checks(tables: dict[str, pd.DataFrame], params: Params) -> tuple[list[_Check], list[str]]:
    """The expectations per table, and the names of those skipped because their column is absent."""
    import great_expectations as gx

    E = gx.expectations
    v, d = params.validation, params.data
    bad_audio_mostly = max(0.0, 1.0 - v.max_bad_audio_fraction)
    present = set(tables["manifest"].columns)
    checks: list[_Check] = []
    skipped: list[str] = []

    def add(table: str, name: str, expectation: Any, why: str, show: tuple[str, ...] = ()) -> None:
        expectation.meta = {"name": name}
        expectation.notes = f"{name}: {why}"  # Data Docs show notes (not meta) next to the expectation
        checks.append(_Check(table, name, expectation, show))

    def add_column(
        name: str,
        column: str,
        factory: Callable[..., Any],
        why: str,
        show: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        """A manifest column expectation; skipped (and listed) when the schema check already fails on it."""
        if column not in present:
            skipped.append(name)
            return
        add("manifest", name, factory(column=column, **kwargs), why, show)

    # Schema.
    add(
        "manifest",
        "manifest columns match the contract",
        E.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=True),
        "every later stage reads these columns by name (sermtl.schema.MANIFEST_COLUMNS)",
    )
    add(
        "manifest",
        "manifest is not empty",
        E.ExpectTableRowCountToBeBetween(min_value=1),
        "an empty manifest means ingestion kept nothing",
    )
    columns_why = "missing, extra or mistyped columns break readers that trust sermtl.schema"
    add(
        "manifest_columns",
        "every contract column is present",
        E.ExpectColumnValuesToBeInSet(column="present", value_set=[True]),
        columns_why,
        ("expected_dtype",),
    )
    add(
        "manifest_columns",
        "no column outside the contract",
        E.ExpectColumnValuesToBeInSet(column="in_contract", value_set=[True]),
        columns_why,
        ("actual_dtype",),
    )
    add(
        "manifest_columns",
        "column dtypes match the contract",
        E.ExpectColumnValuesToBeInSet(column="dtype_ok", value_set=[True]),
        columns_why,
        ("expected_dtype", "actual_dtype"),
    )

    # Keys and completeness.
    add_column(
        "utterance_id is unique",
        "utterance_id",
        E.ExpectColumnValuesToBeUnique,
        "one row per utterance: duplicates double-count an utterance and leak across folds",
        ("wav_path",),
    )
    add_column(
        "wav_path is unique",
        "wav_path",
        E.ExpectColumnValuesToBeUnique,
        "two utterances on one wav means a prefix collision (script01_1 vs script01_1b)",
    )
    add_column(
        "utterance_id is an IEMOCAP id",
        "utterance_id",
        E.ExpectColumnValuesToMatchRegex,
        "session, dialog and speaker are derived from it",
        regex=_UTTERANCE_ID_REGEX,
    )
    add_column(
        "utterance_id is not null",
        "utterance_id",
        E.ExpectColumnValuesToNotBeNull,
        "rows are joined and reported by utterance_id",
    )
    # One expectation over a derived column instead of 25 column expectations: GX spends ~20 ms of
    # bookkeeping per expectation whatever the data size.
    add(
        "utterances",
        "no missing values",
        E.ExpectColumnValuesToBeInSet(column="null_columns", value_set=[""]),
        "a missing value would be silently dropped or mis-binned downstream",
    )

    # Labels.
    grid = rating_grid(v.rating_step)
    for dim in DIMENSIONS:
        add_column(
            f"{dim} within {RATING_MIN:g}..{RATING_MAX:g}",
            dim,
            E.ExpectColumnValuesToBeBetween,
            "IEMOCAP ratings use a 1..5 scale",
            min_value=RATING_MIN,
            max_value=RATING_MAX,
        )
        add_column(
            f"{dim} on the {v.rating_step:g} rating grid",
            dim,
            E.ExpectColumnValuesToBeInSet,
            "header ratings are means of external raters, so they lie on validation.rating_step",
            value_set=grid,
        )
        add_column(
            f"{dim}_class in 0/1/2",
            f"{dim}_class",
            E.ExpectColumnValuesToBeInSet,
            "three classes per dimension (low, medium, high)",
            value_set=[0, 1, 2],
        )
    add_column(
        "category is known",
        "category",
        E.ExpectColumnValuesToBeInSet,
        "categories are kept verbatim (validation.categories); xxx means no agreement",
        value_set=list(v.categories),
    )
    add_column(
        "gender is F or M", "gender", E.ExpectColumnValuesToBeInSet, "IEMOCAP actors", value_set=["F", "M"]
    )
    add_column(
        "session is configured",
        "session",
        E.ExpectColumnValuesToBeInSet,
        "rows from an unconfigured session would join no fold (data.sessions)",
        value_set=list(d.sessions),
    )
    add_column(
        "every configured session is present",
        "session",
        E.ExpectColumnDistinctValuesToEqualSet,
        "leave-one-session-out needs every session of data.sessions",
        value_set=list(d.sessions),
    )

    # Audio.
    add_column(
        "duration_s within limits",
        "duration_s",
        E.ExpectColumnValuesToBeBetween,
        "validation.min_duration_s..max_duration_s; outside means a broken segment",
        min_value=v.min_duration_s,
        max_value=v.max_duration_s,
    )
    add_column(
        "source_sample_rate allowed",
        "source_sample_rate",
        E.ExpectColumnValuesToBeInSet,
        "validation.allowed_source_sample_rates",
        value_set=list(v.allowed_source_sample_rates),
    )
    add_column(
        "sha256 is a hex digest",
        "sha256",
        E.ExpectColumnValuesToMatchRegex,
        "provenance of each source wav",
        regex=SHA256_RE,
    )
    add_column(
        "offset is not negative",
        "offset",
        E.ExpectColumnValuesToBeBetween,
        "offsets index the audio store",
        min_value=0,
    )
    add_column(
        "num_samples is positive",
        "num_samples",
        E.ExpectColumnValuesToBeBetween,
        "an empty utterance cannot be framed",
        min_value=1,
    )
    add_column(
        "no non-finite samples",
        "nonfinite_count",
        E.ExpectColumnValuesToBeInSet,
        "NaN/inf samples poison every batch they enter",
        value_set=[0],
    )
    add_column(
        "not silent",
        "rms_dbfs",
        E.ExpectColumnValuesToBeBetween,
        f"rms_dbfs >= validation.silence_rms_dbfs; at most {v.max_bad_audio_fraction:.2%} may fail",
        min_value=v.silence_rms_dbfs,
        mostly=bad_audio_mostly,
    )
    add_column(
        "not clipped",
        "clipped_fraction",
        E.ExpectColumnValuesToBeBetween,
        f"clipped_fraction <= validation.clipping_fraction; at most {v.max_bad_audio_fraction:.2%} may fail",
        min_value=0.0,
        max_value=v.clipping_fraction,
        mostly=bad_audio_mostly,
    )

    # Derived per utterance.
    add(
        "utterances",
        "num_samples matches duration_s",
        E.ExpectColumnValuesToBeBetween(
            column="num_samples_error", min_value=-SAMPLE_COUNT_TOLERANCE, max_value=SAMPLE_COUNT_TOLERANCE
        ),
        f"num_samples = duration_s * {d.sample_rate} Hz (data.sample_rate) within {SAMPLE_COUNT_TOLERANCE}",
        ("duration_s", "num_samples", "expected_num_samples"),
    )
    add(
        "utterances",
        "utterance ends inside the audio store",
        E.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="store_total_samples",
            column_B="end_sample",
            or_equal=True,
            ignore_row_if="either_value_is_missing",
        ),
        "offset + num_samples <= store.json total_samples",
        ("offset", "num_samples"),
    )
    add(
        "utterances",
        "utterances do not overlap in the store",
        E.ExpectColumnValuesToBeInSet(column="overlap_samples", value_set=[0]),
        "each utterance owns its samples; an overlap means a wrong offset",
        ("offset", "num_samples", "previous_utterance_id"),
    )
    identity_why = {
        "session": "Ses01 in the id is session 1",
        "dialog": "the dialog is the id without its last _ segment (never a prefix match)",
        "speaker": "the speaker is the letter starting the LAST id segment, not the mocap token",
        "gender": "the gender is the letter starting the LAST id segment",
        "improvised": "impro* dialogs are improvised, script* dialogs are not",
    }
    for column, why in identity_why.items():
        add(
            "utterances",
            f"{column} agrees with utterance_id",
            E.ExpectColumnPairValuesToBeEqual(
                column_A=column, column_B=f"id_{column}", ignore_row_if="either_value_is_missing"
            ),
            why,
        )
    for dim in DIMENSIONS:
        add(
            "utterances",
            f"{dim}_class follows data.thresholds",
            E.ExpectColumnPairValuesToBeEqual(
                column_A=f"{dim}_class",
                column_B=f"expected_{dim}_class",
                ignore_row_if="either_value_is_missing",
            ),
            f"low <= {d.thresholds.low_max:g} < medium < {d.thresholds.high_min:g} <= high",
            (dim,),
        )

    # Derived tables.
    add(
        "sessions",
        f"{d.speakers_per_session} speakers per session",
        E.ExpectColumnValuesToBeInSet(column="n_speakers", value_set=[d.speakers_per_session]),
        "each IEMOCAP session holds one female and one male speaker (data.speakers_per_session)",
        ("n_speakers", "speakers", "n_utterances"),
    )
    add(
        "speakers",
        "each speaker in one session",
        E.ExpectColumnValuesToBeInSet(column="n_sessions", value_set=[1]),
        "leave-one-session-out is speaker independent only if speakers do not span sessions",
        ("sessions",),
    )
    add(
        "class_counts",
        f"at least {v.min_class_count_per_fold} utterance per class per test fold",
        E.ExpectColumnValuesToBeBetween(column="count", min_value=v.min_class_count_per_fold),
        "UAR averages recall over classes: an empty class makes it undefined",
    )
    add(
        "store",
        "store.json has sample_rate, dtype and total_samples",
        E.ExpectColumnValuesToBeInSet(column="missing_fields", value_set=[""]),
        "readers of the audio store need all three",
    )
    add(
        "store",
        "store sample_rate matches data.sample_rate",
        E.ExpectColumnValuesToBeInSet(column="sample_rate", value_set=[d.sample_rate]),
        "the model's framing assumes data.sample_rate",
    )
    add(
        "store",
        f"store dtype is {STORE_DTYPE}",
        E.ExpectColumnValuesToBeInSet(column="dtype", value_set=[STORE_DTYPE]),
        "readers map audio.pcm16 as int16",
    )
    add(
        "store",
        "audio checksum matches store.json",
        E.ExpectColumnValuesToBeInSet(column="checksum", value_set=["match"]),
        "same-size corruption of audio.pcm16 changes its sha256; missing: written by an older sermtl "
        "(re-create the store with `sermtl ingest --force`)",
        ("recorded_sha256", "audio_file_bytes"),
    )
    add(
        "wavs",
        f"at most {v.max_unannotated_fraction:.0%} of wavs without annotation",
        E.ExpectColumnValuesToBeBetween(
            column="unannotated_share", min_value=0.0, max_value=v.max_unannotated_fraction
        ),
        "every IEMOCAP wav has an annotation; many without one mean annotation files went missing "
        "(validation.max_unannotated_fraction; report.json lists them)",
        ("wavs_found", "unannotated_wavs", "examples"),
    )
    add(
        "store",
        "audio file size matches total_samples",
        E.ExpectColumnPairValuesToBeEqual(column_A="total_samples", column_B="audio_file_samples"),
        "a truncated or over-long audio.pcm16 means ingestion did not finish",
        ("audio_file_bytes",),
    )
    return checks, skipped


# --------------------------------------------------------------------------- running GX


def _run_checkpoint(
    tables: dict[str, pd.DataFrame], checks: list[_Check], staging: Path
) -> list[tuple[_Check, Any]]:
    """Run every table's suite through one Checkpoint; Data Docs are rendered into `staging/data_docs`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    table_dir = staging / _TABLES_DIR
    table_dir.mkdir(parents=True)
    # Ephemeral (in-memory stores): a file context re-reads its YAML config for every stored object,
    # which cost seconds per run. Its only Data Docs site is a folder of the staging directory.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DATA_DOCS_DIR: {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(staging / DATA_DOCS_DIR),
                },
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("ingest")

    definitions = []
    for table_name, frame in tables.items():
        expectations = [c.expectation for c in checks if c.table == table_name]
        if not expectations:
            continue
        # Parquet assets, not dataframe assets: a Checkpoint hands the same batch parameters to all
        # its validation definitions, so in-memory dataframes would need one Checkpoint per table.
        path = table_dir / f"{table_name}.parquet"
        frame.to_parquet(path, index=False)
        batch = source.add_parquet_asset(table_name, path=path).add_batch_definition_whole_dataframe("all")
        # Add the suite complete: adding expectations one by one re-serialises it every time.
        suite = context.suites.add(gx.ExpectationSuite(name=table_name, expectations=expectations))
        definitions.append(
            context.validation_definitions.add(
                gx.ValidationDefinition(name=table_name, data=batch, suite=suite)
            )
        )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="ingest_validation",
            validation_definitions=definitions,
            # No UpdateDataDocsAction: it rebuilds the whole site once per validation definition
            # (7 builds, ~4 s); one build after the run renders the same pages.
            actions=[],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": _PARTIAL_UNEXPECTED},
        )
    )
    result = checkpoint.run(run_id=gx.RunIdentifier(run_name="sermtl-validate"))
    context.build_data_docs()

    # Results come back grouped by suite; pair them with their checks by the unique name in meta.
    by_key = {(c.table, c.name): c for c in checks}
    if len(by_key) != len(checks):
        raise RuntimeError("expectation names must be unique per table")
    results = {v.suite_name: v.results for v in result.run_results.values()}
    paired = [
        (by_key[(name, res.expectation_config.meta["name"])], res)
        for name in tables
        for res in results.get(name, [])
    ]
    shutil.rmtree(table_dir)
    if not (staging / DATA_DOCS_DIR / "index.html").is_file():
        raise RuntimeError(f"great-expectations rendered no Data Docs into {staging / DATA_DOCS_DIR}")
    return paired


# --------------------------------------------------------------------------- reporting


def _entry(check: _Check, result: Any, frame: pd.DataFrame) -> dict[str, Any]:
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


def _failure(entry: dict[str, Any]) -> Failure:
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


def _statistics(
    manifest: pd.DataFrame,
    store_meta: dict[str, Any],
    results: list[tuple[_Check, Any]],
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


def _params_payload(params: Params) -> dict[str, Any]:
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
