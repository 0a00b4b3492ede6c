"""The labels of the generated corpus: the latent emotion of each turn and what the simulated raters,
the actors themselves and the transcripts make of it (every session holding every class)."""

from __future__ import annotations

import math
import zlib

import numpy as np

from sermtl.data.corpus import to_class
from sermtl.data.synth_model import (
    DIALOG_OFFSET_SD,
    EXTERNAL_RATERS,
    LATENT_MEAN,
    LATENT_SD,
    RATER_BIAS_SD,
    RATER_NOISE_SD,
    SELF_BIAS,
    SELF_NOISE_SD,
    SESSIONS,
    SPEAKER_OFFSET_SD,
    TURN_AR,
    Dialog,
    Utt,
)
from sermtl.params import Thresholds

# Default 3-class bins (params.yaml data.thresholds); every session is made to hold every class.
DEFAULT_THRESHOLDS = Thresholds()  # class coverage is guaranteed for these (params.yaml defaults)
CATEGORY_NAMES: dict[str, str] = {
    "neu": "Neutral state",
    "hap": "Happiness",
    "exc": "Excited",
    "sad": "Sadness",
    "ang": "Anger",
    "fru": "Frustration",
    "sur": "Surprise",
    "fea": "Fear",
    "dis": "Disgust",
    "oth": "Other",
}
# Categories raters confuse with each other; used for disagreeing votes.
CONFUSIONS: dict[str, tuple[str, ...]] = {
    "neu": ("fru", "sad", "hap"),
    "hap": ("exc", "neu", "sur"),
    "exc": ("hap", "sur", "neu"),
    "sad": ("neu", "fru", "fea"),
    "ang": ("fru", "dis", "exc"),
    "fru": ("ang", "neu", "sad"),
    "sur": ("exc", "hap", "fea"),
    "fea": ("sad", "sur", "fru"),
    "dis": ("ang", "fru", "neu"),
    "oth": ("neu", "fru", "hap"),
}
XXX_PROBABILITY = 0.22
WORDS: tuple[str, ...] = (
    "I", "you", "we", "they", "it", "that", "this", "what", "why", "how", "know", "think", "really",
    "just", "okay", "yeah", "no", "well", "so", "but", "and", "the", "a", "to", "going", "want",
    "never", "always", "again", "here", "there", "now", "can't", "don't", "right", "sure", "maybe",
    "about", "time", "money", "job", "home", "tonight", "tomorrow", "mean", "said", "told", "leave",
    "wait", "look", "please", "sorry", "great", "fine", "believe", "anything", "everything", "nothing",
)  # fmt: skip


