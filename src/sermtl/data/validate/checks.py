"""The expectation suite: what a valid ingest folder is, as great-expectations expectations over the
tables of sermtl.data.validate.tables, in groups (schema, keys, labels, audio, per utterance, derived)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sermtl.data.corpus import UTTERANCE_ID_RE
from sermtl.data.validate.tables import STORE_DTYPE
from sermtl.params import Params
from sermtl.schema import DIMENSIONS, MANIFEST_COLUMNS

RATING_MIN, RATING_MAX = 1.0, 5.0
# duration_s is the source length; after resampling to data.sample_rate the sample count may differ
# by the resampler's rounding (torchaudio: ceil), never by more than this.
SAMPLE_COUNT_TOLERANCE = 2
SHA256_RE = r"^[0-9a-f]{64}$"
# The ingestion's id pattern with its named groups made non-capturing (pandas warns about groups).
_UTTERANCE_ID_REGEX = re.sub(r"\(\?P<\w+>", "(?:", UTTERANCE_ID_RE.pattern)


@dataclass(frozen=True)
class Check:
    """An expectation plus what the summary needs to explain it."""

    table: str
    name: str
    expectation: Any  # a great_expectations Expectation
    show: tuple[str, ...] = ()  # extra columns to print with each example row


def rating_grid(step: float) -> list[float]:
    """Allowed rating values: RATING_MIN, RATING_MIN + step, ... up to RATING_MAX."""
    count = math.floor((RATING_MAX - RATING_MIN) / step + 1e-9)
    return [round(RATING_MIN + i * step, 9) for i in range(count + 1)]


@dataclass
class _Suite:
    """The checks so far, in order, and the names of those skipped because their manifest column is absent."""

    present: set[str]  # the manifest's columns
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, table: str, name: str, expectation: Any, why: str, show: tuple[str, ...] = ()) -> None:
        expectation.meta = {"name": name}
        expectation.notes = f"{name}: {why}"  # Data Docs show notes (not meta) next to the expectation
        self.checks.append(Check(table, name, expectation, show))

    def add_column(
        self,
        name: str,
        column: str,
        factory: Callable[..., Any],
        why: str,
        show: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        """A manifest column expectation; skipped (and listed) when the schema check already fails on it."""
        if column not in self.present:
            self.skipped.append(name)
            return
        self.add("manifest", name, factory(column=column, **kwargs), why, show)


def build_checks(tables: dict[str, pd.DataFrame], params: Params) -> tuple[list[Check], list[str]]:
    """The expectations per table, and the names of those skipped because their column is absent."""
    import great_expectations as gx

    suite = _Suite(set(tables["manifest"].columns))
    for group in _GROUPS:
        group(suite, gx.expectations, params)
    return suite.checks, suite.skipped


def _schema_checks(suite: _Suite, E: Any, params: Params) -> None:
    """The manifest's columns and dtypes against sermtl.schema.MANIFEST_COLUMNS, and its row count."""
    suite.add(
        "manifest",
        "manifest columns match the contract",
        E.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=True),
        "every later stage reads these columns by name (sermtl.schema.MANIFEST_COLUMNS)",
    )
    suite.add(
        "manifest",
        "manifest is not empty",
        E.ExpectTableRowCountToBeBetween(min_value=1),
        "an empty manifest means ingestion kept nothing",
    )
    columns_why = "missing, extra or mistyped columns break readers that trust sermtl.schema"
    suite.add(
        "manifest_columns",
        "every contract column is present",
        E.ExpectColumnValuesToBeInSet(column="present", value_set=[True]),
        columns_why,
        ("expected_dtype",),
    )
    suite.add(
        "manifest_columns",
        "no column outside the contract",
        E.ExpectColumnValuesToBeInSet(column="in_contract", value_set=[True]),
        columns_why,
        ("actual_dtype",),
    )
    suite.add(
        "manifest_columns",
        "column dtypes match the contract",
        E.ExpectColumnValuesToBeInSet(column="dtype_ok", value_set=[True]),
        columns_why,
        ("expected_dtype", "actual_dtype"),
    )


