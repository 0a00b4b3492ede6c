"""Deterministic synthetic speech-emotion corpus in the exact IEMOCAP_full_release layout.

Design notes (why it is built this way): docs/design/synth.md.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import numbers
import struct
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
from scipy.signal import lfilter
from tqdm import tqdm

from sermtl.data.corpus import to_class
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir
from sermtl.parallel import worker_count
from sermtl.params import Thresholds

SESSIONS: tuple[int, ...] = (1, 2, 3, 4, 5)
# A synthetic corpus is only recognised by its marker: a real IEMOCAP copy has the same layout.
SYNTH_OUTPUT = OutputKind.of(
    "synth",
    [f"Session{s}" for s in SESSIONS],
    hint="it may be a real corpus; delete it yourself if it is a synthetic corpus of an older sermtl",
)
# Utterances per session and dialogs in the real corpus: the synthetic one is scaled from these.
REAL_SESSION_UTTERANCES: tuple[int, ...] = (1819, 1811, 2136, 2103, 2170)
REAL_UTTERANCES = 10039
REAL_DIALOGS = 151
DIALOG_SCALING_EXPONENT = 0.45  # dialogs grow slower than utterances: 400 utterances -> 35 dialogs

MIN_UTTERANCES = 60  # 12 per session: both speakers, every class of every dimension, required dialogs
MAX_UTTERANCES = 200_000  # keeps per-speaker indices within 3 digits and dialog numbers within 2
MIN_PER_SESSION = 12
PARALLEL_MIN_UTTERANCES = 2000  # below this, rendering in-process beats starting workers
MAX_WORKERS = 8
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MIN_MEAN_DURATION_S = 0.8
MAX_MEAN_DURATION_S = 12.0
DURATION_SIGMA = 0.55  # lognormal shape of utterance durations (IEMOCAP: median 3.4 s, mean 4.45 s)

# Default 3-class bins (params.yaml data.thresholds); every session is made to hold every class.
DEFAULT_THRESHOLDS = Thresholds()  # class coverage is guaranteed for these (params.yaml defaults)
TICKS_PER_SECOND = 10_000  # annotation times have 4 decimals

TABLE_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
EXTERNAL_RATERS: tuple[str, ...] = ("E1", "E2", "E3", "E4")
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
COMMENTS: tuple[str, ...] = ("curious", "annoyed", "tired", "sarcastic", "amused", "worried")
XXX_PROBABILITY = 0.22

# Latent (valence, arousal, dominance) model on the 1..5 scale.
LATENT_MEAN = np.array([3.0, 2.95, 3.05])
LATENT_SD = np.array([0.85, 0.72, 0.72])
LATENT_CORR = np.array([[1.0, 0.15, 0.25], [0.15, 1.0, 0.7], [0.25, 0.7, 1.0]])  # labels end up near 0.55
SPEAKER_OFFSET_SD = np.array([0.2, 0.2, 0.2])
DIALOG_OFFSET_SD = np.array([0.35, 0.25, 0.2])
TURN_AR = 0.5  # emotions persist over a speaker's consecutive turns
RATER_NOISE_SD = 0.5
RATER_BIAS_SD = 0.15
SELF_BIAS = np.array([0.4, 0.6, 0.3])  # actors rate themselves differently from the external raters
SELF_NOISE_SD = 0.8

# Effect settings (module docstring). The defaults reproduce the generator that had none.
DEFAULT_CUE_SPAN = 0.5
CUE_SPAN_JITTER = 0.4  # an utterance's share: cue_span +- this x the distance to the nearer of 0 and 1
DEFAULT_CUE_SHARING = 0.5
SHARED_CORR = np.array([[1.0, 0.8, 0.8], [0.8, 1.0, 0.8], [0.8, 0.8, 1.0]])  # latent at cue_sharing 1
SHARED_CUE_WEIGHT = 0.7  # at cue_sharing 1: the other dimensions' weight on a cue, relative to its own
# Cue channels of _render: (the dimension it belongs to, weights of (valence, arousal, dominance) on its
# drive at cue_sharing 0.5, the default). At 0 only the own weight is kept; at 1 the others are
# SHARED_CUE_WEIGHT x the own weight (at least the default cross-terms, so sharing only grows).
CUE_CHANNELS: dict[str, tuple[int, tuple[float, float, float]]] = {
    "rate": (1, (0.0, 0.45, 0.0)),  # speaking rate, octaves
    "range": (1, (0.0, 1.3, 0.0)),  # pitch accent depth
    "f1": (1, (0.0, 0.05, 0.0)),  # first formant shift
    "energy": (1, (0.0, 4.0, 2.5)),  # dB; dominance's loudness shares it
    "pitch_level": (2, (0.0, 0.5, 1.8)),  # semitones
    "contour": (0, (3.0, 0.0, 0.0)),  # pitch slope over the cue span, semitones
    "tilt": (0, (1.5, 0.15, 0.0)),  # brightness (log of the bright/dark mix)
}

# Vowel formants (F1, F2, F3) in Hz of an adult male voice; scaled per speaker.
VOWELS = np.array(
    [
        [730.0, 1090.0, 2440.0],
        [270.0, 2290.0, 3010.0],
        [300.0, 870.0, 2240.0],
        [530.0, 1840.0, 2480.0],
        [570.0, 840.0, 2410.0],
        [660.0, 1720.0, 2410.0],
        [490.0, 1350.0, 1690.0],
    ]
)
BANDWIDTHS = np.array([80.0, 100.0, 140.0])
WORDS: tuple[str, ...] = (
    "I", "you", "we", "they", "it", "that", "this", "what", "why", "how", "know", "think", "really",
    "just", "okay", "yeah", "no", "well", "so", "but", "and", "the", "a", "to", "going", "want",
    "never", "always", "again", "here", "there", "now", "can't", "don't", "right", "sure", "maybe",
    "about", "time", "money", "job", "home", "tonight", "tomorrow", "mean", "said", "told", "leave",
    "wait", "look", "please", "sorry", "great", "fine", "believe", "anything", "everything", "nothing",
)  # fmt: skip


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` wrote: the corpus folder, its size in utterances, dialogs and audio seconds."""

    out_dir: Path
    utterances: int
    dialogs: int
    audio_seconds: float


