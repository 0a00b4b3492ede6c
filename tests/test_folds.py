"""Leave-one-session-out folds are speaker-independent (trap 6: random splits are not)."""

from __future__ import annotations

import pandas as pd
import pytest

from sermtl.data.folds import leave_one_session_out


def manifest(per_speaker: int = 4) -> pd.DataFrame:
    rows = [
        {"utterance_id": f"Ses0{s}F_impro01_{g}{i:03d}", "session": s, "speaker": f"Ses0{s}_{g}"}
        for s in range(1, 6)
        for g in "FM"
        for i in range(per_speaker)
    ]
    return pd.DataFrame(rows)


def test_no_speaker_crosses_train_validation_test():
    frame = manifest()
    speaker = frame.set_index("utterance_id")["speaker"]
    folds = leave_one_session_out(frame, [1, 2, 3, 4, 5])
    assert [f.test_session for f in folds] == [1, 2, 3, 4, 5]
    for fold in folds:
        train, validation, test = (
            set(speaker[ids]) for ids in (fold.train_ids, fold.validation_ids, fold.test_ids)
        )
        assert not (train & validation) and not (train & test) and not (validation & test)
        assert validation == {fold.validation_speaker}
        assert not fold.validation_speaker.startswith(
            f"Ses0{fold.test_session}"
        )  # never from the test session
        assert len(fold.train_ids) + len(fold.validation_ids) + len(fold.test_ids) == len(frame)
    assert {f.validation_speaker[-1] for f in folds} == {"F", "M"}  # both genders serve as validation


def test_speaker_in_two_sessions_is_refused():
    frame = manifest()
    frame.loc[0, "session"] = 2  # Ses01_F now also appears in session 2
    with pytest.raises(ValueError, match="Ses01_F occur in more than one session"):
        leave_one_session_out(frame, [1, 2, 3, 4, 5])


def test_sessions_outside_data_sessions_are_in_no_split():
    frame = manifest()  # sessions 1-5 in the manifest, only 1-4 studied
    folds = leave_one_session_out(frame, [1, 2, 3, 4])
    assert [f.test_session for f in folds] == [1, 2, 3, 4]
    session = frame.set_index("utterance_id")["session"]
    for fold in folds:
        used = fold.train_ids + fold.validation_ids + fold.test_ids
        assert 5 not in set(session[used])
        assert len(used) == len(set(used)) == (frame["session"] != 5).sum()
        assert set(session[fold.train_ids]) == {1, 2, 3, 4} - {fold.test_session}
