"""From a parsed request to the waveforms the model takes: the request limits (Limits), wav headers read
before any decoding, and every input checked to mono float32 samples in [-1, 1] (parse_input).

Design notes (why it is built this way): docs/design/serving.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sermtl.mlops.serving_request import (
    FILE_TYPES,
    WAV_COLUMN,
    InvalidAudioError,
    file_bytes,
    request_items,
)
from sermtl.params import DataParams, ServingParams

INT16_SCALE = 32768.0
# Float audio may overshoot 1.0 a little (resampling ringing, inter-sample peaks); beyond this peak it is
# not float audio at all but (most likely) int16 PCM sent as floats.
FLOAT_PEAK_LIMIT = 2.0
DEFAULT_SAMPLE_RATE = DataParams().sample_rate
DEFAULT_LIMITS = ServingParams()


@dataclass(frozen=True)
class Limits:
    """How much audio a request may hold (serving.json records them with the model; see ensemble_members).

    `min_duration_s` is the effective minimum, at least one frame of the networks' front end (`frame_s`):
    shorter audio would be one zero-padded frame, whose probabilities mean nothing."""

    sample_rate: int = DEFAULT_SAMPLE_RATE
    max_duration_s: float = DEFAULT_LIMITS.max_duration_s
    min_duration_s: float = DEFAULT_LIMITS.min_duration_s
    max_total_duration_s: float = DEFAULT_LIMITS.max_total_duration_s
    frame_s: float = 0.0

    @property
    def min_samples(self) -> int:
        # rounded first: 0.1 s * 16000 Hz is 1600.0000000000002 in floats, and must mean 1600 samples
        return max(1, math.ceil(round(max(self.min_duration_s, self.frame_s) * self.sample_rate, 6)))

    def _minimum(self) -> str:
        minimum = max(self.min_duration_s, self.frame_s)
        if self.frame_s > self.min_duration_s:
            return (
                f"{minimum:g} s (one frame of the model's front end; serving.min_duration_s is "
                f"{self.min_duration_s:g} s)"
            )
        return f"{minimum:g} s (serving.min_duration_s)"

    def check_length(self, size: int, where: str) -> None:
        """One input's length in samples: not empty, not shorter than the minimum, not over the maximum."""
        rate = self.sample_rate
        if size == 0:
            raise InvalidAudioError(f"{where}: empty waveform (0 samples)")
        if size < self.min_samples:
            samples = f"{size} sample{'s' * (size != 1)}"
            raise InvalidAudioError(
                f"{where}: audio is {size / rate:.4f} s long ({samples} at {rate} Hz); the minimum is "
                f"{self._minimum()}: too short to classify, send at least {self.min_samples} samples"
            )
        if size > self.max_duration_s * rate:
            raise InvalidAudioError(
                f"{where}: audio is {size / rate:.2f} s long ({size} samples at {rate} Hz); the limit is "
                f"{self.max_duration_s:g} s (serving.max_duration_s): split it into shorter requests"
            )

    def check_total(self, sizes: Sequence[int]) -> None:
        """All inputs of one request together."""
        total, rate = int(sum(sizes)), self.sample_rate
        if total > self.max_total_duration_s * rate:
            inputs = f"{len(sizes)} input{'s' * (len(sizes) != 1)}"
            raise InvalidAudioError(
                f"the request holds {total / rate:.2f} s of audio in total ({inputs}, {total} samples at "
                f"{rate} Hz); the limit is {self.max_total_duration_s:g} s per request "
                "(serving.max_total_duration_s): send the inputs in several requests"
            )


def _open_wav(data: bytes, where: str):
    import soundfile

    if not data:
        raise InvalidAudioError(f"{where}: empty wav file (0 bytes)")
    try:
        return soundfile.SoundFile(io.BytesIO(data))
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise _unreadable(exc, where) from exc


def _unreadable(exc: Exception, where: str) -> InvalidAudioError:
    reason = getattr(exc, "error_string", None) or str(exc)
    return InvalidAudioError(f"{where}: not a readable audio file (WAV, FLAC or OGG): {reason}")


def _wav_frames(data: bytes, where: str, sample_rate: int) -> int:
    """The length in samples of a mono file at `sample_rate`, from its header: nothing is decoded."""
    with _open_wav(data, where) as audio:
        rate, channels, frames = int(audio.samplerate), int(audio.channels), int(audio.frames)
    if rate != sample_rate:
        raise InvalidAudioError(
            f"{where}: wav sample rate is {rate} Hz but this model expects {sample_rate} Hz; "
            f"resample to {sample_rate} Hz before sending (nothing is resampled here)"
        )
    if channels != 1:
        raise InvalidAudioError(
            f"{where}: wav has {channels} channels; this model takes mono audio (downmix or pick "
            "the speaker's channel before sending)"
        )
    return frames