def next_state(state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A speaker's next turn: emotions persist (TURN_AR), the stationary distribution stays N(0, I)."""
    return TURN_AR * state + math.sqrt(1 - TURN_AR**2) * rng.standard_normal(3)


def latent_values(
    speaker_offset: tuple[float, float, float] | np.ndarray,
    dialog_offset: np.ndarray,
    state: np.ndarray,
    chol: np.ndarray,
) -> np.ndarray:
    """A turn's latent (valence, arousal, dominance): speaker, dialog and turn parts, clipped to 1..5."""
    latent = LATENT_MEAN + np.array(speaker_offset) + dialog_offset
    latent += LATENT_SD * (chol @ state)
    return np.clip(latent, 1.0, 5.0)


def external_ratings(latent: np.ndarray, bias: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = latent[None, :] + bias + rng.normal(0.0, RATER_NOISE_SD, size=(2, 3))
    return np.clip(np.rint(noisy), 1, 5).astype(np.int64)


def _class_of(value: float) -> int:
    return to_class(value, DEFAULT_THRESHOLDS)


def cover_classes(dialogs: list[Dialog], rng: np.random.Generator) -> None:
    """Move a few utterances (latent and ratings together) so the session holds every class of every
    dimension: leave-one-session-out folds then always have every class in the test session."""
    utts = [u for d in dialogs for u in d.utts]
    targets = {0: (1.6, (1, 2)), 1: (3.0, (2, 3, 4)), 2: (4.4, (4, 5))}
    for dim in range(3):
        for wanted in range(3):
            classes = [_class_of(u.header_values()[dim]) for u in utts]
            if wanted in classes:
                continue
            counts = np.bincount(classes, minlength=3)
            movable = [i for i, c in enumerate(classes) if counts[c] >= 2]
            utt = utts[int(rng.choice(movable))]
            latent_value, choices = targets[wanted]
            utt.latent[dim] = latent_value + rng.uniform(-0.3, 0.3)
            first = int(rng.choice(choices))
            second = 3 if wanted == 1 else int(rng.choice(choices))
            utt.ext[:, dim] = (first, second)


def finish_labels(utt: Utt, rng: np.random.Generator) -> None:
    """The self-rating, the category and the categorical votes (raters' and the actor's) of `utt`."""
    noisy = utt.latent + SELF_BIAS + rng.normal(0.0, SELF_NOISE_SD, size=3)
    utt.self_rating = np.clip(np.rint(noisy), 1, 5).astype(np.int64) if rng.random() < 0.85 else None
    true = _true_category(utt.latent, rng)
    if rng.random() < XXX_PROBABILITY:
        utt.category = "xxx"
        alternatives = list(CONFUSIONS[true])
        rng.shuffle(alternatives)
        utt.votes = [true, *alternatives[:2]]
        rng.shuffle(utt.votes)
        utt.votes = [CATEGORY_NAMES[c] + ";" for c in utt.votes]
    else:
        utt.category = true
        agree = 3 if rng.random() < 0.5 else 2
        votes = [true] * agree + [str(rng.choice(CONFUSIONS[true])) for _ in range(3 - agree)]
        rng.shuffle(votes)
        texts = []
        for vote in votes:
            text = CATEGORY_NAMES[vote] + ";"
            if vote == true and rng.random() < 0.08:
                text += " " + CATEGORY_NAMES[str(rng.choice(CONFUSIONS[true]))] + ";"
            texts.append(text)
        utt.votes = texts
    own = true if rng.random() < 0.7 else str(rng.choice(CONFUSIONS[true]))
    utt.self_vote = CATEGORY_NAMES[own] + ";"


def _true_category(latent: np.ndarray, rng: np.random.Generator) -> str:
    v, a, d = latent
    u = rng.random()
    if a >= 3.2 and v <= 2.8:
        if u < 0.03:
            return "dis"
        if d < 2.6 and u < 0.15:
            return "fea"
        return "ang" if d >= 3.2 or a >= 3.9 else "fru"
    if v <= 2.5 and a <= 2.8:
        return "sad" if u < 0.8 else "fru"
    if v <= 2.8:
        return "fru" if u < 0.7 else "neu"
    if v >= 3.5:
        if a >= 3.8 and u < 0.12:
            return "sur"
        return "exc" if a >= 3.2 else "hap"
    if u < 0.01:
        return "oth"
    return "neu"


def words(dialog: Dialog, turn: int, seconds: float, rng: np.random.Generator) -> str:
    """Transcript text; scripted dialogs repeat the same text across sessions, as in IEMOCAP."""
    n = max(1, round(seconds * rng.uniform(1.8, 2.8)))
    if dialog.improvised:
        source = rng
    else:
        script = dialog.name.split("_", 1)[1].rstrip("b")
        source = np.random.default_rng(zlib.crc32(f"{script}/{turn}".encode()))
    text = " ".join(WORDS[int(i)] for i in source.integers(0, len(WORDS), size=n))
    return text[0].upper() + text[1:] + ("?" if source.random() < 0.2 else ".")


def independent_labels(dialogs: list[Dialog], chol: np.ndarray, rng: np.random.Generator) -> None:
    """Null mode: every utterance's annotations from a second, independent draw of the latent process on
    the same layout (its own speaker and dialog offsets, turns, rater biases, class coverage, categories),
    all from `rng`; the audio keeps the latent it had (`audio_latent`), so labels and audio share no draw.
    """
    rater_bias = rng.normal(0.0, RATER_BIAS_SD, size=(len(EXTERNAL_RATERS), 3))
    for session in SESSIONS:
        offsets = {letter: SPEAKER_OFFSET_SD * (chol @ rng.standard_normal(3)) for letter in "FM"}
        session_dialogs = [d for d in dialogs if d.session == session]
        for dialog in session_dialogs:
            dialog_offset = DIALOG_OFFSET_SD * (chol @ rng.standard_normal(3))
            dialog.rater_bias = rater_bias[[EXTERNAL_RATERS.index(r) for r in dialog.a_raters]]
            state = {"F": rng.standard_normal(3), "M": rng.standard_normal(3)}
            for utt in dialog.utts:
                utt.audio_latent = utt.latent
                state[utt.letter] = next_state(state[utt.letter], rng)
                utt.latent = latent_values(offsets[utt.letter], dialog_offset, state[utt.letter], chol)
                utt.ext = external_ratings(utt.latent, dialog.rater_bias, rng)
        cover_classes(session_dialogs, rng)
        for dialog in session_dialogs:
            for utt in dialog.utts:
                finish_labels(utt, rng)