@dataclass(frozen=True)
class _Speaker:
    session: int
    letter: str
    f0: float
    formant_scale: float
    gain_db: float
    rate: float
    tilt: float
    breath: float
    offset: tuple[float, float, float]


@dataclass
class _Utt:
    utt_id: str
    index: int  # position in the corpus: picks this utterance's audio seed
    session: int
    letter: str
    start_ticks: int
    n_samples: int
    latent: np.ndarray = field(default_factory=lambda: np.zeros(3))  # what the labels follow
    audio_latent: np.ndarray | None = None  # what the audio follows, where not `latent` (null mode)
    ext: np.ndarray = field(default_factory=lambda: np.zeros((2, 3), dtype=np.int64))  # 2 raters x V,A,D
    self_rating: np.ndarray | None = None
    category: str = "neu"
    votes: list[str] = field(default_factory=list)
    self_vote: str = ""
    words: str = ""

    def header_values(self) -> np.ndarray:
        return self.ext.mean(axis=0)


@dataclass
class _Dialog:
    name: str
    session: int
    improvised: bool
    a_raters: tuple[str, str]
    c_raters: tuple[str, ...]
    rater_bias: np.ndarray  # (2, 3) bias of the two dimensional raters
    offset: np.ndarray
    utts: list[_Utt] = field(default_factory=list)


@dataclass(frozen=True)
class _Cues:
    """How the audio carries the latent emotion (cue_span, and cue_sharing's weights per channel)."""

    span: float = DEFAULT_CUE_SPAN
    weights: tuple[tuple[str, tuple[float, float, float]], ...] = tuple(
        (name, weights) for name, (_, weights) in CUE_CHANNELS.items()
    )

    def drive(self, channel: str, z: tuple[float, float, float]) -> float:
        """sum of weight x (latent - 3) over the dimensions weighing on the channel, in V, A, D order."""
        total = None
        for weight, value in zip(dict(self.weights)[channel], z, strict=True):
            if weight != 0.0:
                term = weight * value
                total = term if total is None else total + term
        return 0.0 if total is None else total


def _between(sharing: float, at_zero: np.ndarray, at_default: np.ndarray, at_one: np.ndarray) -> np.ndarray:
    """Linear in cue_sharing between its three anchors (0, DEFAULT_CUE_SHARING, 1); exact at each."""
    if sharing == DEFAULT_CUE_SHARING:
        return at_default
    if sharing < DEFAULT_CUE_SHARING:
        return at_zero + (sharing / DEFAULT_CUE_SHARING) * (at_default - at_zero)
    above = (sharing - DEFAULT_CUE_SHARING) / (1.0 - DEFAULT_CUE_SHARING)
    return at_default + above * (at_one - at_default)


def latent_corr(sharing: float = DEFAULT_CUE_SHARING) -> np.ndarray:
    """Correlation of the latent (valence, arousal, dominance) at a cue_sharing (identity at 0)."""
    return _between(sharing, np.eye(3), LATENT_CORR, SHARED_CORR)


