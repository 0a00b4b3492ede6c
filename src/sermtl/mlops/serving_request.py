"""The shapes a request to the served model may take (arrays, lists, dicts, DataFrames; wav files as bytes
or base64 text), reduced to one list of inputs, and the error for a request the model cannot take.

Design notes (why it is built this way): docs/design/serving.md.
"""

from __future__ import annotations

import base64
import binascii
import numbers
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

WAVEFORM_COLUMN = "waveform"
WAV_COLUMN = "wav"
RETURN_ATTENTION = "return_attention"
MAX_ECHO_CHARS = 200  # of the request, in the message of a refused one (see InvalidAudioError)
MAX_CHANNELS_GUESS = 8  # a 2-D array (n, c) with n > c and c <= this is multi-channel audio, not a batch
FILE_TYPES = (bytes, bytearray, memoryview, str)  # a wav file: its bytes, or base64 text


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


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number | np.bool_)


def request_items(model_input: Any) -> list[tuple[str, Any]]:
    """The request as (kind, item) pairs: kind "wav" (bytes or base64 text) or "waveform" (samples)."""
    if model_input is None:
        raise InvalidAudioError("empty request: no waveform or wav file given")
    if isinstance(model_input, FILE_TYPES):
        return [(WAV_COLUMN, model_input)]
    if _is_number(model_input):
        raise InvalidAudioError("a single number is not a waveform: send an array of samples")
    if isinstance(model_input, pd.DataFrame):
        return _frame_items(model_input)
    if isinstance(model_input, pd.Series):
        return [_cell(cell) for cell in model_input.tolist()]
    if isinstance(model_input, dict):
        return _dict_items(model_input)
    if isinstance(model_input, list | tuple):
        if not model_input:
            return []
        if all(isinstance(item, FILE_TYPES) for item in model_input):
            return [(WAV_COLUMN, item) for item in model_input]
        if all(_is_number(item) for item in model_input):
            return [(WAVEFORM_COLUMN, np.asarray(model_input))]
        return [_cell(item) for item in model_input]
    if isinstance(model_input, np.ndarray):
        return _array_items(model_input)
    raise InvalidAudioError(
        f"unsupported input of type {type(model_input).__name__}: send samples, wav bytes or a DataFrame "
        f"with a '{WAVEFORM_COLUMN}' or '{WAV_COLUMN}' column"
    )


def _dict_items(model_input: dict) -> list[tuple[str, Any]]:
    """{"waveform": samples or a batch} or {"wav": files}."""
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
        files = [files] if isinstance(files, FILE_TYPES) else list(files)
        for index, item in enumerate(files):
            if not isinstance(item, FILE_TYPES):
                raise InvalidAudioError(
                    f"input {index}: '{WAV_COLUMN}' holds wav files (bytes or base64 text), "
                    f"got {type(item).__name__}"
                )
        return [(WAV_COLUMN, item) for item in files]
    if isinstance(value, FILE_TYPES):
        raise InvalidAudioError(
            f"'{WAVEFORM_COLUMN}' holds arrays of samples; send wav files under '{WAV_COLUMN}'"
        )
    return [(WAVEFORM_COLUMN, item) for _, item in request_items(value)]


def _array_items(model_input: np.ndarray) -> list[tuple[str, Any]]:
    """One waveform (1-D), a batch (2-D: one per row), text (base64 files) or objects (one input each)."""
    if model_input.dtype.kind == "S":
        raise InvalidAudioError(
            "a fixed-width bytes array (numpy dtype S) drops the trailing zero bytes of a file: pass "
            "wav files as a list of bytes, an object array, or base64 text"
        )
    if model_input.dtype.kind == "U":
        return [(WAV_COLUMN, item) for item in model_input.reshape(-1).tolist()]
    if model_input.dtype == object:
        if model_input.ndim == 0:
            return request_items(model_input.item())
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


def _cell(item: Any) -> tuple[str, Any]:
    return (WAV_COLUMN, item) if isinstance(item, FILE_TYPES) else (WAVEFORM_COLUMN, item)


def _frame_items(frame: pd.DataFrame) -> list[tuple[str, Any]]:
    columns = [str(c) for c in frame.columns]
    if WAVEFORM_COLUMN in columns and WAV_COLUMN in columns:
        raise InvalidAudioError(f"give either a '{WAVEFORM_COLUMN}' or a '{WAV_COLUMN}' column, not both")
    if WAV_COLUMN in columns:
        cells = frame[WAV_COLUMN].tolist()
        for index, cell in enumerate(cells):
            if not isinstance(cell, FILE_TYPES):
                raise InvalidAudioError(
                    f"input {index}: the '{WAV_COLUMN}' column holds wav files (bytes or base64 text), "
                    f"got {type(cell).__name__}"
                )
        return [(WAV_COLUMN, cell) for cell in cells]
    if WAVEFORM_COLUMN in columns:
        cells = frame[WAVEFORM_COLUMN].tolist()
        for index, cell in enumerate(cells):
            if isinstance(cell, FILE_TYPES):
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


def file_bytes(item: Any, where: str) -> bytes:
    """A wav file's bytes, from bytes or base64 text (a data: URL too)."""
    if isinstance(item, str):
        text = item.strip()
        if text.startswith("data:") and "," in text:  # a data: URL (data:audio/wav;base64,....)
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidAudioError(f"{where}: a wav file as text must be base64; {exc}") from exc
    return bytes(item)


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
