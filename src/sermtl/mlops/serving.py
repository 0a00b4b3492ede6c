"""The model that gets registered and served, and the one place where requests for it are parsed.

Design notes (why it is built this way): docs/design/serving.md.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from sermtl.evaluate.metrics import PROBABILITY_COLUMNS
from sermtl.params import DataParams, Params, ServingParams
from sermtl.schema import CLASS_NAMES, DIMENSIONS, MODEL_DIR, run_dir

SERVING_FORMAT = 1
SERVING_CONFIG_FILE = "serving.json"
CONFIG_ARTIFACT = "serving_config"
ENSEMBLE_MODEL_NAME = "ensemble"  # name of the LoggedModel inside the run
WAVEFORM_COLUMN = "waveform"
WAV_COLUMN = "wav"
RETURN_ATTENTION = "return_attention"
ATTENTION_SUFFIX = "_attention"
INT16_SCALE = 32768.0
# Float audio may overshoot 1.0 a little (resampling ringing, inter-sample peaks); beyond this peak it is
# not float audio at all but (most likely) int16 PCM sent as floats.
FLOAT_PEAK_LIMIT = 2.0
EXAMPLE_SECONDS = 0.5
MAX_ECHO_CHARS = 200  # of the request, in the message of a refused one (see InvalidAudioError)
MAX_CHANNELS_GUESS = 8  # a 2-D array (n, c) with n > c and c <= this is multi-channel audio, not a batch

_DEFAULT_SAMPLE_RATE = DataParams().sample_rate
_DEFAULT_LIMITS = ServingParams()
# serving.json keys of the request limits (also in the MLmodel metadata as sermtl.limits)
LIMIT_KEYS = ("max_duration_s", "min_duration_s", "max_total_duration_s", "max_request_bytes")


class InvalidAudioError(MlflowException, ValueError):
    """A request the model cannot take; HTTP 400 with this message from MLflow's scoring server."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    # MLflow's scoring server re-sets the message to "Failed to predict data '<the request>'. \nError:
    # <message>": for a wav file sent as base64 text that echoes the whole file back in the 400 response.
    # The reason stays whole; the echo of the request is cut to MAX_ECHO_CHARS.
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        reason = getattr(self, "_reason", None)
        if reason is None:
            self._reason = value
        elif value.endswith(reason) and len(value) - len(reason) > MAX_ECHO_CHARS:
            value = f"{value[:MAX_ECHO_CHARS]}...'. \nError: {reason}"
        self._message = value


def fold_artifact(fold: int) -> str:
    return f"fold{fold}"


def output_columns(dimensions: Sequence[str] = DIMENSIONS) -> list[str]:
    """`<dimension>_class` then `<dimension>_prob_<class>` per dimension: the pyfunc's output columns."""
    columns = []
    for dimension in dimensions:
        columns.append(f"{dimension}_class")
        columns += [f"{dimension}_{column}" for column in PROBABILITY_COLUMNS]
    return columns


def attention_columns(dimensions: Sequence[str] = DIMENSIONS) -> list[str]:
    return [f"{dimension}{ATTENTION_SUFFIX}" for dimension in dimensions]


def _ordered(dimensions: Sequence[str]) -> list[str]:
    return [d for d in DIMENSIONS if d in dimensions] + [d for d in dimensions if d not in DIMENSIONS]


# --- parsing requests ---------------------------------------------------------------------------------

_FILE_TYPES = (bytes, bytearray, memoryview, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number | np.bool_)


