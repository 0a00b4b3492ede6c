"""Ingestion end to end on hand-built corpora: every bad input gets a clear error or a counted drop."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from corpus_builder import balanced_utts, build_corpus

from sermtl.data.audio import AudioStore
from sermtl.data.ingest import ingest
from sermtl.data.sources import CorpusError
from sermtl.params import Params
from sermtl.schema import MANIFEST_COLUMNS, MANIFEST_FILE, REPORT_FILE

LENIENT = Params(data=dataclasses.replace(Params().data, max_drop_fraction=1.0))
WAV = "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_{}.wav"
ANNOTATION = "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return build_corpus(tmp_path / "IEMOCAP_full_release", balanced_utts())


def run(corpus: Path, tmp_path: Path, params: Params = LENIENT):
    return ingest(str(corpus), tmp_path / "out", params, progress=False)


def test_clean_corpus_manifest_and_store(corpus, tmp_path):
    report = run(corpus, tmp_path)
    assert (report.annotated, report.kept, report.dropped) == (30, 30, 0)
    manifest = pd.read_parquet(tmp_path / "out" / MANIFEST_FILE)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest.groupby("session")["speaker"].nunique().tolist() == [2] * 5
    store = AudioStore(tmp_path / "out")
    source, rate = sf.read(corpus / WAV.format("F001"), dtype="float32")
    assert rate == 16000
    np.testing.assert_array_equal(store.waveform("Ses01F_impro01_F001"), source)  # 16-bit source is exact
    assert isinstance(store.samples, np.memmap)
    assert report.kept_by_session == {str(s): 6 for s in range(1, 6)}


def test_rerun_is_idempotent_and_force_rewrites_identically(corpus, tmp_path):
    run(corpus, tmp_path)
    first = (tmp_path / "out" / "audio.pcm16").read_bytes(), (tmp_path / "out" / MANIFEST_FILE).read_bytes()
    assert run(corpus, tmp_path).up_to_date
    forced = ingest(str(corpus), tmp_path / "out", LENIENT, force=True, progress=False)
    assert not forced.up_to_date
    again = (tmp_path / "out" / "audio.pcm16").read_bytes(), (tmp_path / "out" / MANIFEST_FILE).read_bytes()
    assert first == again


def test_params_change_invalidates_previous_output(corpus, tmp_path):
    run(corpus, tmp_path)
    other = Params(data=dataclasses.replace(LENIENT.data, sample_rate=8000))
    report = run(corpus, tmp_path, other)
    assert not report.up_to_date
    assert AudioStore(tmp_path / "out").sample_rate == 8000


def test_truncated_and_corrupt_wavs_are_counted_drops(corpus, tmp_path):
    full = (corpus / WAV.format("F000")).read_bytes()
    (corpus / WAV.format("F000")).write_bytes(full[: len(full) // 2])
    (corpus / WAV.format("F001")).write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    report = run(corpus, tmp_path)
    assert report.drops_by_reason == {"corrupt_wav": 1, "truncated_wav": 1}
    assert report.kept == 28
    details = {d["utterance_id"]: d for d in report.drops}
    assert details["Ses01F_impro01_F000"]["where"] == f"{ANNOTATION}:3"
    assert "data chunk declares" in details["Ses01F_impro01_F000"]["detail"]


def test_stereo_wav_is_dropped_as_not_mono(tmp_path):
    utts = balanced_utts()
    utts[0] = dataclasses.replace(utts[0], channels=2)
    report = run(build_corpus(tmp_path / "c", utts), tmp_path)
    assert report.drops_by_reason == {"not_mono": 1}


def test_header_without_wav_and_wav_without_header(corpus, tmp_path):
    (corpus / WAV.format("F002")).unlink()
    stray = corpus / WAV.format("F099")
    sf.write(stray, np.zeros(800, dtype=np.float32) + 0.1, 16000, subtype="PCM_16")
    report = run(corpus, tmp_path)
    assert report.drops_by_reason == {"missing_wav": 1}
    assert report.unannotated_wavs == [WAV.format("F099")]
    assert "Ses01F_impro01_F099" not in set(pd.read_parquet(tmp_path / "out" / MANIFEST_FILE)["utterance_id"])


@pytest.mark.parametrize(
    ("value", "problem"), [("nan", "is nan"), ("5.5000", "outside 1..5"), ("0.0000", "outside")]
)
def test_out_of_range_or_nan_ratings_are_counted_drops(corpus, tmp_path, value, problem):
    path = corpus / ANNOTATION
    path.write_text(path.read_text().replace("[1.5000, 1.5000, 1.5000]", f"[1.5000, {value}, 1.5000]", 1))
    report = run(corpus, tmp_path)
    assert report.drops_by_reason == {"invalid_rating": 1}
    assert problem in report.drops[0]["detail"] and report.drops[0]["detail"].startswith("arousal")


def test_malformed_header_fails_naming_file_and_line_and_keeps_previous_output(corpus, tmp_path):
    run(corpus, tmp_path)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    path = corpus / ANNOTATION
    lines = path.read_text().split("\n")
    lines[8] = lines[8].replace("\t", "    ", 1)  # second utterance header: spaces instead of a tab
    path.write_text("\n".join(lines))
    with pytest.raises(CorpusError, match=f"^{ANNOTATION}:9: malformed utterance header line"):
        run(corpus, tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["kept"] == 30
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_duplicate_ids_fail_naming_both_places(tmp_path):
    utts = balanced_utts()
    corpus = build_corpus(tmp_path / "c", utts)
    text = (corpus / ANNOTATION).read_text()
    (corpus / ANNOTATION).write_text(text + text.split("\n\n", 1)[1])
    with pytest.raises(CorpusError, match=r"duplicate utterance id Ses01F_impro01_F000 \(first at .*:3\)"):
        run(corpus, tmp_path)
    assert not (tmp_path / "out").exists()


def test_symlink_escaping_root_is_refused(corpus, tmp_path):
    outside = tmp_path / "secret.wav"
    outside.write_bytes((corpus / WAV.format("F000")).read_bytes())
    (corpus / WAV.format("F000")).unlink()
    os.symlink(outside, corpus / WAV.format("F000"))
    with pytest.raises(CorpusError, match="outside the corpus root"):
        run(corpus, tmp_path)
    assert not (tmp_path / "out").exists()


def test_symlinked_folder_escaping_root_is_refused(corpus, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", corpus / "Session1" / "linked")
    with pytest.raises(CorpusError, match="Session1/linked: symlinked folder resolves to"):
        run(corpus, tmp_path)


def test_symlink_inside_root_is_followed(corpus, tmp_path):
    target = corpus / WAV.format("F000")
    moved = corpus / "Session1" / "store.wav"
    target.rename(moved)
    os.symlink(moved, target)
    assert run(corpus, tmp_path).kept == 30


def test_appledouble_files_are_skipped_and_counted(corpus, tmp_path):
    (corpus / WAV.format("._F000").replace("Ses01F_impro01_._F000", "._Ses01F_impro01_F000")).write_bytes(
        b"\x00\x05\x16\x07AppleDouble"
    )
    (corpus / "Session1/dialog/EmoEvaluation/._Ses01F_impro01.txt").write_bytes(b"\x00\x05\x16\x07")
    report = run(corpus, tmp_path)
    assert (report.kept, report.dropped, len(report.hidden_files)) == (30, 0, 2)
    assert report.unannotated_wavs == []


@pytest.mark.parametrize("how", ["empty_folder", "missing"])
def test_empty_or_missing_session_is_an_error_naming_it(corpus, tmp_path, how):
    import shutil

    shutil.rmtree(corpus / "Session3")
    if how == "empty_folder":
        (corpus / "Session3" / "dialog" / "EmoEvaluation").mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"^Session3: no annotated utterances"):
        run(corpus, tmp_path)


@pytest.mark.parametrize("rate", [22050, 44100])
def test_other_sample_rates_are_resampled_and_recorded(tmp_path, rate):
    utts = balanced_utts()
    utts[0] = dataclasses.replace(utts[0], sample_rate=rate, seconds=0.5)
    report = run(build_corpus(tmp_path / "c", utts), tmp_path)
    assert report.dropped == 0 and report.resampled_by_rate == {str(rate): 1}
    store = AudioStore(tmp_path / "out")
    row = store.manifest.set_index("utterance_id").loc[utts[0].uid]
    assert row["source_sample_rate"] == rate and row["num_samples"] == 8000
    assert row["duration_s"] == pytest.approx(0.5)
    spectrum = np.abs(np.fft.rfft(store.waveform(utts[0].uid)))
    assert np.argmax(spectrum) * 16000 / 8000 == pytest.approx(180, abs=3)  # the 180 Hz tone survives


def test_too_many_drops_fail_without_writing(corpus, tmp_path):
    for letter in ("F000", "F001", "F002"):
        (corpus / WAV.format(letter)).unlink()
    strict = Params(data=dataclasses.replace(Params().data, max_drop_fraction=0.05))
    with pytest.raises(CorpusError, match=r"dropped 3 of 30 annotated utterances .*missing_wav"):
        run(corpus, tmp_path, strict)
    assert not (tmp_path / "out").exists()


def test_sessions_outside_params_are_excluded_and_reported(corpus, tmp_path):
    params = Params(data=dataclasses.replace(LENIENT.data, sessions=[1, 2, 3, 4]))
    report = run(corpus, tmp_path, params)
    assert report.excluded_sessions == [5] and report.kept == 24


def test_cli_reports_clear_error_and_exit_code(corpus, tmp_path):
    from typer.testing import CliRunner

    from sermtl.cli import app

    path = corpus / ANNOTATION
    path.write_text(path.read_text().replace("]\tSes01F_impro01_F000\t", "] Ses01F_impro01_F000\t"))
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  max_drop_fraction: 1.0\n")
    result = CliRunner().invoke(
        app, ["ingest", "--source", str(corpus), "--out", str(tmp_path / "o"), "--params", str(params)]
    )
    assert result.exit_code == 2
    assert f"{ANNOTATION}:3: malformed utterance header line" in result.output


def test_float_wav_with_nan_is_kept_with_its_nonfinite_count(corpus, tmp_path):
    samples = np.full(8000, 0.25, dtype=np.float32)
    samples[100:110] = np.nan
    sf.write(corpus / WAV.format("F000"), samples, 16000, subtype="FLOAT")
    run(corpus, tmp_path)
    store = AudioStore(tmp_path / "out")
    row = store.manifest.set_index("utterance_id").loc["Ses01F_impro01_F000"]
    assert row["nonfinite_count"] == 10  # validation's nonfinite expectation reports it
    waveform = store.waveform("Ses01F_impro01_F000")
    assert np.isfinite(waveform).all() and waveform[0] == 0.25 and waveform[105] == 0.0


def test_pcm16_stats_match_float_computation(corpus, tmp_path):
    from sermtl.data.audio import audio_stats, decode_wav

    decoded = decode_wav((corpus / WAV.format("F000")).read_bytes())
    assert decoded.samples.dtype == np.int16
    fast, reference = audio_stats(decoded.samples), audio_stats(decoded.as_float())
    assert fast.rms_dbfs == pytest.approx(reference.rms_dbfs, abs=1e-3)
    assert (fast.peak, fast.clipped_fraction) == (reference.peak, reference.clipped_fraction)