def _key_checks(suite: _Suite, E: Any, params: Params) -> None:
    """One row per utterance, an IEMOCAP id on each, and no missing value."""
    suite.add_column(
        "utterance_id is unique",
        "utterance_id",
        E.ExpectColumnValuesToBeUnique,
        "one row per utterance: duplicates double-count an utterance and leak across folds",
        ("wav_path",),
    )
    suite.add_column(
        "wav_path is unique",
        "wav_path",
        E.ExpectColumnValuesToBeUnique,
        "two utterances on one wav means a prefix collision (script01_1 vs script01_1b)",
    )
    suite.add_column(
        "utterance_id is an IEMOCAP id",
        "utterance_id",
        E.ExpectColumnValuesToMatchRegex,
        "session, dialog and speaker are derived from it",
        regex=_UTTERANCE_ID_REGEX,
    )
    suite.add_column(
        "utterance_id is not null",
        "utterance_id",
        E.ExpectColumnValuesToNotBeNull,
        "rows are joined and reported by utterance_id",
    )
    # One expectation over a derived column instead of 25 column expectations: GX spends ~20 ms of
    # bookkeeping per expectation whatever the data size.
    suite.add(
        "utterances",
        "no missing values",
        E.ExpectColumnValuesToBeInSet(column="null_columns", value_set=[""]),
        "a missing value would be silently dropped or mis-binned downstream",
    )


def _label_checks(suite: _Suite, E: Any, params: Params) -> None:
    """Ratings on the 1..5 grid, classes 0/1/2, known categories, genders and sessions."""
    v, d = params.validation, params.data
    grid = rating_grid(v.rating_step)
    for dim in DIMENSIONS:
        suite.add_column(
            f"{dim} within {RATING_MIN:g}..{RATING_MAX:g}",
            dim,
            E.ExpectColumnValuesToBeBetween,
            "IEMOCAP ratings use a 1..5 scale",
            min_value=RATING_MIN,
            max_value=RATING_MAX,
        )
        suite.add_column(
            f"{dim} on the {v.rating_step:g} rating grid",
            dim,
            E.ExpectColumnValuesToBeInSet,
            "header ratings are means of external raters, so they lie on validation.rating_step",
            value_set=grid,
        )
        suite.add_column(
            f"{dim}_class in 0/1/2",
            f"{dim}_class",
            E.ExpectColumnValuesToBeInSet,
            "three classes per dimension (low, medium, high)",
            value_set=[0, 1, 2],
        )
    suite.add_column(
        "category is known",
        "category",
        E.ExpectColumnValuesToBeInSet,
        "categories are kept verbatim (validation.categories); xxx means no agreement",
        value_set=list(v.categories),
    )
    suite.add_column(
        "gender is F or M", "gender", E.ExpectColumnValuesToBeInSet, "IEMOCAP actors", value_set=["F", "M"]
    )
    suite.add_column(
        "session is configured",
        "session",
        E.ExpectColumnValuesToBeInSet,
        "rows from an unconfigured session would join no fold (data.sessions)",
        value_set=list(d.sessions),
    )
    suite.add_column(
        "every configured session is present",
        "session",
        E.ExpectColumnDistinctValuesToEqualSet,
        "leave-one-session-out needs every session of data.sessions",
        value_set=list(d.sessions),
    )


def _audio_checks(suite: _Suite, E: Any, params: Params) -> None:
    """Per-utterance audio statistics and store offsets within validation's limits."""
    v = params.validation
    bad_audio_mostly = max(0.0, 1.0 - v.max_bad_audio_fraction)
    suite.add_column(
        "duration_s within limits",
        "duration_s",
        E.ExpectColumnValuesToBeBetween,
        "validation.min_duration_s..max_duration_s; outside means a broken segment",
        min_value=v.min_duration_s,
        max_value=v.max_duration_s,
    )
    suite.add_column(
        "source_sample_rate allowed",
        "source_sample_rate",
        E.ExpectColumnValuesToBeInSet,
        "validation.allowed_source_sample_rates",
        value_set=list(v.allowed_source_sample_rates),
    )
    suite.add_column(
        "sha256 is a hex digest",
        "sha256",
        E.ExpectColumnValuesToMatchRegex,
        "provenance of each source wav",
        regex=SHA256_RE,
    )
    suite.add_column(
        "offset is not negative",
        "offset",
        E.ExpectColumnValuesToBeBetween,
        "offsets index the audio store",
        min_value=0,
    )
    suite.add_column(
        "num_samples is positive",
        "num_samples",
        E.ExpectColumnValuesToBeBetween,
        "an empty utterance cannot be framed",
        min_value=1,
    )
    suite.add_column(
        "no non-finite samples",
        "nonfinite_count",
        E.ExpectColumnValuesToBeInSet,
        "NaN/inf samples poison every batch they enter",
        value_set=[0],
    )
    suite.add_column(
        "not silent",
        "rms_dbfs",
        E.ExpectColumnValuesToBeBetween,
        f"rms_dbfs >= validation.silence_rms_dbfs; at most {v.max_bad_audio_fraction:.2%} may fail",
        min_value=v.silence_rms_dbfs,
        mostly=bad_audio_mostly,
    )
    suite.add_column(
        "not clipped",
        "clipped_fraction",
        E.ExpectColumnValuesToBeBetween,
        f"clipped_fraction <= validation.clipping_fraction; at most {v.max_bad_audio_fraction:.2%} may fail",
        min_value=0.0,
        max_value=v.clipping_fraction,
        mostly=bad_audio_mostly,
    )