def _items(model_input: Any) -> list[tuple[str, Any]]:
    """The request as (kind, item) pairs: kind "wav" (bytes or base64 text) or "waveform" (samples)."""
    if model_input is None:
        raise InvalidAudioError("empty request: no waveform or wav file given")
    if isinstance(model_input, _FILE_TYPES):
        return [(WAV_COLUMN, model_input)]
    if _is_number(model_input):
        raise InvalidAudioError("a single number is not a waveform: send an array of samples")
    if isinstance(model_input, pd.DataFrame):
        return _frame_items(model_input)
    if isinstance(model_input, pd.Series):
        return [_cell(cell) for cell in model_input.tolist()]
    if isinstance(model_input, dict):
        unknown = sorted(str(k) for k in model_input if k not in (WAVEFORM_COLUMN, WAV_COLUMN))
        if unknown or len(model_input) != 1:
            raise InvalidAudioError(
                f"expected exactly one of the keys '{WAVEFORM_COLUMN}' (samples) or '{WAV_COLUMN}' "
                f"(wav files); got {sorted(str(k) for k in model_input)}"
            )
        ((key, value),) = model_input.items()
        if key == WAV_COLUMN:
            # never through np.asarray: a bytes ("S") array drops the trailing NUL bytes of a file
            files = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else value
            files = [files] if isinstance(files, _FILE_TYPES) else list(files)
            for index, item in enumerate(files):
                if not isinstance(item, _FILE_TYPES):
                    raise InvalidAudioError(
                        f"input {index}: '{WAV_COLUMN}' holds wav files (bytes or base64 text), "
                        f"got {type(item).__name__}"
                    )
            return [(WAV_COLUMN, item) for item in files]
        if isinstance(value, _FILE_TYPES):
            raise InvalidAudioError(
                f"'{WAVEFORM_COLUMN}' holds arrays of samples; send wav files under '{WAV_COLUMN}'"
            )
        return [(WAVEFORM_COLUMN, item) for _, item in _items(value)]
    if isinstance(model_input, list | tuple):
        if not model_input:
            return []
        if all(isinstance(item, _FILE_TYPES) for item in model_input):
            return [(WAV_COLUMN, item) for item in model_input]
        if all(_is_number(item) for item in model_input):
            return [(WAVEFORM_COLUMN, np.asarray(model_input))]
        return [_cell(item) for item in model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind == "S":
            raise InvalidAudioError(
                "a fixed-width bytes array (numpy dtype S) drops the trailing zero bytes of a file: pass "
                "wav files as a list of bytes, an object array, or base64 text"
            )
        if model_input.dtype.kind == "U":
            return [(WAV_COLUMN, item) for item in model_input.reshape(-1).tolist()]
        if model_input.dtype == object:
            if model_input.ndim == 0:
                return _items(model_input.item())
            return [_cell(item) for item in model_input.reshape(-1)]
        if model_input.ndim == 0:
            raise InvalidAudioError("a single number is not a waveform: send an array of samples")
        if model_input.ndim == 1:
            return [(WAVEFORM_COLUMN, model_input)]
        if model_input.ndim == 2:
            rows, columns = model_input.shape
            if columns == 1:  # (samples, 1): one mono waveform as soundfile's always_2d gives it
                return [(WAVEFORM_COLUMN, model_input[:, 0])]
            if rows > columns and columns <= MAX_CHANNELS_GUESS:
                raise InvalidAudioError(
                    f"an array of shape {model_input.shape} looks like (samples, channels) audio: send mono "
                    "(a batch is one waveform per row)"
                )
            return [(WAVEFORM_COLUMN, row) for row in model_input]
        raise InvalidAudioError(
            f"expected one waveform (1-D) or a batch of them (2-D); got an array of shape {model_input.shape}"
        )
    raise InvalidAudioError(
        f"unsupported input of type {type(model_input).__name__}: send samples, wav bytes or a DataFrame "
        f"with a '{WAVEFORM_COLUMN}' or '{WAV_COLUMN}' column"
    )


def _cell(item: Any) -> tuple[str, Any]:
    return (WAV_COLUMN, item) if isinstance(item, _FILE_TYPES) else (WAVEFORM_COLUMN, item)


def _frame_items(frame: pd.DataFrame) -> list[tuple[str, Any]]:
    columns = [str(c) for c in frame.columns]
    if WAVEFORM_COLUMN in columns and WAV_COLUMN in columns:
        raise InvalidAudioError(f"give either a '{WAVEFORM_COLUMN}' or a '{WAV_COLUMN}' column, not both")
    if WAV_COLUMN in columns:
        cells = frame[WAV_COLUMN].tolist()
        for index, cell in enumerate(cells):
            if not isinstance(cell, _FILE_TYPES):
                raise InvalidAudioError(
                    f"input {index}: the '{WAV_COLUMN}' column holds wav files (bytes or base64 text), "
                    f"got {type(cell).__name__}"
                )
        return [(WAV_COLUMN, cell) for cell in cells]
    if WAVEFORM_COLUMN in columns:
        cells = frame[WAVEFORM_COLUMN].tolist()
        for index, cell in enumerate(cells):
            if isinstance(cell, _FILE_TYPES):
                raise InvalidAudioError(
                    f"input {index}: the '{WAVEFORM_COLUMN}' column holds arrays of samples; "
                    f"send wav files in a '{WAV_COLUMN}' column"
                )
        return [(WAVEFORM_COLUMN, cell) for cell in cells]
    if len(columns) > 1 and all(pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes):
        return [(WAVEFORM_COLUMN, row) for row in frame.to_numpy()]  # one waveform per row
    if len(columns) == 1:
        return [_cell(cell) for cell in frame.iloc[:, 0].tolist()]
    raise InvalidAudioError(
        f"expected a '{WAVEFORM_COLUMN}' column (arrays of samples) or a '{WAV_COLUMN}' column (wav files); "
        f"got columns {columns}"
    )


def _file_bytes(item: Any, where: str) -> bytes:
    if isinstance(item, str):
        text = item.strip()
        if text.startswith("data:") and "," in text:  # a data: URL (data:audio/wav;base64,....)
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidAudioError(f"{where}: a wav file as text must be base64; {exc}") from exc
    return bytes(item)


@dataclass(frozen=True)
class Limits:
    """How much audio a request may hold (serving.json records them with the model; see ensemble_members).

    `min_duration_s` is the effective minimum, at least one frame of the networks' front end (`frame_s`):
    shorter audio would be one zero-padded frame, whose probabilities mean nothing."""

    sample_rate: int = _DEFAULT_SAMPLE_RATE
    max_duration_s: float = _DEFAULT_LIMITS.max_duration_s
    min_duration_s: float = _DEFAULT_LIMITS.min_duration_s
    max_total_duration_s: float = _DEFAULT_LIMITS.max_total_duration_s
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
    if isinstance(samples, _FILE_TYPES):
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
    sample_rate: int = _DEFAULT_SAMPLE_RATE,
    max_duration_s: float = _DEFAULT_LIMITS.max_duration_s,
    min_duration_s: float = _DEFAULT_LIMITS.min_duration_s,
    max_total_duration_s: float = _DEFAULT_LIMITS.max_total_duration_s,
    frame_s: float = 0.0,
) -> list[np.ndarray]:
    """The waveforms of a request (see the module docstring), each mono float32 in [-1, 1] at
    `sample_rate`; anything else raises InvalidAudioError naming the problem and the input's index.

    Lengths come first: every input's length (a wav file's from its header) is checked against the
    per-input limits and their sum against `max_total_duration_s` before any file is decoded or any
    sample converted. The minimum is max(min_duration_s, frame_s) (see Limits)."""
    limits = Limits(sample_rate, max_duration_s, min_duration_s, max_total_duration_s, frame_s)
    items = _items(model_input)
    if not items:
        raise InvalidAudioError("empty request: no waveform or wav file given")
    measured: list[tuple[str, str, Any, int]] = []  # (kind, where, bytes or array, samples)
    for index, (kind, item) in enumerate(items):
        where = "input" if len(items) == 1 else f"input {index}"
        if kind == WAV_COLUMN:
            payload: Any = _file_bytes(item, where)
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


