"""What the generated corpus is made of, shared by its plan, labels and audio: the latent emotion model,
the cue settings (cue_span, cue_sharing) and the records a corpus plan fills.

Design notes (why it is built this way): docs/design/synth.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SESSIONS: tuple[int, ...] = (1, 2, 3, 4, 5)
TICKS_PER_SECOND = 10_000  # annotation times have 4 decimals
EXTERNAL_RATERS: tuple[str, ...] = ("E1", "E2", "E3", "E4")

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

# Effect settings (docs/design/synth.md). The defaults reproduce the generator that had none.
DEFAULT_CUE_SPAN = 0.5
CUE_SPAN_JITTER = 0.4  # an utterance's share: cue_span +- this x the distance to the nearer of 0 and 1
DEFAULT_CUE_SHARING = 0.5
SHARED_CORR = np.array([[1.0, 0.8, 0.8], [0.8, 1.0, 0.8], [0.8, 0.8, 1.0]])  # latent at cue_sharing 1
SHARED_CUE_WEIGHT = 0.7  # at cue_sharing 1: the other dimensions' weight on a cue, relative to its own
# Cue channels of synth_audio.render: (the dimension it belongs to, weights of (valence, arousal,
# dominance) on its drive at cue_sharing 0.5, the default). At 0 only the own weight is kept; at 1 the
# others are SHARED_CUE_WEIGHT x the own weight (at least the default cross-terms, so sharing only grows).
CUE_CHANNELS: dict[str, tuple[int, tuple[float, float, float]]] = {
    "rate": (1, (0.0, 0.45, 0.0)),  # speaking rate, octaves
    "range": (1, (0.0, 1.3, 0.0)),  # pitch accent depth
    "f1": (1, (0.0, 0.05, 0.0)),  # first formant shift
    "energy": (1, (0.0, 4.0, 2.5)),  # dB; dominance's loudness shares it
    "pitch_level": (2, (0.0, 0.5, 1.8)),  # semitones
    "contour": (0, (3.0, 0.0, 0.0)),  # pitch slope over the cue span, semitones
    "tilt": (0, (1.5, 0.15, 0.0)),  # brightness (log of the bright/dark mix)
}


@dataclass(frozen=True)
class Speaker:
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
class Utt:
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
class Dialog:
    name: str
    session: int
    improvised: bool
    a_raters: tuple[str, str]
    c_raters: tuple[str, ...]
    rater_bias: np.ndarray  # (2, 3) bias of the two dimensional raters
    offset: np.ndarray
    utts: list[Utt] = field(default_factory=list)


Speakers = dict[tuple[int, str], Speaker]  # by (session, letter)


@dataclass(frozen=True)
class Cues:
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


def make_cues(cue_span: float, cue_sharing: float) -> Cues:
    return Cues(span=cue_span, weights=tuple(cue_weights(cue_sharing).items()))
