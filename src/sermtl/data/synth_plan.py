"""The plan of a generated corpus, everything but the audio: sessions, dialogs and their names, speakers,
turns and times, with the labels of every turn. Cheap, so tests can check the plan of a full-size corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import count

import numpy as np

from sermtl.data.synth_labels import (
    cover_classes,
    external_ratings,
    finish_labels,
    independent_labels,
    latent_values,
    next_state,
    words,
)
from sermtl.data.synth_model import (
    DEFAULT_CUE_SHARING,
    DIALOG_OFFSET_SD,
    EXTERNAL_RATERS,
    RATER_BIAS_SD,
    SESSIONS,
    SPEAKER_OFFSET_SD,
    TICKS_PER_SECOND,
    Dialog,
    Speaker,
    Speakers,
    Utt,
    latent_corr,
)

# Utterances per session and dialogs in the real corpus: the synthetic one is scaled from these.
REAL_SESSION_UTTERANCES: tuple[int, ...] = (1819, 1811, 2136, 2103, 2170)
REAL_UTTERANCES = 10039
REAL_DIALOGS = 151
DIALOG_SCALING_EXPONENT = 0.45  # dialogs grow slower than utterances: 400 utterances -> 35 dialogs
MIN_PER_SESSION = 12
DURATION_SIGMA = 0.55  # lognormal shape of utterance durations (IEMOCAP: median 3.4 s, mean 4.45 s)


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _session_counts(utterances: int) -> np.ndarray:
    counts = _largest_remainder(utterances, np.array(REAL_SESSION_UTTERANCES, dtype=np.float64))
    while counts.min() < MIN_PER_SESSION:
        counts[int(np.argmin(counts))] += 1
        counts[int(np.argmax(counts))] -= 1
    return counts


def _min_dialogs(session: int) -> tuple[int, int]:
    """Fewest (improvised, scripted) dialogs a session may have: the required suffixed names fit."""
    if session == 3:
        return 4, 1  # Ses03M_impro05a/b, Ses03M_impro08a/b
    if session == 5:
        return 1, 2  # Ses05M_script01_1, Ses05M_script01_1b
    return 1, 1


def _dialog_counts(utterances: int, per_session: np.ndarray) -> np.ndarray:
    total = round(REAL_DIALOGS * (utterances / REAL_UTTERANCES) ** DIALOG_SCALING_EXPONENT)
    counts = _largest_remainder(max(total, len(SESSIONS)), per_session.astype(np.float64))
    for i, session in enumerate(SESSIONS):
        lowest = sum(_min_dialogs(session))
        counts[i] = min(max(counts[i], lowest), per_session[i] // 2)
    return counts


def _impro_candidates(session: int):
    """(name stem, mocap letter, required) in canonical order; the mocap letter alternates."""
    for k in count(1):
        for mocap in "FM":
            if session == 3 and mocap == "M" and k in (5, 8):
                yield f"impro{k:02d}a", mocap, True
                yield f"impro{k:02d}b", mocap, True
            else:
                yield f"impro{k:02d}", mocap, False


def _script_candidates(session: int):
    for a in count(1):
        for b in range(1, 4 if a == 1 else 3):  # script01_1..3, script02_1..2, script03_1..2, ...
            for mocap in "FM":
                if session == 5 and mocap == "M" and (a, b) == (1, 1):
                    yield f"script{a:02d}_{b}", mocap, True
                    yield f"script{a:02d}_{b}b", mocap, True
                else:
                    yield f"script{a:02d}_{b}", mocap, False


def _pick(candidates, n: int, required_total: int) -> list[tuple[str, str]]:
    """n candidates in canonical order: the `required_total` required ones, then the first others."""
    pool: list[tuple[str, str, bool]] = []
    required = 0
    for cand in candidates:
        if required == required_total and len(pool) >= n:
            break
        pool.append(cand)
        required += cand[2]
    need = [i for i, c in enumerate(pool) if c[2]]
    rest = [i for i, c in enumerate(pool) if not c[2]]
    chosen = sorted(need + rest[: max(0, n - len(need))])
    return [(pool[i][0], pool[i][1]) for i in chosen]


def _session_dialog_names(session: int, n: int) -> list[tuple[str, bool]]:
    min_impro, min_script = _min_dialogs(session)
    n_impro = max(min_impro, min(n - min_script, (n + 1) // 2))
    n_script = n - n_impro
    impro = _pick(_impro_candidates(session), n_impro, 4 if session == 3 else 0)
    script = _pick(_script_candidates(session), n_script, 2 if session == 5 else 0)
    names = [(f"Ses{session:02d}{m}_{stem}", True) for stem, m in impro]
    names += [(f"Ses{session:02d}{m}_{stem}", False) for stem, m in script]
    return names


def duration_bounds(mean_duration_s: float) -> tuple[float, float]:
    """The shortest and longest utterance, in seconds, of a corpus of this mean duration."""
    low = 0.8 if mean_duration_s >= 2.0 else 0.6
    return low, min(15.0, 3.4 * mean_duration_s)


@dataclass(frozen=True)
class _Layout:
    """What every dialog of the plan is drawn with: the plan's generator and the corpus-wide settings."""

    rng: np.random.Generator
    chol: np.ndarray  # Cholesky factor of the latent correlation
    speakers: Speakers
    rater_bias: np.ndarray  # (4, 3) bias of each external rater
    sample_rate: int
    grid: int  # samples per whole number of ticks: every length is a multiple
    low: float  # duration bounds, seconds
    high: float
    mu: float  # of the lognormal durations


