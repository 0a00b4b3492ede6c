"""The IEMOCAP parsing traps from the reference notes, one test each."""

from __future__ import annotations

import pytest

from sermtl.data.corpus import (
    classify_files,
    is_hidden,
    parse_emo_evaluation,
    parse_utterance_id,
    to_class,
    wav_path_for,
)
from sermtl.data.sources import CorpusError, SourceFile
from sermtl.params import Thresholds

FILE = "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
TABLE = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def test_speaker_is_last_segment_not_mocap_token():  # trap 1
    uid = parse_utterance_id("Ses01F_impro01_M013")
    assert uid.speaker == "Ses01_M"
    assert uid.speaker_letter == "M"
    assert parse_utterance_id("Ses02M_script01_1_F000").speaker == "Ses02_F"


@pytest.mark.parametrize(
    ("uid", "dialog", "gender", "improvised"),
    [
        ("Ses03M_impro05a_F001", "Ses03M_impro05a", "F", True),
        ("Ses03M_impro08b_M012", "Ses03M_impro08b", "M", True),
        ("Ses05M_script01_1b_F003", "Ses05M_script01_1b", "F", False),
        ("Ses05M_script01_1_M020", "Ses05M_script01_1", "M", False),
    ],
)
def test_suffixed_dialogs_parse_without_fixed_offsets(uid, dialog, gender, improvised):  # trap 2
    parsed = parse_utterance_id(uid)
    assert (parsed.dialog, parsed.speaker_letter, parsed.improvised, parsed.session) == (
        dialog,
        gender,
        improvised,
        int(uid[3:5]),
    )


def test_wav_path_is_exact_dialog_folder_no_prefix_collision():  # trap 3
    a = wav_path_for(parse_utterance_id("Ses05M_script01_1_F000"))
    b = wav_path_for(parse_utterance_id("Ses05M_script01_1b_F000"))
    assert a == "Session5/sentences/wav/Ses05M_script01_1/Ses05M_script01_1_F000.wav"
    assert b == "Session5/sentences/wav/Ses05M_script01_1b/Ses05M_script01_1b_F000.wav"


def test_appledouble_and_hidden_files_are_not_audio():  # trap 4
    files = [
        SourceFile("Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav", 10, "1"),
        SourceFile("Session1/sentences/wav/Ses01F_impro01/._Ses01F_impro01_F000.wav", 10, "1"),
        SourceFile("Session1/dialog/EmoEvaluation/._Ses01F_impro01.txt", 10, "1"),
        SourceFile("Session1/.DS_Store", 10, "1"),
        SourceFile("Session1/dialog/EmoEvaluation/Attribute/Ses01F_impro01_atr.txt", 10, "1"),
    ]
    layout = classify_files(files)
    assert list(layout.wav_files) == ["Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"]
    assert layout.annotation_files == {}  # Attribute/ is another format and ignored
    assert len(layout.hidden_files) == 3
    assert is_hidden("a/._b.wav") and not is_hidden("a/b.wav")


def test_header_bracket_order_is_valence_arousal_dominance():  # trap 5
    text = TABLE + "[6.2901 - 8.2357]\tSes01F_impro01_F000\tang\t[1.5000, 4.5000, 3.0000]\n"
    (annotation,) = parse_emo_evaluation(text, FILE)
    assert (annotation.valence, annotation.arousal, annotation.dominance) == (1.5, 4.5, 3.0)


def test_xxx_is_kept_as_xxx():  # trap 7 (no relabelling)
    text = TABLE + "[6.2901 - 8.2357]\tSes01F_impro01_F000\txxx\t[2.5000, 2.5000, 2.5000]\n"
    assert parse_emo_evaluation(text, FILE)[0].category == "xxx"


def test_parsing_uses_tabs_and_pattern_not_columns():  # trap 8
    text = (
        TABLE
        + "[106.1234 - 1108.5000]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        + "C-E2:\tNeutral state;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n"
        + "[1.1 - 2.25]\tSes01F_impro01_M000\thap\t[4, 3.5, 3]\r\n"
        + "A-F1:\tval 3; act 2; dom 2;\t(a comment; with; semicolons)\n"
    )
    first, second = parse_emo_evaluation(text, FILE)
    assert (first.start_s, first.end_s) == (106.1234, 1108.5)
    assert (second.uid.utterance_id, second.valence, second.start_s) == ("Ses01F_impro01_M000", 4.0, 1.1)


@pytest.mark.parametrize(
    "bad_line",
    [
        "[6.2901 - 8.2357] Ses01F_impro01_F000 neu [2.5000, 2.5000, 2.5000]",  # spaces, not tabs
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000]",  # two values
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, x, 2.5000]",  # not a number
        "[6.2901 - 8.2357]\tSes01F_impro01\tneu\t[2.5000, 2.5000, 2.5000]",  # not an utterance id
        "[6.2901 - 8.2357]\tSes01F_impro02_F000\tneu\t[2.5000, 2.5000, 2.5000]",  # other dialog
        "some stray text",
    ],
)
def test_malformed_line_error_names_file_and_line(bad_line):
    text = (
        TABLE + "[1.0000 - 2.0000]\tSes01F_impro01_F001\tneu\t[2.5000, 2.5000, 2.5000]\n\n" + bad_line + "\n"
    )
    with pytest.raises(CorpusError, match=rf"^{FILE}:5: "):
        parse_emo_evaluation(text, FILE)


def test_nan_rating_parses_for_counted_drop():
    text = TABLE + "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[nan, 2.5000, 2.5000]\n"
    assert parse_emo_evaluation(text, FILE)[0].valence != parse_emo_evaluation(text, FILE)[0].valence


def test_class_thresholds_low_le_2_high_ge_4():
    thresholds = Thresholds(low_max=2.0, high_min=4.0)
    assert [to_class(v, thresholds) for v in (1.0, 2.0, 2.5, 3.5, 4.0, 5.0)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "key", ["../Session1/x.wav", "/etc/passwd", "Session1/../../x.wav", "Session1//x.wav"]
)
def test_s3_keys_escaping_the_prefix_are_refused(key):
    from sermtl.data.sources import _check_relative

    with pytest.raises(CorpusError, match="escapes or is not normalised"):
        _check_relative(key, "s3://bucket/corpus")
