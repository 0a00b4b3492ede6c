"""Validation stage: a valid miniature ingest passes; each way of breaking the contract is named.

GX is slow to import (4-10 s here) and each full run costs 1-2 s, so the failure modes are planted
on different rows of one broken ingest and validated in one shared run; each mode then has its own
parametrized test reading that run's report, and the run must fail exactly the listed expectations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np
import pandas as pd
import pytest

from sermtl.data import validate as validation
from sermtl.data.audio import audio_checksum
from sermtl.data.validate import ValidationInputError, validate
from sermtl.data.validate import stage as validation_stage
from sermtl.params import Params
from sermtl.schema import (
    AUDIO_FILE,
    CATEGORIES,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REPORT_FILE,
    STORE_META_FILE,
)

SAMPLE_RATE = 16000
LEVELS = (1.5, 3.0, 4.5)  # low, medium, high under the default thresholds


def make_manifest(sessions: tuple[int, ...] = (1, 2, 3, 4, 5), per_speaker: int = 6) -> pd.DataFrame:
    """A valid manifest: every session has one F and one M speaker and every class of every dimension."""
    rows = []
    offset = 0
    for session in sessions:
        for i in range(2 * per_speaker):
            gender = "FM"[i % 2]
            dialog = f"Ses{session:02d}F_impro01" if i < per_speaker else f"Ses{session:02d}M_script01_1b"
            uid = f"{dialog}_{gender}{i:03d}"
            duration = 0.5 + 0.05 * (i % 5)
            num_samples = round(duration * SAMPLE_RATE)
            valence, arousal, dominance = (LEVELS[(i + k) % 3] for k in range(3))
            rows.append(
                {
                    "utterance_id": uid,
                    "session": session,
                    "dialog": dialog,
                    "speaker": f"Ses{session:02d}_{gender}",
                    "gender": gender,
                    "improvised": "impro" in dialog,
                    "category": CATEGORIES[i % len(CATEGORIES)],
                    "valence": valence,
                    "arousal": arousal,
                    "dominance": dominance,
                    "valence_class": LEVELS.index(valence),
                    "arousal_class": LEVELS.index(arousal),
                    "dominance_class": LEVELS.index(dominance),
                    "start_s": 1.0 * i,
                    "end_s": 1.0 * i + duration,
                    "wav_path": f"Session{session}/sentences/wav/{dialog}/{uid}.wav",
                    "duration_s": duration,
                    "source_sample_rate": SAMPLE_RATE,
                    "sha256": hashlib.sha256(uid.encode()).hexdigest(),
                    "offset": offset,
                    "num_samples": num_samples,
                    "rms_dbfs": -25.0,
                    "peak": 0.5,
                    "clipped_fraction": 0.0,
                    "nonfinite_count": 0,
                }
            )
            offset += num_samples
    return pd.DataFrame(rows).astype(MANIFEST_COLUMNS)


def write_ingest(directory: Path, manifest: pd.DataFrame, **store_overrides: object) -> Path:
    """Write an ingest folder as `sermtl ingest` would (the audio file is sparse: only its size matters)."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(directory / MANIFEST_FILE, index=False)
    total = int((manifest["offset"] + manifest["num_samples"]).max()) if len(manifest) else 0
    with open(directory / AUDIO_FILE, "wb") as handle:
        handle.truncate(2 * total)
    store = {
        "sample_rate": SAMPLE_RATE,
        "dtype": "int16",
        "total_samples": total,
        "sha256": audio_checksum(directory / AUDIO_FILE),
        **store_overrides,
    }
    (directory / STORE_META_FILE).write_text(json.dumps(store))
    report = {"kept": len(manifest), "dropped": 0, "wavs_found": len(manifest), "unannotated_wavs": []}
    (directory / REPORT_FILE).write_text(json.dumps(report))
    return directory