def cue_weights(sharing: float = DEFAULT_CUE_SHARING) -> dict[str, tuple[float, float, float]]:
    """Per cue channel, the weights of (valence, arousal, dominance) on its drive at a cue_sharing."""
    weights = {}
    for name, (own, default) in CUE_CHANNELS.items():
        at_default = np.array(default)
        at_zero = np.where(np.arange(3) == own, at_default, 0.0)
        at_one = np.where(
            np.arange(3) == own, at_default, np.maximum(SHARED_CUE_WEIGHT * at_default[own], at_default)
        )
        weights[name] = tuple(float(x) for x in _between(sharing, at_zero, at_default, at_one))
    return weights


def _cues(cue_span: float, cue_sharing: float) -> _Cues:
    return _Cues(span=cue_span, weights=tuple(cue_weights(cue_sharing).items()))


def synthesize(
    out_dir: Path,
    utterances: int = 400,
    seed: int = 0,
    mean_duration_s: float = 4.45,
    sample_rate: int = 16000,
    progress: bool = False,
    cue_span: float = DEFAULT_CUE_SPAN,
    cue_sharing: float = DEFAULT_CUE_SHARING,
    null_labels: bool = False,
) -> SynthSummary:
    """Write a synthetic IEMOCAP_full_release folder at `out_dir` (which holds Session1..Session5).

    Built in a sibling temporary folder and moved into place, so a crash never leaves a half corpus.
    An existing folder at `out_dir` is replaced only when empty or written by `synthesize` (its marker,
    sermtl.fsutil.OUTPUT_MARKER); anything else raises OutputFolderError before any work. The same
    arguments always give identical bytes. `cue_span`, `cue_sharing`, `null_labels`: the module docstring.
    """
    _validate(utterances, seed, mean_duration_s, sample_rate)
    _validate_effects(cue_span, cue_sharing, null_labels)
    utterances, seed, sample_rate = int(utterances), int(seed), int(sample_rate)
    mean_duration_s = float(mean_duration_s)
    cues = _cues(float(cue_span), float(cue_sharing))
    out_dir = Path(out_dir)
    check_output_dir(out_dir, SYNTH_OUTPUT)
    root = np.random.SeedSequence(seed)
    plan_seq, audio_seq, label_seq = root.spawn(3)  # the first two as before the third existed
    dialogs, speakers = _plan(
        utterances,
        np.random.default_rng(plan_seq),
        mean_duration_s,
        sample_rate,
        cue_sharing=float(cue_sharing),
        label_rng=np.random.default_rng(label_seq) if null_labels else None,
    )
    all_utts = [u for d in dialogs for u in d.utts]
    audio_seeds = audio_seq.spawn(len(all_utts))

    # Largest dialogs first balances the workers; each utterance has its own seed, so the order of
    # work never changes the bytes.
    jobs = sorted(dialogs, key=lambda d: (-len(d.utts), d.name))
    workers = _worker_count(len(all_utts))
    total_samples = 0
    with atomic_directory(out_dir, SYNTH_OUTPUT) as tmp:
        for dialog in dialogs:
            _write_annotations(tmp, dialog, sample_rate)
        bar = tqdm(total=len(all_utts), disable=not progress, file=sys.stderr, unit="utt", desc="synth")
        with bar:
            if workers == 1:
                for dialog in jobs:
                    seeds = [audio_seeds[u.index] for u in dialog.utts]
                    total_samples += _render_dialog(
                        tmp, dialog, speakers, sample_rate, seeds, cues, bar.update
                    )
            else:
                rendered = _render_in_workers(
                    tmp, jobs, speakers, sample_rate, audio_seeds, cues, workers, bar
                )
                total_samples += rendered
    return SynthSummary(
        out_dir=out_dir,
        utterances=len(all_utts),
        dialogs=len(dialogs),
        audio_seconds=total_samples / sample_rate,
    )


def _worker_count(utterances: int) -> int:
    return worker_count(utterances, PARALLEL_MIN_UTTERANCES, MAX_WORKERS)


def _render_dialog(
    root: Path,
    dialog: _Dialog,
    speakers: dict[tuple[int, str], _Speaker],
    sample_rate: int,
    seeds: list[np.random.SeedSequence],
    cues: _Cues,
    on_utterance: Callable[[int], object] | None = None,
) -> int:
    """Render and write one dialog's wavs; returns the number of samples written."""
    wav_dir = root / f"Session{dialog.session}" / "sentences" / "wav" / dialog.name
    wav_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for utt, seq in zip(dialog.utts, seeds, strict=True):
        spk = speakers[(utt.session, utt.letter)]
        pcm = _render(utt, spk, sample_rate, np.random.default_rng(seq), cues)
        (wav_dir / f"{utt.utt_id}.wav").write_bytes(_wav_bytes(pcm, sample_rate))
        total += pcm.size
        if on_utterance is not None:
            on_utterance(1)
    return total