def return_attention_param(params: dict[str, Any] | None, default: bool) -> bool:
    """`return_attention` of the predict-time params (MLflow has validated it when served)."""
    params = params or {}
    unknown = sorted(set(params) - {RETURN_ATTENTION})
    if unknown:
        raise InvalidAudioError(f"unknown param(s) {', '.join(unknown)}; known: {RETURN_ATTENTION}")
    value = params.get(RETURN_ATTENTION, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool | np.bool_):
        raise InvalidAudioError(f"param {RETURN_ATTENTION} must be true or false, got {value!r}")
    return bool(value)


# --- predicting ---------------------------------------------------------------------------------------


def _mean_attention(weights: list[Any]) -> list[float] | None:
    if any(w is None for w in weights):
        return None
    arrays = [np.asarray(w, dtype=np.float64).reshape(-1) for w in weights]
    if len({a.size for a in arrays}) != 1:
        raise RuntimeError(
            f"ensemble members framed the audio differently: {[a.size for a in arrays]} frames"
        )
    return [float(v) for v in np.mean(arrays, axis=0)]


def predict_frame(
    predictors: Sequence[Any],
    waveforms: Sequence[np.ndarray],
    dimensions: Sequence[str] | None = None,
    return_attention: bool = False,
) -> pd.DataFrame:
    """One row per waveform: class (argmax of the members' mean probabilities) and mean probabilities per
    dimension, and the members' mean attention per dimension when asked."""
    rows = []
    for waveform in waveforms:
        results = [predictor.predict(waveform) for predictor in predictors]
        dims = list(dimensions) if dimensions else _ordered(list(results[0]))
        row: dict[str, Any] = {}
        for dimension in dims:
            probabilities = np.mean([r[dimension]["probabilities"] for r in results], axis=0)
            row[f"{dimension}_class"] = int(np.argmax(probabilities))
            for column, probability in zip(PROBABILITY_COLUMNS, probabilities, strict=True):
                row[f"{dimension}_{column}"] = float(probability)
        if return_attention:
            for dimension in dims:
                row[f"{dimension}{ATTENTION_SUFFIX}"] = _mean_attention(
                    [r[dimension].get("attention") for r in results]
                )
        rows.append(row)
    return pd.DataFrame(rows)


