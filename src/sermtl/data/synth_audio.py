"""The audio of the generated corpus: speech-like wavs whose prosody and spectrum carry the utterance's
latent emotion (docs/design/synth.md), one random generator per utterance so the bytes never depend on
the order or the process they are rendered in."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from sermtl.data.synth_model import CUE_SPAN_JITTER, Cues, Dialog, Speaker, Speakers, Utt

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


def render_dialog(
    root: Path,
    dialog: Dialog,
    speakers: Speakers,
    sample_rate: int,
    seeds: list[np.random.SeedSequence],
    cues: Cues,
    on_utterance: Callable[[int], object] | None = None,
) -> int:
    """Render and write one dialog's wavs; returns the number of samples written."""
    wav_dir = root / f"Session{dialog.session}" / "sentences" / "wav" / dialog.name
    wav_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for utt, seq in zip(dialog.utts, seeds, strict=True):
        spk = speakers[(utt.session, utt.letter)]
        pcm = render(utt, spk, sample_rate, np.random.default_rng(seq), cues)
        (wav_dir / f"{utt.utt_id}.wav").write_bytes(wav_bytes(pcm, sample_rate))
        total += pcm.size
        if on_utterance is not None:
            on_utterance(1)
    return total


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
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


def cue_window(
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


@dataclass(frozen=True)
class _Controls:
    """One utterance's slow-varying controls on the 2 ms grid `tc` (hop samples a step)."""

    sr: int
    n: int  # samples
    dur: float  # seconds
    hop: int
    nc: int  # control steps
    tc: np.ndarray  # their times, seconds
    drive: dict[str, float]  # per cue channel (synth_model.CUE_CHANNELS)
    w: np.ndarray  # the cue window (cue_window) and its start and length
    s0: float
    span: float
    e: np.ndarray  # expression: 1 inside the cue span, 0.2 outside

    def held(self, values: np.ndarray) -> np.ndarray:
        """Control values held over their hop: one per sample."""
        return np.repeat(values, self.hop)[: self.n]


@dataclass(frozen=True)
class _Syllables:
    starts: np.ndarray  # seconds
    ends: np.ndarray
    centres: np.ndarray
    accents: np.ndarray
    vowels: np.ndarray  # rows of VOWELS
    stress: np.ndarray
    cons_len: np.ndarray  # seconds of the consonant burst before the vowel (0: none)
    formant_jitter: np.ndarray
    knots: np.ndarray  # of the pitch jitter, 20 a second


def render(
    utt: Utt, spk: Speaker, sample_rate: int, rng: np.random.Generator, cues: Cues = Cues()
) -> np.ndarray:
    """Speech-like int16 samples whose prosody and spectrum follow the utterance's latent emotion.

    Slow-varying controls (f0, gains, brightness) are computed on a 2 ms grid and held, so only the
    glottal phase, the noise and the filters run per sample: 12 hours of audio take a few minutes.
    The steps draw from `rng` in this order; any change of it changes every byte.
    """
    controls = _controls(utt, sample_rate, rng, cues)
    syllables = _syllables(controls, spk, rng)
    source = _glottal_source(controls, syllables, spk)
    white = rng.random(controls.n) - 0.5
    excitation, segments = _excitation(controls, syllables, source, white, spk)
    speech = _vocal_tract(controls, syllables, excitation, segments, spk)
    return _recording(controls, speech, white, spk, rng)


def _controls(utt: Utt, sample_rate: int, rng: np.random.Generator, cues: Cues) -> _Controls:
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
    w, s0, span = cue_window(tc, dur, cues.span, rng)
    e = 0.2 + 0.8 * w
    return _Controls(sr=sr, n=n, dur=dur, hop=hop, nc=nc, tc=tc, drive=drive, w=w, s0=s0, span=span, e=e)


def _syllables(c: _Controls, spk: Speaker, rng: np.random.Generator) -> _Syllables:
    """Syllables at an arousal-dependent rate, with occasional pauses and silence at both ends."""
    sr, dur, e = c.sr, c.dur, c.e
    lead = rng.uniform(0.02, 0.12) * min(dur, 2.0)
    end_speech = dur - rng.uniform(0.02, 0.12) * min(dur, 2.0)
    bounds: list[tuple[float, float]] = []
    cur = lead
    while cur < end_speech - 0.06:
        el = e[min(c.nc - 1, int(cur * sr) // c.hop)]
        rate = spk.rate * 2.0 ** (c.drive["rate"] * el)
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
    return _Syllables(
        starts=starts,
        ends=ends,
        centres=(starts + ends) / 2,
        accents=rng.standard_normal(k),
        vowels=rng.integers(0, len(VOWELS), size=k),
        stress=rng.uniform(0.6, 1.0, size=k),
        cons_len=rng.uniform(0.02, 0.06, size=k) * (rng.random(k) < 0.6),
        formant_jitter=rng.uniform(0.93, 1.07, size=(k, 3)),
        knots=rng.standard_normal(int(dur * 20) + 2),
    )


def _glottal_source(c: _Controls, syl: _Syllables, spk: Speaker) -> np.ndarray:
    """The glottal pulse train; f0: pitch level (dominance, a little arousal), accent range (arousal),
    contour slope (valence)."""
    tc, dur, drive, e = c.tc, c.dur, c.drive, c.e
    depth = np.maximum(0.4, 1.8 + drive["range"] * e)
    accent = np.interp(tc, syl.centres, syl.accents) * depth
    level = drive["pitch_level"] * e
    pos = np.clip((tc - c.s0) / c.span, 0.0, 1.0)
    contour = drive["contour"] * (pos - 0.5) * c.w
    declination = -1.5 * tc / dur
    jitter = 0.25 * np.interp(tc, np.linspace(0.0, dur, syl.knots.size), syl.knots)
    semitones = level + accent + contour + declination + jitter
    f0 = np.clip(spk.f0 * np.exp(semitones * (math.log(2.0) / 12.0)), 60.0, 500.0)
    phase = np.cumsum(np.repeat(f0 * (1.0 / c.sr), c.hop)[: c.n])
    frac = phase - np.floor(phase)
    return frac * (2.0 - 3.0 * frac)  # derivative of a Rosenberg-like glottal pulse


def _excitation(
    c: _Controls, syl: _Syllables, source: np.ndarray, white: np.ndarray, spk: Speaker
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Voiced nuclei (pulses + breath) after an optional noise burst (consonant onset); and per syllable
    (first sample, end sample, index)."""
    sr, n = c.sr, c.n
    excitation = np.zeros(n)
    segments: list[tuple[int, int, int]] = []
    attack, release = _curve(int(0.025 * sr), True), _curve(int(0.04 * sr), False)
    for i in range(len(syl.starts)):
        a_idx = int(syl.starts[i] * sr)
        c_idx = int((syl.starts[i] + syl.cons_len[i]) * sr)
        b_idx = min(n, max(int(syl.ends[i] * sr), c_idx + 8))
        if c_idx - a_idx >= 8:
            m = c_idx - a_idx
            burst = np.diff(white[a_idx : c_idx + 1]) * _smoothstep(1.0 - np.abs(np.linspace(-1.0, 1.0, m)))
            excitation[a_idx:c_idx] = 1.5 * burst
        env = _ramp(b_idx - c_idx, attack, release)
        excitation[c_idx:b_idx] = (source[c_idx:b_idx] + spk.breath * 4.0 * white[c_idx:b_idx]) * env
        segments.append((a_idx, b_idx, i))
    return excitation, segments


def _vocal_tract(
    c: _Controls,
    syl: _Syllables,
    excitation: np.ndarray,
    segments: list[tuple[int, int, int]],
    spk: Speaker,
) -> np.ndarray:
    """The excitation through the spectral tilt and each syllable's formants."""
    sr, n, nc, e = c.sr, c.n, c.nc, c.e
    # Brightness (spectral tilt): valence, a little arousal; a time-varying mix of a dark low-pass
    # and the flat excitation.
    beta = np.minimum(0.3 * np.exp(c.drive["tilt"] * e + spk.tilt), 2.0)
    dark = lfilter([0.15], [1.0, -0.85], excitation)
    bright = dark + c.held(beta) * (excitation - dark)

    # Formants per syllable (vowel), each syllable normalised to its stress level.
    tail = int(0.03 * sr)
    speech = np.zeros(n + tail)
    nyquist_cap = 0.45 * sr
    padded = np.concatenate([bright, np.zeros(tail)])
    mids = np.minimum(nc - 1, ((syl.starts + syl.ends) * (sr / 2)).astype(np.int64) // c.hop)
    formants = VOWELS[syl.vowels] * spk.formant_scale * syl.formant_jitter
    formants[:, 0] *= 1.0 + c.drive["f1"] * e[mids]
    poles = _formant_poles(np.minimum(formants, nyquist_cap), BANDWIDTHS[None, :], sr)
    for a_idx, b_idx, i in segments:
        seg = padded[a_idx : b_idx + tail].copy()
        seg[b_idx - a_idx :] = 0.0
        y = lfilter([1.0], poles[i], seg)
        y *= syl.stress[i] / (np.sqrt(np.mean(y[: b_idx - a_idx] ** 2)) + 1e-12)
        speech[a_idx : b_idx + tail] += y
    return speech[:n]


def _recording(
    c: _Controls, speech: np.ndarray, white: np.ndarray, spk: Speaker, rng: np.random.Generator
) -> np.ndarray:
    """Loudness, background noise and int16 samples."""
    # Loudness: arousal (energy) and dominance (loudness) inside the span; speaker and recording level.
    level_db = -26.0 + spk.gain_db + rng.normal(0.0, 2.5)
    gain = np.exp((c.drive["energy"] * c.e + level_db) * (math.log(10.0) / 20.0))
    signal = speech * c.held(gain)

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
