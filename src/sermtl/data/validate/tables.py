"""The tables the suite validates: the manifest plus derived ones, so that cross-row rules show readable
rows in Data Docs: per-column dtypes, per-utterance consistency (sample counts, store layout, identity
fields, class bins), speakers per session, class counts per test fold, and the store metadata."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sermtl.data.corpus import UTTERANCE_ID_RE
from sermtl.params import Params
from sermtl.schema import CLASS_NAMES, DIMENSIONS, MANIFEST_COLUMNS

STORE_DTYPE = "int16"
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