def uid(manifest: pd.DataFrame, row: int) -> str:
    return str(manifest["utterance_id"].iat[row])


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, validation.ValidationSummary]:
    """One validation of the valid miniature ingest, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("valid")
    ingest = write_ingest(root / "ingest", make_manifest())
    return root, validate(ingest, root / "out", Params())


def test_valid_ingest_passes_and_writes_reports(valid_run: tuple[Path, validation.ValidationSummary]) -> None:
    root, summary = valid_run
    assert summary.success, summary.describe_failures()
    assert summary.failures == []
    assert summary.describe_failures() == "all expectations met"
    assert summary.data_docs_path == root / "out" / "data_docs" / "index.html"
    assert summary.data_docs_path.is_file()
    # Data Docs are self-contained relative to index.html: one page per validated table.
    pages = {
        p.parent.parent.parent.name for p in (root / "out" / "data_docs" / "validations").rglob("*.html")
    }
    assert pages == set(validation.TABLE_KEYS)
    index = summary.data_docs_path.read_text()
    assert "validations/class_counts/" in index

    payload = json.loads(summary.summary_path.read_text())
    assert payload["success"] is True
    assert payload["data_docs"] == "data_docs/index.html"
    assert payload["statistics"]["rows"] == 60
    assert payload["statistics"]["speakers"] == 10
    assert payload["statistics"]["unsuccessful_expectations"] == 0
    assert payload["evaluated_expectations"] == len(payload["expectations"]) > 40
    entry = payload["expectations"][0]
    assert {"name", "expectation_type", "column", "kwargs", "success", "unexpected_count", "examples"} <= set(
        entry
    )
    names = {e["name"] for e in payload["expectations"]}
    assert {
        "utterance_id is unique",
        "2 speakers per session",
        "store sample_rate matches data.sample_rate",
    } <= names
    # Nothing else next to out/: the staging folder was swapped in, not left behind.
    assert sorted(p.name for p in root.iterdir()) == ["ingest", "out"]


def _set(m: pd.DataFrame, row: int, column: str, value: object) -> None:
    m[column] = m[column].astype(object)
    m.at[row, column] = value
    m[column] = m[column].astype(MANIFEST_COLUMNS[column])


MANIFEST = make_manifest()
# Rows 0..11 are session 1, 12..23 session 2, ... Each failure mode breaks its own row, so one
# validation run covers all of them (GX costs ~1-2 s per run): a mode is detected when its named
# expectation fails with its row, and the run fails exactly the expectations listed below.
BROKEN_STORE = {"sample_rate": 22050}


def broken_manifest() -> pd.DataFrame:
    m = make_manifest()
    m.loc[9, "utterance_id"] = m.loc[7, "utterance_id"]  # duplicate id (same speaker and dialog)
    _set(m, 3, "valence", 5.5)  # above the scale (class set to what the bins say: one failure only)
    _set(m, 3, "valence_class", 2)
    _set(m, 4, "arousal", 2.3)  # off the 0.5 grid
    _set(m, 4, "arousal_class", 1)
    _set(m, 5, "dominance", np.nan)
    _set(m, 6, "category", "zzz")
    _set(m, 10, "rms_dbfs", -80.0)  # 1 silent utterance in 48 > 1% tolerated
    _set(m, 11, "clipped_fraction", 0.2)
    _set(m, 12, "nonfinite_count", 3)
    m.loc[13, "offset"] = m.loc[12, "offset"] + 10  # overlaps row 12 in the store
    _set(m, 14, "speaker", "Ses02_Q")  # a third speaker in session 2
    _set(m, 1, "speaker", "Ses01_F")  # Ses01F_impro01_M001 is male: speaker taken from the mocap token
    _set(m, 15, "improvised", False)  # Ses02F_impro01_M003 is an improvisation
    m.loc[16, "num_samples"] -= 100  # no longer duration_s * 16 kHz
    high = (m["session"] == 3) & (m["valence_class"] == 2)  # session 3 loses its high-valence class
    m.loc[high, "valence"] = 3.0
    m.loc[high, "valence_class"] = 1
    m = m[m["session"] != 5]  # a configured session missing
    return m.drop(columns=["peak"]).reset_index(drop=True)  # a contract column missing


# (mode, failing expectation, strings its failure message must contain); per-utterance modes
# name the utterance id first.
FAILURE_MODES = [
    ("duplicate-id", "utterance_id is unique", [uid(MANIFEST, 7)]),
    ("rating-above-5", "valence within 1..5", [uid(MANIFEST, 3), "valence=5.5"]),
    ("rating-above-5-off-grid", "valence on the 0.5 rating grid", [uid(MANIFEST, 3)]),
    ("rating-off-grid", "arousal on the 0.5 rating grid", [uid(MANIFEST, 4), "arousal=2.3"]),
    ("rating-nan", "no missing values", [uid(MANIFEST, 5), "null_columns=dominance"]),
    ("unknown-category", "category is known", [uid(MANIFEST, 6), "category=zzz"]),
    ("missing-session", "every configured session is present", ['"missing_values": [5]']),
    ("missing-session-folds", "at least 1 utterance per class per test fold", ["fold=5", "count=0"]),
    ("third-speaker", "2 speakers per session", ["session=2", "Ses02_Q"]),
    ("third-speaker-id", "speaker agrees with utterance_id", [uid(MANIFEST, 14), "speaker=Ses02_Q"]),
    (
        "class-missing-in-fold",
        "at least 1 utterance per class per test fold",
        ["fold=3, dimension=valence, class_name=high, count=0"],
    ),
    ("silent", "not silent", [uid(MANIFEST, 10), "rms_dbfs=-80.0"]),
    ("clipped", "not clipped", [uid(MANIFEST, 11), "clipped_fraction=0.2"]),
    ("nonfinite", "no non-finite samples", [uid(MANIFEST, 12), "nonfinite_count=3"]),
    ("store-sample-rate", "store sample_rate matches data.sample_rate", ["sample_rate=22050"]),
    ("missing-column", "manifest columns match the contract", ['"missing_columns": ["peak"]']),
    ("missing-column-listed", "every contract column is present", ["column=peak"]),
    (
        "overlapping-offsets",
        "utterances do not overlap in the store",
        [uid(MANIFEST, 13), f"previous_utterance_id={uid(MANIFEST, 12)}"],
    ),
    ("improvised-flag", "improvised agrees with utterance_id", [uid(MANIFEST, 15), "improvised=false"]),
    ("num-samples", "num_samples matches duration_s", [uid(MANIFEST, 16), "num_samples_error=-100"]),
    (
        "speaker-from-mocap-token",
        "speaker agrees with utterance_id",
        [uid(MANIFEST, 1), "id_speaker=Ses01_M"],
    ),
]


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> validation.ValidationSummary:
    root = tmp_path_factory.mktemp("broken")
    ingest = write_ingest(root / "ingest", broken_manifest(), **BROKEN_STORE)
    return validate(ingest, root / "out", Params())


def test_broken_ingest_fails_exactly_the_broken_expectations(
    broken_run: validation.ValidationSummary,
) -> None:
    assert not broken_run.success
    failed = {f.name for f in broken_run.failures}
    assert failed == {name for _, name, _ in FAILURE_MODES} | {"column dtypes match the contract"}
    payload = json.loads(broken_run.summary_path.read_text())
    assert payload["success"] is False
    assert payload["unsuccessful_expectations"] == len(failed)
    assert all(e["exception"] is None for e in payload["expectations"])


@pytest.mark.parametrize(("expectation", "needles"), [pytest.param(*m[1:], id=m[0]) for m in FAILURE_MODES])
def test_failure_mode_names_expectation_and_rows(
    broken_run: validation.ValidationSummary, expectation: str, needles: list[str]
) -> None:
    message = broken_run.describe_failures()
    assert f"- {expectation} [" in message, message
    block = message.split(f"- {expectation} [", 1)[1].split("\n- ", 1)[0]
    for needle in needles:
        assert needle in block, f"{needle!r} missing from:\n{block}"

    entry = next(
        e for e in json.loads(broken_run.summary_path.read_text())["expectations"] if e["name"] == expectation
    )
    assert entry["success"] is False
    if needles[0].startswith("Ses"):  # per-utterance: summary.json example rows carry the utterance id
        assert needles[0] in [example.get("utterance_id") for example in entry["examples"]]
        assert 1 <= len(entry["examples"]) <= 5


def test_single_failure_flips_success(tmp_path: Path) -> None:
    """One off-grid rating alone fails the run (the broken run above shows which expectation catches it)."""
    m = make_manifest()
    _set(m, 20, "valence", 2.3)
    _set(m, 20, "valence_class", 1)
    stale = tmp_path / "out" / validation.DATA_DOCS_DIR / "stale.html"  # an earlier run's (unmarked) output
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    (tmp_path / "out" / validation.SUMMARY_FILE).write_text("{}")
    summary = validate(write_ingest(tmp_path / "ingest", m), tmp_path / "out", Params())
    assert not stale.exists()  # the output folder is replaced as a whole
    assert not summary.success
    assert [f.name for f in summary.failures] == ["valence on the 0.5 rating grid"]
    assert summary.failures[0].examples == [{"utterance_id": uid(m, 20), "valence": 2.3}]


def test_bad_audio_within_tolerance_passes(tmp_path: Path) -> None:
    """`mostly`: one silent utterance in 60 is fine when 5% bad audio is tolerated."""
    params = Params(validation=dataclasses.replace(Params().validation, max_bad_audio_fraction=0.05))
    m = make_manifest()
    _set(m, 10, "rms_dbfs", -80.0)
    ingest = write_ingest(tmp_path / "ingest", m)
    summary = validate(ingest, tmp_path / "out", params)
    assert summary.success, summary.describe_failures()


@pytest.mark.parametrize("missing", [MANIFEST_FILE, STORE_META_FILE, AUDIO_FILE, REPORT_FILE])
def test_missing_ingest_file_is_a_clear_error(tmp_path: Path, missing: str) -> None:
    ingest = write_ingest(tmp_path / "ingest", make_manifest())
    (ingest / missing).unlink()
    with pytest.raises(ValidationInputError, match=missing.replace(".", r"\.")):
        validate(ingest, tmp_path / "out", Params())
    assert not (tmp_path / "out").exists()


def test_unreadable_store_json_is_a_clear_error(tmp_path: Path) -> None:
    ingest = write_ingest(tmp_path / "ingest", make_manifest())
    (ingest / STORE_META_FILE).write_text("{not json")
    with pytest.raises(ValidationInputError, match=r"store\.json"):
        validate(ingest, tmp_path / "out", Params())


def test_crash_midway_keeps_previous_output(
    tmp_path: Path, valid_run: tuple[Path, validation.ValidationSummary], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = valid_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*args: object, **kwargs: object) -> None:
        (staging,) = tmp_path.glob(".out.tmp-*")
        assert (staging / "data_docs" / "index.html").is_file()  # GX has already written its part
        raise RuntimeError("disk full while summarising")

    # After GX has run and rendered Data Docs into the staging folder, before summary.json.
    monkeypatch.setattr(validation_stage, "summary_statistics", boom)
    broken = write_ingest(tmp_path / "ingest", broken_manifest(), **BROKEN_STORE)
    with pytest.raises(RuntimeError, match="disk full"):
        validate(broken, out, Params())

    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest", "out"]


def test_derived_tables_zero_fill_missing_classes() -> None:
    manifest = make_manifest()
    high = (manifest["session"] == 3) & (manifest["valence_class"] == 2)
    manifest.loc[high, "valence"] = 3.0
    manifest.loc[high, "valence_class"] = 1
    tables = validation.build_tables(manifest, {"sample_rate": SAMPLE_RATE, "total_samples": 1}, 2, Params())
    counts = tables["class_counts"]
    assert len(counts) == 5 * 3 * 3
    row = counts[
        (counts["fold"] == 3) & (counts["dimension"] == "valence") & (counts["class_name"] == "high")
    ]
    assert row["count"].tolist() == [0]
    assert tables["sessions"]["n_speakers"].tolist() == [2] * 5
    assert tables["utterances"]["overlap_samples"].eq(0).all()


def test_checks_on_a_missing_column_are_skipped_not_errors() -> None:
    """GX raises inside an expectation on an absent column; the schema checks already report it."""
    manifest = make_manifest().drop(columns=["rms_dbfs"])
    tables = validation.build_tables(manifest, {"sample_rate": SAMPLE_RATE, "total_samples": 1}, 2, Params())
    checks, skipped = validation.build_checks(tables, Params())
    assert skipped == ["not silent"]
    assert all(getattr(c.expectation, "column", None) != "rms_dbfs" for c in checks)


def test_rating_grid() -> None:
    assert validation.rating_grid(0.5) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert validation.rating_grid(1 / 3)[:4] == [1.0, 1.333333333, 1.666666667, 2.0]