def _decode_wav(data: bytes, where: str, frames: int) -> np.ndarray:
    """The samples of a file `_wav_frames` has checked (at most `frames` of them are decoded)."""
    try:
        with _open_wav(data, where) as audio:
            samples = audio.read(frames, dtype="float32", always_2d=True)
    except InvalidAudioError:
        raise
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _unreadable(exc, where) from exc
    if samples.shape[0] == 0:
        raise InvalidAudioError(f"{where}: empty waveform (0 samples)")
    return _checked_values(samples[:, 0], where)


def _sample_array(samples: Any, where: str) -> np.ndarray:
    """The samples as a 1-D array of an audio dtype (float, or int16 PCM); values are not looked at yet."""
    if isinstance(samples, FILE_TYPES):
        raise InvalidAudioError(f"{where}: expected an array of samples, got {type(samples).__name__}")
    try:
        array = np.asarray(samples)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise InvalidAudioError(f"{where}: not an array of samples: {exc}") from exc
    if array.ndim == 0:
        raise InvalidAudioError(f"{where}: a single number is not a waveform: send an array of samples")
    if array.ndim == 2 and 1 in array.shape:  # a column or row vector is still mono
        array = array.reshape(-1)
    if array.ndim != 1:
        hint = " (multi-channel audio: send mono)" if array.ndim == 2 else ""
        raise InvalidAudioError(
            f"{where}: a waveform must be 1-D mono samples, got shape {array.shape}{hint}"
        )
    kind = array.dtype.kind
    if kind == "i" and array.dtype == np.int16:
        return array
    if kind in "iu":
        raise InvalidAudioError(
            f"{where}: samples of integer dtype {array.dtype} are not accepted; send float32 samples in "
            "[-1, 1] (write 0.0, not 0, in JSON), int16 PCM, or a wav file"
        )
    if kind != "f":
        raise InvalidAudioError(
            f"{where}: samples of dtype {array.dtype} are not audio; send float32 samples in [-1, 1], "
            "int16 PCM, or a wav file"
        )
    return array


def _checked_values(array: np.ndarray, where: str) -> np.ndarray:
    """Validated mono float32 samples in [-1, 1] (int16 PCM scaled by 1/32768)."""
    if array.dtype == np.int16:
        return (array.astype(np.float32) / np.float32(INT16_SCALE)).astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise InvalidAudioError(
            f"{where}: waveform has non-finite samples ({nan} NaN, {int(array.size - finite.sum() - nan)} "
            f"infinite; first at sample {int(np.argmin(finite))})"
        )
    peak = float(np.max(np.abs(array)))
    if peak > FLOAT_PEAK_LIMIT:
        raise InvalidAudioError(
            f"{where}: float samples reach {peak:g}, far outside [-1, 1]: this looks like int16 PCM passed "
            f"as float; divide by {INT16_SCALE:g} (or send int16 or a wav file)"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def parse_input(
    model_input: Any,
    *,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    max_duration_s: float = DEFAULT_LIMITS.max_duration_s,
    min_duration_s: float = DEFAULT_LIMITS.min_duration_s,
    max_total_duration_s: float = DEFAULT_LIMITS.max_total_duration_s,
    frame_s: float = 0.0,
) -> list[np.ndarray]:
    """The waveforms of a request (see the module docstring), each mono float32 in [-1, 1] at
    `sample_rate`; anything else raises InvalidAudioError naming the problem and the input's index.

    Lengths come first: every input's length (a wav file's from its header) is checked against the
    per-input limits and their sum against `max_total_duration_s` before any file is decoded or any
    sample converted. The minimum is max(min_duration_s, frame_s) (see Limits)."""
    limits = Limits(sample_rate, max_duration_s, min_duration_s, max_total_duration_s, frame_s)
    items = request_items(model_input)
    if not items:
        raise InvalidAudioError("empty request: no waveform or wav file given")
    measured: list[tuple[str, str, Any, int]] = []  # (kind, where, bytes or array, samples)
    for index, (kind, item) in enumerate(items):
        where = "input" if len(items) == 1 else f"input {index}"
        if kind == WAV_COLUMN:
            payload: Any = file_bytes(item, where)
            size = _wav_frames(payload, where, sample_rate)
        else:
            payload = _sample_array(item, where)
            size = int(payload.size)
        limits.check_length(size, where)
        measured.append((kind, where, payload, size))
    limits.check_total([size for *_, size in measured])
    return [
        _decode_wav(payload, where, size) if kind == WAV_COLUMN else _checked_values(payload, where)
        for kind, where, payload, size in measured
    ]
