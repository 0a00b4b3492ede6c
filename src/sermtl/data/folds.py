"""Speaker-independent splits: leave-one-session-out, with validation speakers from training sessions only."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Fold:
    index: int
    test_session: int
    validation_speaker: str
    train_ids: list[str]
    validation_ids: list[str]
    test_ids: list[str]


def leave_one_session_out(manifest: pd.DataFrame, sessions: list[int]) -> list[Fold]:
    """One fold per session; the early-stopping speaker is one speaker of the next session round-robin.

    Only `sessions` (data.sessions) take part: utterances of any other session in the manifest are in no
    split of any fold (neither trained on nor tested). No speaker ever appears in two of
    train/validation/test, because IEMOCAP speakers never cross sessions (checked here, since a
    mislabelled corpus would silently leak otherwise).
    """
    sessions_of_speaker = manifest.groupby("speaker")["session"].nunique()
    if (sessions_of_speaker > 1).any():
        leaking = ", ".join(sessions_of_speaker[sessions_of_speaker > 1].index)
        raise ValueError(
            f"speaker(s) {leaking} occur in more than one session: folds would not be speaker-independent"
        )
    folds = []
    ordered = sorted(sessions)
    in_study = manifest["session"].isin(ordered)
    for index, test_session in enumerate(ordered):
        validation_session = ordered[(index + 1) % len(ordered)]
        speakers = sorted(manifest.loc[manifest["session"] == validation_session, "speaker"].unique())
        if not speakers:
            raise ValueError(f"session {validation_session} has no utterances")
        # Alternate the gender of the validation speaker across folds.
        validation_speaker = speakers[index % len(speakers)]
        test = manifest["session"] == test_session
        validation = manifest["speaker"] == validation_speaker
        train = in_study & ~test & ~validation
        folds.append(
            Fold(
                index=index,
                test_session=test_session,
                validation_speaker=validation_speaker,
                train_ids=manifest.loc[train, "utterance_id"].tolist(),
                validation_ids=manifest.loc[validation, "utterance_id"].tolist(),
                test_ids=manifest.loc[test, "utterance_id"].tolist(),
            )
        )
    return folds
