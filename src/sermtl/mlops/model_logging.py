"""Log a system's fold (and seed) networks to MLflow as one pyfunc ensemble, the model the registry registers.

Apart from serving (what the model does with a request) and tracking (where runs go), which it joins.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc

from sermtl.mlops import serving, tracking
from sermtl.params import Params


def log_ensemble_model(
    train_dir: Path,
    system: str,
    folds: list[int] | int,
    params: Params,
    *,
    run_id: str,
    tracking_uri: str | None = None,
) -> str:
    """Log the ensemble of `system`'s fold (and seed) networks as a pyfunc into the existing run `run_id` (a
    LoggedModel named "ensemble" linked to it); returns its `models:/m-<id>` URI, ready for
    `tracking.register_model`. The run keeps its status (e.g. a study's parent run stays RUNNING)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    members, config = serving.ensemble_members(train_dir, system, folds, params)
    uri = tracking.resolve_uri(tracking_uri)
    mlflow_client = tracking.client(uri)
    run = mlflow_client.get_run(run_id)
    # The LoggedModel is created here and linked to the run as an output, instead of logging inside
    # `mlflow.start_run(run_id)`, whose exit would mark the run FINISHED (a study's parent is RUNNING).
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id,
        name=serving.ENSEMBLE_MODEL_NAME,
        source_run_id=run_id,
        tags={tracking.TAG_SYSTEM: system, tracking.TAG_KIND: "ensemble"},
        params={"system": system, "folds": json.dumps(config["folds"])},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="sermtl-serving-") as tmp:
            config_path = Path(tmp) / serving.SERVING_CONFIG_FILE
            config_path.write_text(json.dumps(config, indent=2) + "\n")
            artifacts = {serving.fold_artifact(k): str(path) for k, path in members.items()}
            artifacts[serving.CONFIG_ARTIFACT] = str(config_path)
            with tracking.fluent_tracking_uri(uri):
                info = mlflow.pyfunc.log_model(
                    name=serving.ENSEMBLE_MODEL_NAME,
                    model_id=logged.model_id,
                    python_model=serving.SerEnsemblePyfunc(),
                    artifacts=artifacts,
                    signature=serving.serving_signature(config["dimensions"], config["return_attention"]),
                    input_example=serving.example_waveform(config["sample_rate"]),
                    metadata={
                        "sermtl.kind": "neural",
                        "sermtl.system": system,
                        "sermtl.folds": config["folds"],
                        "sermtl.seeds": config["seeds"],
                        "sermtl.dimensions": config["dimensions"],
                        "sermtl.sample_rate": config["sample_rate"],
                        "sermtl.ensemble": config["ensemble"],
                        "sermtl.limits": {key: config[key] for key in serving.LIMIT_KEYS},
                    },
                    **tracking.model_packaging("neural"),
                )
    except BaseException:
        # log_model marks it FAILED itself once it has started; a dead server must not cost a second budget.
        with contextlib.suppress(Exception), tracking.quick_requests():
            mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return info.model_uri
