"""Every utterance accounted for, and a damaged audio store caught where it is opened.

Empty or unreadable annotation files count as drops (naming the file) against data.max_drop_fraction;
a byte-order mark is accepted; validation fails when too many wavs have no annotation; the store's
size and checksum are checked by validate and train; an unreachable S3 endpoint fails fast.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from corpus_builder import Utt, build_corpus
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.data.audio import AudioStore, CorruptStoreError
from sermtl.data.ingest import ingest
from sermtl.data.sources import CorpusError, S3Source
from sermtl.data.validate import validate
from sermtl.errors import EXIT_UNREACHABLE, ServiceUnreachable
from sermtl.params import Params
from sermtl.schema import AUDIO_FILE, REPORT_FILE, STORE_META_FILE

LEVELS = (1.5, 3.0, 4.5)


def two_dialog_utts(per_speaker: int = 3) -> list[Utt]:
    """5 sessions x 2 dialogs x 2 speakers: emptying one annotation file leaves its session non-empty."""
    return [
        Utt(f"Ses0{session}F_impro0{dialog}_{speaker}{i:03d}", vad=(LEVELS[i % 3],) * 3)
        for session in range(1, 6)
        for dialog in (1, 2)
        for speaker in "FM"
        for i in range(per_speaker)
    ]


def annotation(root: Path, session: int, dialog: int) -> Path:
    return root / f"Session{session}/dialog/EmoEvaluation/Ses0{session}F_impro0{dialog}.txt"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return build_corpus(tmp_path / "IEMOCAP_full_release", two_dialog_utts())


def lenient(fraction: float = 1.0) -> Params:
    return Params(data=dataclasses.replace(Params().data, max_drop_fraction=fraction))


def test_empty_annotation_files_are_counted_drops_naming_the_file(corpus, tmp_path):
    for session in (1, 2, 3, 4, 5):
        annotation(corpus, session, 2).write_text("")  # half of the files, 0 bytes
    report = ingest(str(corpus), tmp_path / "out", lenient(), progress=False)
    assert (report.annotated, report.kept, report.unlabelled) == (30, 30, 30)
    assert report.dropped == 30 and report.drops_by_reason == {"empty_annotation": 30}
    assert report.unannotated_wavs == []  # lost utterances, not unannotated extras
    assert report.wavs_found == 60
    example = report.drops[0]
    assert example["where"] == "Session1/dialog/EmoEvaluation/Ses01F_impro02.txt"
    assert example["utterance_id"].startswith("Ses01F_impro02_") and "empty file" in example["detail"]
    assert "dropped 30" in report.summary()


def test_empty_annotation_files_count_against_max_drop_fraction(corpus, tmp_path):
    annotation(corpus, 3, 2).write_text("\n\n")  # blank lines only: as empty
    with pytest.raises(
        CorpusError, match=r"dropped 6 of 60 utterances \(54 annotated, 6 in dialogs .*empty_annotation"
    ) as caught:
        ingest(str(corpus), tmp_path / "out", lenient(0.05), progress=False)
    assert "Session3/dialog/EmoEvaluation/Ses03F_impro02.txt" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_header_only_annotation_file_is_empty(corpus, tmp_path):
    annotation(corpus, 2, 1).write_text("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n")
    report = ingest(str(corpus), tmp_path / "out", lenient(), progress=False)
    assert report.drops_by_reason == {"empty_annotation": 6}
    assert "no utterance header line" in report.drops[0]["detail"]


def test_unreadable_annotation_file_is_a_counted_drop(corpus, tmp_path):
    annotation(corpus, 4, 1).write_bytes(b"\xff\xfe[\x00b\x00a\x00d\x00")  # UTF-16, not UTF-8
    report = ingest(str(corpus), tmp_path / "out", lenient(), progress=False)
    assert report.drops_by_reason == {"unreadable_annotation": 6}
    assert "not UTF-8" in report.drops[0]["detail"] and report.kept == 54


def test_byte_order_mark_is_accepted(corpus, tmp_path):
    path = annotation(corpus, 1, 1)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    report = ingest(str(corpus), tmp_path / "out", lenient(0.0), progress=False)
    assert (report.kept, report.dropped) == (60, 0)


def test_validation_fails_when_too_many_wavs_lack_an_annotation(corpus, tmp_path):
    # Annotation files deleted (not emptied): their wavs are "unannotated", which ingest tolerates.
    for session in (1, 2):
        annotation(corpus, session, 2).unlink()
    report = ingest(str(corpus), tmp_path / "ingest", lenient(), progress=False)
    assert len(report.unannotated_wavs) == 12 and report.wavs_found == 60
    summary = validate(tmp_path / "ingest", tmp_path / "validation", Params())
    assert not summary.success
    failed = {f.name for f in summary.failures}
    assert "at most 2% of wavs without annotation" in failed
    assert "Ses01F_impro02" in summary.describe_failures()


def test_validation_passes_within_the_unannotated_tolerance(corpus, tmp_path):
    ingest(str(corpus), tmp_path / "ingest", lenient(), progress=False)
    summary = validate(tmp_path / "ingest", tmp_path / "validation", Params())
    assert "at most 2% of wavs without annotation" not in {f.name for f in summary.failures}


# --------------------------------------------------------------------------- the audio store


@pytest.fixture
def store(corpus, tmp_path) -> Path:
    ingest(str(corpus), tmp_path / "ingest", lenient(), progress=False)
    return tmp_path / "ingest"


def test_store_records_a_checksum_that_verifies(store):
    meta = json.loads((store / STORE_META_FILE).read_text())
    assert len(meta["sha256"]) == 64
    AudioStore(store).verify_checksum()


def test_truncated_store_fails_on_open_naming_the_file(store):
    audio = store / AUDIO_FILE
    audio.write_bytes(audio.read_bytes()[: audio.stat().st_size // 2])
    with pytest.raises(
        CorruptStoreError, match=r"audio\.pcm16: \d+ bytes, but store\.json records"
    ) as caught:
        AudioStore(store)
    assert str(audio) in str(caught.value) and "sermtl ingest --force" in str(caught.value)


def zero_second_half(store: Path) -> None:
    audio = store / AUDIO_FILE
    data = bytearray(audio.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    audio.write_bytes(bytes(data))


def test_same_size_corruption_fails_the_checksum(store):
    zero_second_half(store)
    opened = AudioStore(store)  # size is right: opening alone cannot tell
    with pytest.raises(CorruptStoreError, match="contents differ from the checksum"):
        opened.verify_checksum()


def test_validate_catches_same_size_corruption(store, tmp_path):
    zero_second_half(store)
    summary = validate(store, tmp_path / "validation", Params())
    assert "audio checksum matches store.json" in {f.name for f in summary.failures}


def test_store_without_checksum_asks_for_reingestion(store):
    meta_path = store / STORE_META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match=r"no audio checksum .*sermtl ingest --force"):
        AudioStore(store).verify_checksum()


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_train_cli_refuses_a_damaged_store_in_one_line(store, tmp_path, damage):
    if damage == "truncate":
        audio = store / AUDIO_FILE
        audio.write_bytes(audio.read_bytes()[:1000])
    else:
        zero_second_half(store)
    params = tmp_path / "params.yaml"
    params.write_text(Path("params.yaml").read_text())
    result = CliRunner().invoke(
        app,
        [
            *("train", "--system", "mtl_attention", "--fold", "0", "--store", str(store)),
            *("--out", str(tmp_path / "run"), "--params", str(params)),
        ],
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "sermtl ingest --force" in result.output
    assert str(store / AUDIO_FILE) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_report_counts_survive_a_rerun(store, corpus, tmp_path):
    first = json.loads((store / REPORT_FILE).read_text())
    again = ingest(str(corpus), store, lenient(), progress=False)
    assert again.up_to_date and again.wavs_found == first["wavs_found"] == 60
    assert np.isclose(again.audio_hours, first["audio_hours"])


# --------------------------------------------------------------------------- S3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_s3_endpoint_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-access-key-id-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-0001")
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=f"could not reach S3 at {endpoint}"):
        S3Source("s3://bucket/IEMOCAP_full_release", endpoint).list_files()
    assert time.monotonic() - started < 15


def test_ingest_cli_exit_code_says_unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-access-key-id-0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-0001")
    endpoint = f"http://user:pw-not-to-show@127.0.0.1:{free_port()}"
    result = CliRunner().invoke(
        app,
        [
            *("ingest", "--source", "s3://bucket/IEMOCAP_full_release", "--out", str(tmp_path / "o")),
            *("--endpoint-url", endpoint),
        ],
    )
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert "could not reach S3 at http://127.0.0.1:" in result.output
    assert "pw-not-to-show" not in result.output and "Traceback" not in result.output