def front_end_frame_s(predictor: Any) -> float:
    """Seconds of audio in one frame of a predictor's networks (the longest); 0 when it has none (the
    eGeMAPS baseline, test stand-ins)."""
    frames = [0.0]
    for network in getattr(predictor, "networks", {}).values():
        config = getattr(network, "config", None)
        if config is not None and getattr(config, "sample_rate", 0):
            frames.append(config.frame_samples / config.sample_rate)
    return max(frames)


class AudioPyfunc(mlflow.pyfunc.PythonModel):
    """Shared predict of the served models: parse the request (`parse_input`), run every member
    predictor (one for a fold model, K for the ensemble), average. Subclasses load the members."""

    predictors: list[Any]
    sample_rate: int = _DEFAULT_SAMPLE_RATE
    max_duration_s: float = _DEFAULT_LIMITS.max_duration_s
    min_duration_s: float = _DEFAULT_LIMITS.min_duration_s
    max_total_duration_s: float = _DEFAULT_LIMITS.max_total_duration_s
    # Not checked here (the body is parsed before the model sees it): read by `sermtl serve`
    # (sermtl.mlops.scoring), which refuses larger request bodies with 413 before they are parsed.
    max_request_bytes: int = _DEFAULT_LIMITS.max_request_bytes
    frame_s: float = 0.0  # the front end's frame; 0: taken from the members' networks
    return_attention: bool = False
    dimensions: list[str] | None = None

    def limits(self) -> Limits:
        """The request limits; the minimum is at least one frame of every member's front end."""
        frame_s = max([self.frame_s, *(front_end_frame_s(p) for p in getattr(self, "predictors", []))])
        return Limits(
            self.sample_rate, self.max_duration_s, self.min_duration_s, self.max_total_duration_s, frame_s
        )

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One row per input waveform; see the module docstring for the input contract and columns.

        (np.ndarray is one of the hints from which MLflow infers no schema: the explicit signature rules.)
        """
        attention = return_attention_param(params, self.return_attention)
        limits = self.limits()
        waveforms = parse_input(
            model_input,
            sample_rate=limits.sample_rate,
            max_duration_s=limits.max_duration_s,
            min_duration_s=limits.min_duration_s,
            max_total_duration_s=limits.max_total_duration_s,
            frame_s=limits.frame_s,
        )
        return predict_frame(self.predictors, waveforms, self.dimensions, attention)


class SerEnsemblePyfunc(AudioPyfunc):
    """The registered model: the K fold models of one system (each with its seeds' networks),
    probabilities averaged.

    Artifacts: `fold<k>` (each fold's model/ folder, rebuilt by sermtl.train.training.load_predictor) and
    `serving_config` (serving.json: format, system, folds, sample_rate, the request limits
    max_duration_s, min_duration_s (already at least one frame), max_total_duration_s and
    max_request_bytes, return_attention, dimensions, frame_s, frame_hop_s, class_names). Loading needs the
    sermtl package (shipped as code_paths).
    """

    def load_context(self, context: Any) -> None:
        from sermtl.train.training import (
            load_predictor,  # lazy: torch is only needed when the model is loaded
        )

        config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        if config.get("format") != SERVING_FORMAT:
            raise MlflowException(f"{SERVING_CONFIG_FILE}: unsupported format {config.get('format')!r}")
        predictors = [load_predictor(Path(context.artifacts[fold_artifact(k)])) for k in config["folds"]]
        self.configure(predictors, config)

    def configure(self, predictors: list[Any], config: dict[str, Any]) -> None:
        """Members and settings (from serving.json); a member at another sample rate is an error."""
        if not predictors:
            raise MlflowException("an ensemble needs at least one member")
        for fold, predictor in zip(config.get("folds", range(len(predictors))), predictors, strict=True):
            rate = getattr(predictor, "sample_rate", config["sample_rate"])
            if rate != config["sample_rate"]:
                raise MlflowException(
                    f"fold {fold}: network expects {rate} Hz but serving.json says {config['sample_rate']} Hz"
                )
        self.predictors = list(predictors)
        self.sample_rate = int(config["sample_rate"])
        self.max_duration_s = float(config["max_duration_s"])
        # serving.json of models logged before these limits existed lacks them: ServingParams' defaults
        self.min_duration_s = float(config.get("min_duration_s", _DEFAULT_LIMITS.min_duration_s))
        self.max_total_duration_s = float(
            config.get("max_total_duration_s", _DEFAULT_LIMITS.max_total_duration_s)
        )
        self.max_request_bytes = int(config.get("max_request_bytes", _DEFAULT_LIMITS.max_request_bytes))
        self.frame_s = float(config.get("frame_s", 0.0))
        self.return_attention = bool(config.get("return_attention", False))
        self.dimensions = _ordered(config["dimensions"])


def serving_signature(dimensions: Sequence[str] = DIMENSIONS, return_attention: bool = False) -> Any:
    """No input schema (see the module docstring), the output columns (attention ones optional) and the
    `return_attention` param with its default."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    outputs = []
    for dimension in dimensions:
        outputs.append(ColSpec(DataType.long, f"{dimension}_class"))
        outputs += [ColSpec(DataType.double, f"{dimension}_{column}") for column in PROBABILITY_COLUMNS]
    outputs += [
        ColSpec(Array(DataType.double), name, required=False) for name in attention_columns(dimensions)
    ]
    return ModelSignature(
        inputs=None,
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec(RETURN_ATTENTION, DataType.boolean, bool(return_attention))]),
    )