def plan(
    utterances: int,
    rng: np.random.Generator,
    mean_duration_s: float,
    sample_rate: int,
    *,
    cue_sharing: float = DEFAULT_CUE_SHARING,
    label_rng: np.random.Generator | None = None,
) -> tuple[list[Dialog], Speakers]:
    """Everything but the audio, drawn from `rng` in a fixed order (the bytes depend on it).

    With `label_rng` (null mode) the annotations are then redrawn from it (independent_labels); without,
    they follow the latent the audio renders.
    """
    chol = np.linalg.cholesky(latent_corr(cue_sharing))
    speakers = _plan_speakers(rng, chol)
    per_session = _session_counts(utterances)
    dialog_counts = _dialog_counts(utterances, per_session)
    low, high = duration_bounds(mean_duration_s)
    layout = _Layout(
        rng=rng,
        chol=chol,
        speakers=speakers,
        sample_rate=sample_rate,
        grid=sample_rate // math.gcd(sample_rate, TICKS_PER_SECOND),
        low=low,
        high=high,
        mu=math.log(mean_duration_s) - DURATION_SIGMA**2 / 2,
        rater_bias=rng.normal(0.0, RATER_BIAS_SD, size=(len(EXTERNAL_RATERS), 3)),
    )
    dialogs: list[Dialog] = []
    for s_i, session in enumerate(SESSIONS):
        names = _session_dialog_names(session, int(dialog_counts[s_i]))
        first_index = sum(len(d.utts) for d in dialogs)
        dialogs += _plan_session(layout, session, names, int(per_session[s_i]), first_index)
    if label_rng is not None:
        independent_labels(dialogs, chol, label_rng)
    return dialogs, speakers


def _plan_session(
    layout: _Layout, session: int, names: list[tuple[str, bool]], size: int, first_index: int
) -> list[Dialog]:
    """One session's dialogs of `size` utterances in all, numbered from `first_index`, labelled."""
    rng = layout.rng
    shares = rng.dirichlet(np.full(len(names), 4.0))
    sizes = 2 + rng.multinomial(size - 2 * len(names), shares)
    session_dialogs: list[Dialog] = []
    index = first_index
    for (name, improvised), dialog_size in zip(names, sizes, strict=True):
        dialog = _new_dialog(layout, name, session, improvised)
        _add_turns(layout, dialog, int(dialog_size), index)
        index += len(dialog.utts)
        session_dialogs.append(dialog)
    cover_classes(session_dialogs, rng)
    for dialog in session_dialogs:
        for turn, utt in enumerate(dialog.utts):
            finish_labels(utt, rng)
            utt.words = words(dialog, turn, utt.n_samples / layout.sample_rate, rng)
    return session_dialogs