def _init_worker() -> None:
    """Keep freed audio buffers in the heap of a worker process.

    Why: glibc otherwise maps and unmaps the large temporary arrays of every utterance, and the page
    faults cost about as much time as the synthesis itself. Only worker processes (ours) are tuned.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


def _render_in_workers(
    root: Path,
    jobs: list[_Dialog],
    speakers: dict[tuple[int, str], _Speaker],
    sample_rate: int,
    audio_seeds: list[np.random.SeedSequence],
    cues: _Cues,
    workers: int,
    bar: tqdm,
) -> int:
    # "spawn": never fork a parent that may hold threads (torch, BLAS) and their locks.
    context = multiprocessing.get_context("spawn")
    total = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {}
        for dialog in jobs:
            seeds = [audio_seeds[u.index] for u in dialog.utts]
            future = pool.submit(_render_dialog, root, dialog, speakers, sample_rate, seeds, cues)
            futures[future] = len(dialog.utts)
        try:
            for future in as_completed(futures):
                total += future.result()
                bar.update(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return total


# ----------------------------------------------------------------------------------------------
# Validation and the atomic move


def _validate(utterances: int, seed: int, mean_duration_s: float, sample_rate: int) -> None:
    def integral(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)

    if not integral(utterances):
        raise ValueError(f"utterances must be an integer, got {utterances!r}")
    if utterances < MIN_UTTERANCES:
        raise ValueError(
            f"utterances={utterances} is too small: at least {MIN_UTTERANCES} are needed so that every "
            "session holds both speakers, the required dialogs and every class of every dimension"
        )
    if utterances > MAX_UTTERANCES:
        raise ValueError(f"utterances={utterances} is too large (at most {MAX_UTTERANCES})")
    if not integral(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        not isinstance(mean_duration_s, numbers.Real)
        or isinstance(mean_duration_s, bool | np.bool_)
        or not math.isfinite(mean_duration_s)
        or not MIN_MEAN_DURATION_S <= mean_duration_s <= MAX_MEAN_DURATION_S
    ):
        raise ValueError(
            f"mean_duration_s must be a number in [{MIN_MEAN_DURATION_S}, {MAX_MEAN_DURATION_S}] seconds, "
            f"got {mean_duration_s!r}"
        )
    if not integral(sample_rate) or not 8000 <= sample_rate <= 96000:
        raise ValueError(f"sample_rate must be an integer in [8000, 96000] Hz, got {sample_rate!r}")


def _validate_effects(cue_span: float, cue_sharing: float, null_labels: bool) -> None:
    def real(value: object) -> bool:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool | np.bool_)
            and math.isfinite(value)
        )

    if not real(cue_span) or not 0.0 < cue_span <= 1.0:
        raise ValueError(f"cue_span must be a number in (0, 1], got {cue_span!r}")
    if not real(cue_sharing) or not 0.0 <= cue_sharing <= 1.0:
        raise ValueError(f"cue_sharing must be a number in [0, 1], got {cue_sharing!r}")
    if not isinstance(null_labels, bool | np.bool_):
        raise ValueError(f"null_labels must be true or false, got {null_labels!r}")


# ----------------------------------------------------------------------------------------------
# The corpus plan: sessions, dialogs, turns, times, latent emotions, ratings, categories, words


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


def _duration_bounds(mean_duration_s: float) -> tuple[float, float]:
    low = 0.8 if mean_duration_s >= 2.0 else 0.6
    return low, min(15.0, 3.4 * mean_duration_s)


def _plan(
    utterances: int,
    rng: np.random.Generator,
    mean_duration_s: float,
    sample_rate: int,
    *,
    cue_sharing: float = DEFAULT_CUE_SHARING,
    label_rng: np.random.Generator | None = None,
) -> tuple[list[_Dialog], dict[tuple[int, str], _Speaker]]:
    """Everything but the audio: cheap, so tests can check the plan of a full-size corpus.

    With `label_rng` (null mode) the annotations are then redrawn from it (_independent_labels); without,
    they follow the latent the audio renders.
    """
    chol = np.linalg.cholesky(latent_corr(cue_sharing))
    speakers = _plan_speakers(rng, chol)
    per_session = _session_counts(utterances)
    dialog_counts = _dialog_counts(utterances, per_session)
    grid = sample_rate // math.gcd(sample_rate, TICKS_PER_SECOND)  # samples per whole number of ticks
    low, high = _duration_bounds(mean_duration_s)
    mu = math.log(mean_duration_s) - DURATION_SIGMA**2 / 2
    rater_bias = rng.normal(0.0, RATER_BIAS_SD, size=(len(EXTERNAL_RATERS), 3))

    dialogs: list[_Dialog] = []
    index = 0
    for s_i, session in enumerate(SESSIONS):
        names = _session_dialog_names(session, int(dialog_counts[s_i]))
        shares = rng.dirichlet(np.full(len(names), 4.0))
        sizes = 2 + rng.multinomial(per_session[s_i] - 2 * len(names), shares)
        session_dialogs: list[_Dialog] = []
        for (name, improvised), size in zip(names, sizes, strict=True):
            pair = sorted(rng.choice(len(EXTERNAL_RATERS), size=2, replace=False).tolist())
            others = [i for i in range(len(EXTERNAL_RATERS)) if i not in pair]
            c_idx = sorted([*pair, int(rng.choice(others))])
            dialog = _Dialog(
                name=name,
                session=session,
                improvised=improvised,
                a_raters=(EXTERNAL_RATERS[pair[0]], EXTERNAL_RATERS[pair[1]]),
                c_raters=tuple(EXTERNAL_RATERS[i] for i in c_idx),
                rater_bias=rater_bias[pair],
                offset=DIALOG_OFFSET_SD * (chol @ rng.standard_normal(3)),
            )
            letters = _turns(int(size), rng)
            ticks = int(rng.uniform(1.0, 6.0) * TICKS_PER_SECOND)
            per_letter = {"F": 0, "M": 0}
            state = {"F": rng.standard_normal(3), "M": rng.standard_normal(3)}
            for letter in letters:
                seconds = float(np.clip(rng.lognormal(mu, DURATION_SIGMA), low, high))
                n_samples = max(grid, round(seconds * sample_rate / grid) * grid)
                utt = _Utt(
                    utt_id=f"{name}_{letter}{per_letter[letter]:03d}",
                    index=index,
                    session=session,
                    letter=letter,
                    start_ticks=ticks,
                    n_samples=n_samples,
                )
                index += 1
                per_letter[letter] += 1
                if per_letter[letter] > 1000:
                    raise ValueError(f"dialog {name} would need more than 1000 turns of one speaker")
                ticks += n_samples * TICKS_PER_SECOND // sample_rate
                ticks += int(rng.uniform(0.05, 1.5) * TICKS_PER_SECOND)
                state[letter] = _next_state(state[letter], rng)
                utt.latent = _latent(speakers[(session, letter)].offset, dialog.offset, state[letter], chol)
                utt.ext = _external_ratings(utt.latent, dialog.rater_bias, rng)
                dialog.utts.append(utt)
            session_dialogs.append(dialog)
        _cover_classes(session_dialogs, rng)
        for dialog in session_dialogs:
            for turn, utt in enumerate(dialog.utts):
                _finish_labels(utt, rng)
                utt.words = _words(dialog, turn, utt.n_samples / sample_rate, rng)
        dialogs.extend(session_dialogs)
    if label_rng is not None:
        _independent_labels(dialogs, chol, label_rng)
    return dialogs, speakers


def _next_state(state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A speaker's next turn: emotions persist (TURN_AR), the stationary distribution stays N(0, I)."""
    return TURN_AR * state + math.sqrt(1 - TURN_AR**2) * rng.standard_normal(3)