def example_waveform(sample_rate: int, seconds: float = EXAMPLE_SECONDS) -> np.ndarray:
    """A deterministic half second of a quiet harmonic tone: the logged input example."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    tone = 0.1 * np.sin(2 * np.pi * 150 * t) + 0.05 * np.sin(2 * np.pi * 300 * t)
    return (tone * np.hanning(t.size)).astype(np.float32)


# --- logging the ensemble -----------------------------------------------------------------------------


def _fold_list(folds: list[int] | int) -> list[int]:
    if isinstance(folds, bool) or not isinstance(folds, int | list | tuple):
        raise ValueError(f"folds: expected a count or a list of fold indices, got {folds!r}")
    chosen = list(range(folds)) if isinstance(folds, int) else [int(k) for k in folds]
    if not chosen:
        raise ValueError("folds: an ensemble needs at least one fold")
    if len(set(chosen)) != len(chosen) or min(chosen) < 0:
        raise ValueError(f"folds: expected distinct non-negative fold indices, got {chosen}")
    return chosen


def ensemble_members(
    train_dir: Path, system: str, folds: list[int] | int, params: Params
) -> tuple[dict[int, Path], dict[str, Any]]:
    """{fold: model dir} of a trained neural system and its serving.json; errors name what is wrong."""
    from sermtl.train.training import MODEL_FORMATS

    spec = params.systems.get(system)
    if spec is None:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(params.systems)}")
    if spec.kind != "neural":
        raise ValueError(
            f"system {system!r} is of kind {spec.kind!r}: only neural systems can be served as an ensemble "
            "(the eGeMAPS baseline's model/ holds scikit-learn pipelines over openSMILE features, with no "
            "predictor that takes audio)"
        )
    members: dict[int, Path] = {}
    dimensions: list[str] | None = None
    framing: set[tuple[int, int]] = set()
    seeds: list[int] | None = None
    networks = 0
    for fold in _fold_list(folds):
        model_dir = run_dir(train_dir, system, fold) / MODEL_DIR
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; has fold {fold} of {system} been trained?")
        description = json.loads(config_path.read_text())
        if description.get("format") not in MODEL_FORMATS:
            raise ValueError(f"{config_path}: unsupported model format {description.get('format')!r}")
        fold_seeds = [int(seed) for seed in description.get("seeds", [])]  # format 1: one unnamed seed
        if seeds is None:
            seeds = fold_seeds
        elif fold_seeds != seeds:
            raise ValueError(
                f"{config_path}: networks of seeds {fold_seeds}, other folds have seeds {seeds}; an "
                "ensemble averages the same seeds in every fold (retrain the folds with one train.seeds)"
            )
        networks += len(description["networks"])
        if description.get("system", system) != system:
            raise ValueError(f"{config_path}: a model of system {description['system']!r}, not {system!r}")
        if dimensions is None:
            dimensions = list(description["dimensions"])
        elif set(description["dimensions"]) != set(dimensions):
            raise ValueError(
                f"{config_path}: dimensions {description['dimensions']} differ from {dimensions}"
            )
        for network in description["networks"].values():
            config = network["config"]
            if int(config["sample_rate"]) != params.data.sample_rate:
                raise ValueError(
                    f"{config_path}: network trained at {config['sample_rate']} Hz but "
                    f"data.sample_rate is {params.data.sample_rate} Hz"
                )
            framing.add((int(config["frame_samples"]), int(config["hop_samples"])))
        members[fold] = model_dir
    if len(framing) != 1:
        raise ValueError(f"{system}: fold networks frame the audio differently {sorted(framing)}")
    ((frame_samples, hop_samples),) = framing
    rate = params.data.sample_rate
    limits = params.serving
    # The served model's own limits, so that it needs no params.yaml when served: the minimum is raised
    # to one frame of the front end (shorter audio is a single zero-padded frame).
    min_duration_s = max(float(limits.min_duration_s), frame_samples / rate)
    if not 0 < min_duration_s <= min(limits.max_duration_s, limits.max_total_duration_s):
        raise ValueError(
            f"serving: the minimum duration ({min_duration_s:g} s: serving.min_duration_s "
            f"{limits.min_duration_s:g} s or one {frame_samples / rate:g} s frame) must be positive and "
            f"at most serving.max_duration_s ({limits.max_duration_s:g} s) and "
            f"serving.max_total_duration_s ({limits.max_total_duration_s:g} s)"
        )
    if limits.max_request_bytes <= 0:
        raise ValueError(f"serving.max_request_bytes must be positive, got {limits.max_request_bytes}")
    config = {
        "format": SERVING_FORMAT,
        "system": system,
        "folds": list(members),
        "sample_rate": rate,
        "max_duration_s": float(limits.max_duration_s),
        "min_duration_s": min_duration_s,
        "max_total_duration_s": float(limits.max_total_duration_s),
        "max_request_bytes": int(limits.max_request_bytes),
        "return_attention": bool(limits.return_attention),
        "dimensions": _ordered(dimensions or []),
        "class_names": list(CLASS_NAMES),
        "frame_s": frame_samples / rate,
        "frame_hop_s": hop_samples / rate,
        "seeds": seeds or [],
        "networks": networks,
        "ensemble": (
            "mean of the fold and seed networks' class probabilities (class = argmax) and attention weights"
        ),
    }
    return members, config
