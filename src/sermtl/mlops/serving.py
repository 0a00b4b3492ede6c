"""The model that gets registered and served (pickled MLflow models name its classes by this path); the
requests are parsed in serving_request and serving_input, serving.json made in serving_ensemble.

Design notes (why it is built this way): docs/design/serving.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from sermtl.evaluate.metrics import PROBABILITY_COLUMNS
from sermtl.mlops.serving_ensemble import (
    LIMIT_KEYS,
    SERVING_CONFIG_FILE,
    SERVING_FORMAT,
    ensemble_members,
    ordered_dimensions,
)
from sermtl.mlops.serving_input import (
    DEFAULT_LIMITS,
    DEFAULT_SAMPLE_RATE,
    FLOAT_PEAK_LIMIT,
    INT16_SCALE,
    Limits,
    parse_input,
)
from sermtl.mlops.serving_request import (
    MAX_CHANNELS_GUESS,
    MAX_ECHO_CHARS,
    RETURN_ATTENTION,
    WAV_COLUMN,
    WAVEFORM_COLUMN,
    InvalidAudioError,
    return_attention_param,
)
from sermtl.schema import DIMENSIONS

__all__ = [  # this module's names and those of the request parsing and serving.json it re-exports
    "ATTENTION_SUFFIX",
    "CONFIG_ARTIFACT",
    "ENSEMBLE_MODEL_NAME",
    "EXAMPLE_SECONDS",
    "FLOAT_PEAK_LIMIT",
    "INT16_SCALE",
    "LIMIT_KEYS",
    "MAX_CHANNELS_GUESS",
    "MAX_ECHO_CHARS",
    "RETURN_ATTENTION",
    "SERVING_CONFIG_FILE",
    "SERVING_FORMAT",
    "WAVEFORM_COLUMN",
    "WAV_COLUMN",
    "AudioPyfunc",
    "InvalidAudioError",
    "Limits",
    "SerEnsemblePyfunc",
    "attention_columns",
    "ensemble_members",
    "example_waveform",
    "fold_artifact",
    "front_end_frame_s",
    "output_columns",
    "parse_input",
    "predict_frame",
    "return_attention_param",
    "serving_signature",
]

CONFIG_ARTIFACT = "serving_config"
ENSEMBLE_MODEL_NAME = "ensemble"  # name of the LoggedModel inside the run
ATTENTION_SUFFIX = "_attention"
EXAMPLE_SECONDS = 0.5


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
        dims = list(dimensions) if dimensions else ordered_dimensions(list(results[0]))
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
    sample_rate: int = DEFAULT_SAMPLE_RATE
    max_duration_s: float = DEFAULT_LIMITS.max_duration_s
    min_duration_s: float = DEFAULT_LIMITS.min_duration_s
    max_total_duration_s: float = DEFAULT_LIMITS.max_total_duration_s
    # Not checked here (the body is parsed before the model sees it): read by `sermtl serve`
    # (sermtl.mlops.scoring), which refuses larger request bodies with 413 before they are parsed.
    max_request_bytes: int = DEFAULT_LIMITS.max_request_bytes
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
        self.min_duration_s = float(config.get("min_duration_s", DEFAULT_LIMITS.min_duration_s))
        self.max_total_duration_s = float(
            config.get("max_total_duration_s", DEFAULT_LIMITS.max_total_duration_s)
        )
        self.max_request_bytes = int(config.get("max_request_bytes", DEFAULT_LIMITS.max_request_bytes))
        self.frame_s = float(config.get("frame_s", 0.0))
        self.return_attention = bool(config.get("return_attention", False))
        self.dimensions = ordered_dimensions(config["dimensions"])


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