def _utterance_checks(suite: _Suite, E: Any, params: Params) -> None:
    """Each utterance's consistency: sample count, store layout, identity fields and class bins."""
    d = params.data
    suite.add(
        "utterances",
        "num_samples matches duration_s",
        E.ExpectColumnValuesToBeBetween(
            column="num_samples_error", min_value=-SAMPLE_COUNT_TOLERANCE, max_value=SAMPLE_COUNT_TOLERANCE
        ),
        f"num_samples = duration_s * {d.sample_rate} Hz (data.sample_rate) within {SAMPLE_COUNT_TOLERANCE}",
        ("duration_s", "num_samples", "expected_num_samples"),
    )
    suite.add(
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
    suite.add(
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
        suite.add(
            "utterances",
            f"{column} agrees with utterance_id",
            E.ExpectColumnPairValuesToBeEqual(
                column_A=column, column_B=f"id_{column}", ignore_row_if="either_value_is_missing"
            ),
            why,
        )
    for dim in DIMENSIONS:
        suite.add(
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


def _table_checks(suite: _Suite, E: Any, params: Params) -> None:
    """Speakers per session and across sessions, class counts per fold, the store and the wavs."""
    v, d = params.validation, params.data
    suite.add(
        "sessions",
        f"{d.speakers_per_session} speakers per session",
        E.ExpectColumnValuesToBeInSet(column="n_speakers", value_set=[d.speakers_per_session]),
        "each IEMOCAP session holds one female and one male speaker (data.speakers_per_session)",
        ("n_speakers", "speakers", "n_utterances"),
    )
    suite.add(
        "speakers",
        "each speaker in one session",
        E.ExpectColumnValuesToBeInSet(column="n_sessions", value_set=[1]),
        "leave-one-session-out is speaker independent only if speakers do not span sessions",
        ("sessions",),
    )
    suite.add(
        "class_counts",
        f"at least {v.min_class_count_per_fold} utterance per class per test fold",
        E.ExpectColumnValuesToBeBetween(column="count", min_value=v.min_class_count_per_fold),
        "UAR averages recall over classes: an empty class makes it undefined",
    )
    suite.add(
        "store",
        "store.json has sample_rate, dtype and total_samples",
        E.ExpectColumnValuesToBeInSet(column="missing_fields", value_set=[""]),
        "readers of the audio store need all three",
    )
    suite.add(
        "store",
        "store sample_rate matches data.sample_rate",
        E.ExpectColumnValuesToBeInSet(column="sample_rate", value_set=[d.sample_rate]),
        "the model's framing assumes data.sample_rate",
    )
    suite.add(
        "store",
        f"store dtype is {STORE_DTYPE}",
        E.ExpectColumnValuesToBeInSet(column="dtype", value_set=[STORE_DTYPE]),
        "readers map audio.pcm16 as int16",
    )
    suite.add(
        "store",
        "audio checksum matches store.json",
        E.ExpectColumnValuesToBeInSet(column="checksum", value_set=["match"]),
        "same-size corruption of audio.pcm16 changes its sha256; missing: written by an older sermtl "
        "(re-create the store with `sermtl ingest --force`)",
        ("recorded_sha256", "audio_file_bytes"),
    )
    suite.add(
        "wavs",
        f"at most {v.max_unannotated_fraction:.0%} of wavs without annotation",
        E.ExpectColumnValuesToBeBetween(
            column="unannotated_share", min_value=0.0, max_value=v.max_unannotated_fraction
        ),
        "every IEMOCAP wav has an annotation; many without one mean annotation files went missing "
        "(validation.max_unannotated_fraction; report.json lists them)",
        ("wavs_found", "unannotated_wavs", "examples"),
    )
    suite.add(
        "store",
        "audio file size matches total_samples",
        E.ExpectColumnPairValuesToBeEqual(column_A="total_samples", column_B="audio_file_samples"),
        "a truncated or over-long audio.pcm16 means ingestion did not finish",
        ("audio_file_bytes",),
    )


# In this order: it is the order of summary.json's expectations and of the Data Docs pages.
_GROUPS = (_schema_checks, _key_checks, _label_checks, _audio_checks, _utterance_checks, _table_checks)
