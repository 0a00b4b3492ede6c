"""A trained fold as an MLflow pyfunc that takes a waveform: its signature, pinned environment and shipped
code, logged inside the fold's child run and optionally registered (the ensemble: model_logging)."""

from __future__ import annotations

import contextlib
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from sermtl.evaluate.metrics import PROBABILITY_COLUMNS
from sermtl.mlops.serving import AudioPyfunc, serving_signature
from sermtl.mlops.tracking_server import client, fluent_tracking_uri, quick_requests, resolve_uri
from sermtl.schema import DIMENSIONS

MODEL_NAME = "model"


class SerModelPyfunc(AudioPyfunc):
    """A trained fold as an MLflow pyfunc: waveform(s) at the store's sample rate -> class and probabilities.

    The predictor is rebuilt by `train.training.load_predictor` from the run's model/ folder (shipped as
    the pyfunc artifact `model_dir`), so loading needs the sermtl package (the project image has it).
    Requests are parsed and checked by sermtl.mlops.serving (the same path as the registered ensemble, which
    is this with K members); the predict-time param `return_attention` adds the attention columns. The
    length limit is ServingParams' default (the fold model is not given params.yaml).
    """

    def load_context(self, context: Any) -> None:
        from sermtl.train.training import (
            load_predictor,  # lazy: torch is only needed when the model is loaded
        )

        predictor = load_predictor(Path(context.artifacts["model_dir"]))
        self.predictors = [predictor]
        self.sample_rate = int(getattr(predictor, "sample_rate", self.sample_rate))


def model_signature(dimensions: list[str] | tuple[str, ...] = DIMENSIONS) -> Any:
    """A fold model's signature: unnamed float32 (-1,) tensor in (a named TensorSpec breaks the PyTorch
    flavour), columns out, the `return_attention` param. (The registered ensemble has no input schema, so
    that it takes wav files as well: see sermtl.mlops.serving.)"""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    outputs = []
    for dimension in dimensions:
        outputs.append(ColSpec("long", f"{dimension}_class"))
        outputs += [ColSpec("double", f"{dimension}_{column}") for column in PROBABILITY_COLUMNS]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]),
        outputs=Schema(outputs),
        params=serving_signature(dimensions).params,
    )


def _pinned(*packages: str) -> list[str]:
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def model_requirements(kind: str) -> list[str]:
    """Explicit pip requirements: MLflow's inference would load the model in a subprocess (slow, and
    it cannot see sermtl.train.training stand-ins)."""
    common = ("mlflow", "numpy", "pandas", "pyarrow", "soundfile", "pyyaml", "scipy")
    extra = ("torch", "torchaudio") if kind == "neural" else ("scikit-learn", "joblib", "opensmile")
    return _pinned(*common, *extra)


def model_packaging(kind: str) -> dict[str, Any]:
    """log_model arguments that ship the code and pin the environment of a sermtl pyfunc."""
    import sermtl

    package = Path(sermtl.__file__).resolve().parent
    project = package.parents[1]
    return {
        "pip_requirements": model_requirements(kind),
        "code_paths": [str(package)],
        # The project's uv.lock, when there is one, pins the whole environment of the model.
        "uv_project_path": str(project) if (project / "uv.lock").is_file() else None,
    }


def log_fold_model(uri: str, run_id: str, model_dir: Path, kind: str, dimensions: list[str]) -> str:
    """Log the pyfunc inside the child run (MLflow 3 makes it a LoggedModel linked to the run)."""
    with fluent_tracking_uri(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=SerModelPyfunc(),
                artifacts={"model_dir": str(model_dir)},
                signature=model_signature(dimensions),
                metadata={"sermtl.kind": kind, "sermtl.dimensions": dimensions},
                **model_packaging(kind),
            )
        except BaseException:
            # not `with mlflow.start_run()`: its exit would spend a whole retry budget on a dead server
            with quick_requests(), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            raise
        mlflow.end_run()
    return info.model_uri


def register_model(
    model_uri: str, name: str, *, alias: str | None = None, tracking_uri: str | None = None
) -> str:
    """Register a fold's logged model (`models:/m-...`) as a new version of `name`; optionally alias it
    (aliases such as `champion` replace the removed stages). Returns the version."""
    uri = resolve_uri(tracking_uri)
    with fluent_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name)
    if alias:
        client(uri).set_registered_model_alias(name, alias, version.version)
    return str(version.version)