def _latent(speaker_offset, dialog_offset: np.ndarray, state: np.ndarray, chol: np.ndarray) -> np.ndarray:
    latent = LATENT_MEAN + np.array(speaker_offset) + dialog_offset
    latent += LATENT_SD * (chol @ state)
    return np.clip(latent, 1.0, 5.0)


def _independent_labels(dialogs: list[_Dialog], chol: np.ndarray, rng: np.random.Generator) -> None:
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
                state[utt.letter] = _next_state(state[utt.letter], rng)
                utt.latent = _latent(offsets[utt.letter], dialog_offset, state[utt.letter], chol)
                utt.ext = _external_ratings(utt.latent, dialog.rater_bias, rng)
        _cover_classes(session_dialogs, rng)
        for dialog in session_dialogs:
            for utt in dialog.utts:
                _finish_labels(utt, rng)


def _plan_speakers(rng: np.random.Generator, chol: np.ndarray) -> dict[tuple[int, str], _Speaker]:
    speakers: dict[tuple[int, str], _Speaker] = {}
    for session in SESSIONS:
        for letter in "FM":
            female = letter == "F"
            speakers[(session, letter)] = _Speaker(
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


def _external_ratings(latent: np.ndarray, bias: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = latent[None, :] + bias + rng.normal(0.0, RATER_NOISE_SD, size=(2, 3))
    return np.clip(np.rint(noisy), 1, 5).astype(np.int64)


def _class_of(value: float) -> int:
    return to_class(value, DEFAULT_THRESHOLDS)


def _cover_classes(dialogs: list[_Dialog], rng: np.random.Generator) -> None:
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


def _finish_labels(utt: _Utt, rng: np.random.Generator) -> None:
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


def _words(dialog: _Dialog, turn: int, seconds: float, rng: np.random.Generator) -> str:
    """Transcript text; scripted dialogs repeat the same text across sessions, as in IEMOCAP."""
    n = max(1, round(seconds * rng.uniform(1.8, 2.8)))
    if dialog.improvised:
        source = rng
    else:
        script = dialog.name.split("_", 1)[1].rstrip("b")
        source = np.random.default_rng(zlib.crc32(f"{script}/{turn}".encode()))
    text = " ".join(WORDS[int(i)] for i in source.integers(0, len(WORDS), size=n))
    return text[0].upper() + text[1:] + ("?" if source.random() < 0.2 else ".")


# ----------------------------------------------------------------------------------------------
# Annotation files


def _fmt_ticks(ticks: int, width: int = 1) -> str:
    return f"{ticks // TICKS_PER_SECOND:0{width}d}.{ticks % TICKS_PER_SECOND:04d}"


def _vad_line(rater: str, values: np.ndarray, double_space: bool) -> str:
    v, a, d = (int(x) for x in values)
    space = "  " if double_space else " "
    return f"A-{rater}:\tval {v}; act {a}; dom{space}{d};\t()"


def _write_annotations(root: Path, dialog: _Dialog, sample_rate: int) -> None:
    session_dir = root / f"Session{dialog.session}" / "dialog"
    emo_dir = session_dir / "EmoEvaluation"
    for sub in ("Attribute", "Categorical", "Self-evaluation"):
        (emo_dir / sub).mkdir(parents=True, exist_ok=True)
    (session_dir / "transcriptions").mkdir(parents=True, exist_ok=True)
    layout_rng = np.random.default_rng(zlib.crc32(dialog.name.encode()))

    blocks, transcript, attribute, categorical, anvil = [], [], [], [], []
    for utt in dialog.utts:
        end = utt.start_ticks + utt.n_samples * TICKS_PER_SECOND // sample_rate
        v, a, d = utt.header_values()
        lines = [
            f"[{_fmt_ticks(utt.start_ticks)} - {_fmt_ticks(end)}]\t{utt.utt_id}\t{utt.category}\t"
            f"[{v:.4f}, {a:.4f}, {d:.4f}]"
        ]
        for rater, vote in zip(dialog.c_raters, utt.votes, strict=True):
            comment = str(layout_rng.choice(COMMENTS)) if layout_rng.random() < 0.1 else ""
            lines.append(f"C-{rater}:\t{vote}\t({comment})")
        lines.append(f"C-{utt.letter}1:\t{utt.self_vote}\t()")
        for rater, ratings in zip(dialog.a_raters, utt.ext, strict=True):
            lines.append(_vad_line(rater, ratings, layout_rng.random() < 0.3))
        if utt.self_rating is not None:
            lines.append(_vad_line(f"{utt.letter}1", utt.self_rating, layout_rng.random() < 0.3))
        blocks.append("\n".join(lines) + "\n")
        transcript.append(
            f"{utt.utt_id} [{_fmt_ticks(utt.start_ticks, 3)}-{_fmt_ticks(end, 3)}]: {utt.words}\n"
        )
        av, aa, ad = (int(x) for x in utt.ext[0])
        attribute.append(f"{utt.utt_id} :act {aa}; :val {av}; :dom {ad}; ()\n")
        categorical.append(f"{utt.utt_id} :{utt.votes[0]} ()\n")
        start, stop = utt.start_ticks / TICKS_PER_SECOND, end / TICKS_PER_SECOND
        anvil.append(f'      <el index="{len(anvil)}" start="{start:.4f}" end="{stop:.4f}"></el>\n')

    (emo_dir / f"{dialog.name}.txt").write_text(TABLE_HEADER + "\n\n" + "\n".join(blocks) + "\n")
    (session_dir / "transcriptions" / f"{dialog.name}.txt").write_text("".join(transcript))
    (emo_dir / "Attribute" / f"{dialog.name}_atr.txt").write_text("".join(attribute))
    (emo_dir / "Categorical" / f"{dialog.name}_cat.txt").write_text("".join(categorical))
    (emo_dir / "Self-evaluation" / f"{dialog.name}.anvil").write_text(
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<annotation>\n  <body>\n'
        f'    <track name="Emotion.{dialog.name}" type="primary">\n'
        + "".join(anvil)
        + "    </track>\n  </body>\n</annotation>\n"
    )


# ----------------------------------------------------------------------------------------------
# Audio


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return x * x * (3.0 - 2.0 * x)


def _formant_poles(freqs: np.ndarray, bandwidths: np.ndarray, sample_rate: int) -> np.ndarray:
    """Denominators (one row per syllable) of a cascade of three second-order formant resonators."""
    r = np.exp(-np.pi * bandwidths / sample_rate) * np.ones_like(freqs)  # (k, 3)
    c = -2.0 * r * np.cos(2.0 * np.pi * freqs / sample_rate)
    q = r * r
    # (1 + c0 z + q0 z^2)(1 + c1 z + q1 z^2)(1 + c2 z + q2 z^2), expanded for all syllables at once.
    c0, c1, c2, q0, q1, q2 = c[:, 0], c[:, 1], c[:, 2], q[:, 0], q[:, 1], q[:, 2]
    a1 = c0 + c1
    a2 = q0 + q1 + c0 * c1
    a3 = c0 * q1 + q0 * c1
    a4 = q0 * q1
    rows = [np.ones_like(c0), a1 + c2, a2 + a1 * c2 + q2, a3 + a2 * c2 + a1 * q2]
    rows += [a4 + a3 * c2 + a2 * q2, a4 * c2 + a3 * q2, a4 * q2]
    return np.stack(rows, axis=1)


def _ramp(m: int, attack: np.ndarray, release: np.ndarray) -> np.ndarray:
    """Envelope of m samples: the attack curve rising, the release curve falling, capped at 1."""
    if m <= attack.size or m <= release.size:
        x = np.arange(m, dtype=np.float64)
        env = np.minimum(np.minimum(x / attack.size, (m - x) / release.size), 1.0)
        return _smoothstep(env)
    env = np.ones(m)
    env[: attack.size] = attack
    env[m - release.size :] = release
    return env


def _curve(length: int, rising: bool) -> np.ndarray:
    x = np.arange(length, dtype=np.float64) / max(length, 1)
    curve = _smoothstep(x)
    return curve if rising else curve[::-1].copy()


def _wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    """A canonical 44-byte-header WAV (16-bit PCM mono): byte-identical to soundfile's PCM_16 output."""
    data = pcm.astype("<i2").tobytes()
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data"
        + struct.pack("<I", len(data))
    )
    return header + data


def _cue_window(
    tc: np.ndarray, dur: float, cue_span: float, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    """(w on the control grid `tc`: 1 inside the utterance's cue span, 0 outside, smooth ramps; its
    start s0; its length span). Two draws whatever cue_span is, so the rest of the utterance is the same."""
    half = CUE_SPAN_JITTER * min(cue_span, 1.0 - cue_span)
    span = rng.uniform(cue_span - half, cue_span + half) * dur
    s0 = rng.uniform(0.0, dur - span)
    if cue_span >= 1.0:
        return np.ones_like(tc), 0.0, dur
    ramp = min(0.15, span / 4)
    w = _smoothstep(np.clip((tc - s0) / ramp, 0.0, 1.0) * np.clip((s0 + span - tc) / ramp, 0.0, 1.0))
    return w, s0, span


def _render(
    utt: _Utt, spk: _Speaker, sample_rate: int, rng: np.random.Generator, cues: _Cues = _Cues()
) -> np.ndarray:
    """Speech-like int16 samples whose prosody and spectrum follow the utterance's latent emotion.

    Slow-varying controls (f0, gains, brightness) are computed on a 2 ms grid and held, so only the
    glottal phase, the noise and the filters run per sample: 12 hours of audio take a few minutes.
    """
    sr = sample_rate
    n = utt.n_samples
    dur = n / sr
    hop = max(1, sr // 500)
    nc = -(-n // hop)
    tc = np.arange(nc) * (hop / sr)
    latent = utt.latent if utt.audio_latent is None else utt.audio_latent
    z = tuple(float(x) for x in latent - 3.0)
    drive = {name: cues.drive(name, z) for name, _ in cues.weights}

    # The emotional expression lives in a random sub-span; around it the speech is closer to neutral.
    w, s0, span = _cue_window(tc, dur, cues.span, rng)
    e = 0.2 + 0.8 * w

    # Syllables at an arousal-dependent rate, with occasional pauses and silence at both ends.
    lead = rng.uniform(0.02, 0.12) * min(dur, 2.0)
    end_speech = dur - rng.uniform(0.02, 0.12) * min(dur, 2.0)
    bounds: list[tuple[float, float]] = []
    cur = lead
    while cur < end_speech - 0.06:
        el = e[min(nc - 1, int(cur * sr) // hop)]
        rate = spk.rate * 2.0 ** (drive["rate"] * el)
        length = min(rng.lognormal(0.0, 0.22) / rate, end_speech - cur)
        bounds.append((cur, cur + length))
        cur += length
        if rng.random() < 0.07:
            cur += rng.uniform(0.08, 0.3)
    if not bounds:
        bounds.append((lead, end_speech))
    k = len(bounds)
    starts = np.array([b[0] for b in bounds])
    ends = np.array([b[1] for b in bounds])
    centres = (starts + ends) / 2
    accents = rng.standard_normal(k)
    vowels = rng.integers(0, len(VOWELS), size=k)
    stress = rng.uniform(0.6, 1.0, size=k)
    cons_len = rng.uniform(0.02, 0.06, size=k) * (rng.random(k) < 0.6)
    formant_jitter = rng.uniform(0.93, 1.07, size=(k, 3))
    knots = rng.standard_normal(int(dur * 20) + 2)

    # f0: pitch level (dominance, a little arousal), accent range (arousal), contour slope (valence).
    depth = np.maximum(0.4, 1.8 + drive["range"] * e)
    accent = np.interp(tc, centres, accents) * depth
    level = drive["pitch_level"] * e
    pos = np.clip((tc - s0) / span, 0.0, 1.0)
    contour = drive["contour"] * (pos - 0.5) * w
    declination = -1.5 * tc / dur
    jitter = 0.25 * np.interp(tc, np.linspace(0.0, dur, knots.size), knots)
    semitones = level + accent + contour + declination + jitter
    f0 = np.clip(spk.f0 * np.exp(semitones * (math.log(2.0) / 12.0)), 60.0, 500.0)
    phase = np.cumsum(np.repeat(f0 * (1.0 / sr), hop)[:n])
    frac = phase - np.floor(phase)
    source = frac * (2.0 - 3.0 * frac)  # derivative of a Rosenberg-like glottal pulse

    # Excitation: voiced nuclei (pulses + breath) after an optional noise burst (consonant onset).
    white = rng.random(n) - 0.5
    excitation = np.zeros(n)
    segments: list[tuple[int, int, int]] = []
    attack, release = _curve(int(0.025 * sr), True), _curve(int(0.04 * sr), False)
    for i in range(k):
        a_idx = int(starts[i] * sr)
        c_idx = int((starts[i] + cons_len[i]) * sr)
        b_idx = min(n, max(int(ends[i] * sr), c_idx + 8))
        if c_idx - a_idx >= 8:
            m = c_idx - a_idx
            burst = np.diff(white[a_idx : c_idx + 1]) * _smoothstep(1.0 - np.abs(np.linspace(-1.0, 1.0, m)))
            excitation[a_idx:c_idx] = 1.5 * burst
        env = _ramp(b_idx - c_idx, attack, release)
        excitation[c_idx:b_idx] = (source[c_idx:b_idx] + spk.breath * 4.0 * white[c_idx:b_idx]) * env
        segments.append((a_idx, b_idx, i))

    # Brightness (spectral tilt): valence, a little arousal; a time-varying mix of a dark low-pass
    # and the flat excitation.
    beta = np.minimum(0.3 * np.exp(drive["tilt"] * e + spk.tilt), 2.0)
    dark = lfilter([0.15], [1.0, -0.85], excitation)
    bright = dark + np.repeat(beta, hop)[:n] * (excitation - dark)

    # Formants per syllable (vowel), each syllable normalised to its stress level.
    tail = int(0.03 * sr)
    speech = np.zeros(n + tail)
    nyquist_cap = 0.45 * sr
    padded = np.concatenate([bright, np.zeros(tail)])
    mids = np.minimum(nc - 1, ((starts + ends) * (sr / 2)).astype(np.int64) // hop)
    formants = VOWELS[vowels] * spk.formant_scale * formant_jitter
    formants[:, 0] *= 1.0 + drive["f1"] * e[mids]
    poles = _formant_poles(np.minimum(formants, nyquist_cap), BANDWIDTHS[None, :], sr)
    for a_idx, b_idx, i in segments:
        seg = padded[a_idx : b_idx + tail].copy()
        seg[b_idx - a_idx :] = 0.0
        y = lfilter([1.0], poles[i], seg)
        y *= stress[i] / (np.sqrt(np.mean(y[: b_idx - a_idx] ** 2)) + 1e-12)
        speech[a_idx : b_idx + tail] += y
    speech = speech[:n]

    # Loudness: arousal (energy) and dominance (loudness) inside the span; speaker and recording level.
    level_db = -26.0 + spk.gain_db + rng.normal(0.0, 2.5)
    gain = np.exp((drive["energy"] * e + level_db) * (math.log(10.0) / 20.0))
    signal = speech * np.repeat(gain, hop)[:n]

    # Background noise at a random SNR relative to the nominal (neutral) speech level; random colour.
    snr_db = rng.uniform(10.0, 30.0)
    colour = rng.uniform(0.3, 0.95)
    noise = lfilter([1.0 - colour], [1.0, -colour], white[::-1])
    noise *= 10.0 ** ((level_db - snr_db) / 20.0) * 0.6 / (np.sqrt(np.mean(noise * noise)) + 1e-12)
    signal += noise

    peak = float(np.max(np.abs(signal)))
    if peak > 0.9:
        signal *= 0.9 / peak
    pcm = np.clip(np.rint(signal * 32767.0), -32768, 32767).astype(np.int16)
    if not np.any(pcm):
        pcm[0] = 1  # never silent (cannot happen at these levels; guards the contract)
    return pcm