def _new_dialog(layout: _Layout, name: str, session: int, improvised: bool) -> Dialog:
    """An empty dialog with its raters (two dimensional, three categorical) and its latent offset."""
    rng = layout.rng
    pair = sorted(rng.choice(len(EXTERNAL_RATERS), size=2, replace=False).tolist())
    others = [i for i in range(len(EXTERNAL_RATERS)) if i not in pair]
    c_idx = sorted([*pair, int(rng.choice(others))])
    return Dialog(
        name=name,
        session=session,
        improvised=improvised,
        a_raters=(EXTERNAL_RATERS[pair[0]], EXTERNAL_RATERS[pair[1]]),
        c_raters=tuple(EXTERNAL_RATERS[i] for i in c_idx),
        rater_bias=layout.rater_bias[pair],
        offset=DIALOG_OFFSET_SD * (layout.chol @ rng.standard_normal(3)),
    )


def _add_turns(layout: _Layout, dialog: Dialog, size: int, first_index: int) -> None:
    """`size` turns of the dialog's two speakers: times, lengths, latent emotions and external ratings."""
    rng, sample_rate, grid = layout.rng, layout.sample_rate, layout.grid
    letters = _turns(size, rng)
    ticks = int(rng.uniform(1.0, 6.0) * TICKS_PER_SECOND)
    per_letter = {"F": 0, "M": 0}
    state = {"F": rng.standard_normal(3), "M": rng.standard_normal(3)}
    for index, letter in enumerate(letters, start=first_index):
        seconds = float(np.clip(rng.lognormal(layout.mu, DURATION_SIGMA), layout.low, layout.high))
        n_samples = max(grid, round(seconds * sample_rate / grid) * grid)
        utt = Utt(
            utt_id=f"{dialog.name}_{letter}{per_letter[letter]:03d}",
            index=index,
            session=dialog.session,
            letter=letter,
            start_ticks=ticks,
            n_samples=n_samples,
        )
        per_letter[letter] += 1
        if per_letter[letter] > 1000:
            raise ValueError(f"dialog {dialog.name} would need more than 1000 turns of one speaker")
        ticks += n_samples * TICKS_PER_SECOND // sample_rate
        ticks += int(rng.uniform(0.05, 1.5) * TICKS_PER_SECOND)
        state[letter] = next_state(state[letter], rng)
        speaker_offset = layout.speakers[(dialog.session, letter)].offset
        utt.latent = latent_values(speaker_offset, dialog.offset, state[letter], layout.chol)
        utt.ext = external_ratings(utt.latent, dialog.rater_bias, rng)
        dialog.utts.append(utt)


def _plan_speakers(rng: np.random.Generator, chol: np.ndarray) -> Speakers:
    speakers: Speakers = {}
    for session in SESSIONS:
        for letter in "FM":
            female = letter == "F"
            speakers[(session, letter)] = Speaker(
                session=session,
                letter=letter,
                f0=float(rng.uniform(180.0, 240.0) if female else rng.uniform(100.0, 140.0)),
                formant_scale=float(rng.uniform(1.10, 1.22) if female else rng.uniform(0.93, 1.05)),
                gain_db=float(rng.normal(0.0, 2.0)),
                rate=float(rng.uniform(3.6, 4.8)),
                tilt=float(rng.normal(0.0, 0.15)),
                breath=float(rng.uniform(0.02, 0.08)),
                offset=tuple(float(x) for x in SPEAKER_OFFSET_SD * (chol @ rng.standard_normal(3))),
            )
    return speakers


def _turns(size: int, rng: np.random.Generator) -> list[str]:
    """Interleaved speaker letters; both speakers speak in every dialog."""
    letters = ["F" if rng.random() < 0.5 else "M"]
    for _ in range(size - 1):
        switch = rng.random() < 0.8
        letters.append(("M" if letters[-1] == "F" else "F") if switch else letters[-1])
    if len(set(letters)) == 1:
        letters[-1] = "M" if letters[0] == "F" else "F"
    return letters
