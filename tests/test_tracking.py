"""MLflow tracking of a study against real `mlflow server` processes on loopback.

Two servers boot in the background at module start (sqlite backend; artifacts in a folder, and on the
real SeaweedFS S3 server), so their ~10-20 s start overlaps the sqlite-only test. The run directories
are fabricated but follow the training contract; the predictor behind the pyfunc is a stand-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sermtl_localstack import MlflowServer

import sermtl
from sermtl.data.audio import AudioStore
from sermtl.data.ingest import ingest
from sermtl.data.synth import synthesize
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, evaluate_predictions, flat_metrics
from sermtl.evaluate.results import results_table, to_html, to_markdown
from sermtl.mlops import fold_run, tracking
from sermtl.params import Params
from sermtl.schema import DIMENSIONS

pytestmark = pytest.mark.slow

BUCKET = "mlflow-artifacts"
EPOCHS = [1, 2, 3, 4]
HOP_S = 0.01


# --- a stand-in for sermtl.train.training.load_predictor ---------------------------------------------------


class FakePredictor:
    """Deterministic outputs from the waveform length and model/config.json (proves the dir was shipped)."""

    def __init__(self, model_dir: Path) -> None:
        self.offset = json.loads((Path(model_dir) / "config.json").read_text())["offset"]

    def predict(self, waveform: np.ndarray) -> dict:
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        out = {}
        for i, dimension in enumerate(DIMENSIONS):
            cls = (waveform.size + i + self.offset) % 3
            probabilities = [0.1, 0.1, 0.1]
            probabilities[cls] = 0.8
            out[dimension] = {"class": cls, "probabilities": probabilities, "attention": None}
        return out


@pytest.fixture
def fake_training(monkeypatch):
    try:
        import sermtl.train.training as training
    except Exception:  # not written yet, or mid-edit
        training = types.ModuleType("sermtl.train.training")
        monkeypatch.setitem(sys.modules, "sermtl.train.training", training)
        monkeypatch.setattr(sermtl, "training", training, raising=False)
    monkeypatch.setattr(training, "load_predictor", FakePredictor, raising=False)


# --- servers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def servers(tmp_path_factory, request):
    """Start both MLflow servers without waiting; tests that need one wait for it."""
    with contextlib.ExitStack() as stack:
        local = MlflowServer(tmp_path_factory.mktemp("mlflow-local"))
        stack.callback(local.stop)
        local.start(wait=False)
        s3 = request.getfixturevalue("s3_server")
        import boto3

        boto3.client("s3", **_boto_kwargs(s3)).create_bucket(Bucket=BUCKET)
        remote = MlflowServer(
            tmp_path_factory.mktemp("mlflow-s3"),
            artifacts_destination=f"s3://{BUCKET}/mlflow",
            env=s3.client_env(),
        )
        stack.callback(remote.stop)
        stack.callback(local.terminate)  # callbacks run last-in first-out: both are signalled first
        stack.callback(remote.terminate)
        remote.start(wait=False)
        yield {"local": local, "s3": remote, "s3_server": s3, "started": time.monotonic()}


def _boto_kwargs(s3) -> dict:
    return {
        "endpoint_url": s3.endpoint_url,
        "aws_access_key_id": s3.access_key,
        "aws_secret_access_key": s3.secret_key,
        "region_name": "us-east-1",
    }


@pytest.fixture
def local_server(servers, monkeypatch) -> MlflowServer:
    server = servers["local"].wait_ready()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
    return server


# --- fabricated study ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synthesize(root / "IEMOCAP_full_release", utterances=60, mean_duration_s=0.8)
    ingest(str(root / "IEMOCAP_full_release"), root / "store", Params(), progress=False)
    return root / "store"


def _write_run(path: Path, system: str, kind: str, store: AudioStore, *, offset: int) -> None:
    fold = 0
    test = store.manifest[store.manifest["session"] == fold + 1].reset_index(drop=True)
    rows = []
    for d, dimension in enumerate(DIMENSIONS):
        for i, row in test.iterrows():
            label = int(row[f"{dimension}_class"])
            prediction = label if (i + d) % 3 else (label + 1) % 3
            probabilities = np.full(3, 0.15)
            probabilities[prediction] = 0.7
            rows.append(
                {
                    "utterance_id": row["utterance_id"],
                    "system": system,
                    "fold": fold,
                    "test_session": fold + 1,
                    "dimension": dimension,
                    "improvised": bool(row["improvised"]),
                    "label": label,
                    "prediction": prediction,
                    "prob_low": probabilities[0],
                    "prob_medium": probabilities[1],
                    "prob_high": probabilities[2],
                }
            )
    frame = pd.DataFrame(rows).astype(PREDICTION_COLUMNS)
    path.mkdir(parents=True)
    frame.to_parquet(path / "predictions.parquet", index=False)
    params = Params()
    metrics = {
        "system": system,
        "kind": kind,
        "fold": fold,
        "test_session": fold + 1,
        "validation_speaker": "Ses02_F",
        "evaluation": evaluate_predictions(frame),
        "validation": {d: 0.4 + 0.1 * i for i, d in enumerate(DIMENSIONS)},
        "train_seconds": 12.5,
        "params": {"model": dataclasses.asdict(params.model), "train": dataclasses.asdict(params.train)},
    }
    model = path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"offset": offset}))
    if kind == "neural":
        metrics |= {"best_epoch": 3, "epochs_run": 4, "audio_seconds_per_second": 95.5, "device": "cpu"}
        history = [
            {
                "epoch": e,
                "train_loss": 1.2 - 0.1 * e,
                "val_loss": float("nan") if e == 1 else 1.3 - 0.05 * e,  # a diverged epoch
                **{f"val_uar_{d}": 0.3 + 0.02 * e + 0.01 * i for i, d in enumerate(DIMENSIONS)},
                "val_uar_mean": 0.31 + 0.02 * e,
                "seconds": 2.0,
                "audio_seconds_per_second": 90.0 + e,
            }
            for e in EPOCHS
        ]
        (path / "history.json").write_text(json.dumps(history))
        arrays = {"frame_hop_s": np.float64(HOP_S)}
        for uid in test["utterance_id"][:2]:
            frames = int(np.ceil(store.waveform(uid).size / store.sample_rate / HOP_S))
            for d, dimension in enumerate(DIMENSIONS):
                logits = np.sin(np.linspace(0, 3 + d, frames))
                arrays[f"{uid}__{dimension}"] = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
        np.savez(path / "attention.npz", **arrays)
        (model / "weights.pt").write_bytes(b"not really a state dict")
    else:
        (model / "egemaps_linear.joblib").write_bytes(b"not really a pipeline")
    (path / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory, store_dir) -> Path:
    root = tmp_path_factory.mktemp("train")
    store = AudioStore(store_dir)
    _write_run(root / "mtl_attention" / "fold0", "mtl_attention", "neural", store, offset=1)
    _write_run(root / "egemaps_linear" / "fold0", "egemaps_linear", "egemaps", store, offset=2)
    return root


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _model_files(model_uri: str) -> set[str]:
    import mlflow

    return {Path(item.path).name for item in mlflow.artifacts.list_artifacts(artifact_uri=model_uri)}


# --- tests -----------------------------------------------------------------------------------------------


def test_default_tracking_uri_is_sqlite_under_cwd_with_explicit_artifact_root(
    tmp_path, monkeypatch, train_dir, fake_training
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    experiment_id = tracking.ensure_experiment("local-study")
    assert tracking.ensure_experiment("local-study") == experiment_id
    experiment = tracking.client().get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()

    parent = tracking.start_study("local", Params(), {}, experiment="local-study")
    child = tracking.log_fold_run(parent, train_dir / "mtl_attention" / "fold0")
    tracking.end_study(parent)
    assert tracking.client().get_run(child).data.tags[tracking.TAG_PARENT] == parent
    written = {p.name for p in (tmp_path / "mlruns" / "artifacts").rglob("*") if p.is_file()}
    assert {"predictions.parquet", "confusion.png", "training_curves.png", "MLmodel"} <= written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns"]  # nothing else in the cwd


def test_missing_required_file_names_the_path(tmp_path, train_dir):
    run_dir = tmp_path / "stl_mean" / "fold3"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text((train_dir / "mtl_attention/fold0/metrics.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"stl_mean/fold3/predictions\.parquet"):
        tracking.log_fold_run("no-such-parent", run_dir, tracking_uri="http://127.0.0.1:9")


def test_history_metrics_flat_or_nested_per_task():
    history = [
        {"epoch": 1, "arousal": {"train_loss": 0.9, "val_uar": 0.4}, "val_uar_mean": 0.4, "note": "warmup"},
        {"epoch": 2, "arousal": {"train_loss": 0.8, "val_uar": 0.5}, "val_uar_mean": 0.5, "improved": True},
    ]
    metrics = fold_run._history_metrics(history)
    assert {(m.key, m.step) for m in metrics} == {
        (key, step) for key in ("arousal_train_loss", "arousal_val_uar", "val_uar_mean") for step in (1, 2)
    }


def test_study_on_server(local_server, train_dir, store_dir, fake_training, servers):
    import mlflow

    boot_s = time.monotonic() - servers["started"]
    client = tracking.client()
    params = Params()
    parent = tracking.start_study(
        "study-1",
        params,
        {"owner": "tests"},
        data_version="md5-abc",
        pipeline_run_id="kfp-run-7",
        experiment="sermtl-tests",
    )
    neural = tracking.log_fold_run(parent, train_dir / "mtl_attention" / "fold0", store_dir=store_dir)
    egemaps = tracking.log_fold_run(parent, train_dir / "egemaps_linear" / "fold0", store_dir=store_dir)
    again = tracking.log_fold_run(parent, train_dir / "egemaps_linear" / "fold0")  # replaces, no duplicate

    # results on the parent, from the results module's own table
    frames = [
        pd.read_parquet(train_dir / s / "fold0/predictions.parquet")
        for s in ("mtl_attention", "egemaps_linear")
    ]
    fold_metrics = [
        json.loads((train_dir / s / "fold0/metrics.json").read_text())
        for s in ("mtl_attention", "egemaps_linear")
    ]
    table = results_table(pd.concat(frames, ignore_index=True), fold_metrics, params)
    tracking.log_study_results(parent, to_markdown(table), to_html(table), table)
    tracking.end_study(parent)

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.info.run_name == "study-1"
    tags = parent_run.data.tags
    assert tags["sermtl.data_version"] == "md5-abc"
    assert tags["sermtl.pipeline_run_id"] == "kfp-run-7"
    assert tags["sermtl.profile"] == params.profile
    assert tags["owner"] == "tests"
    assert tags.get("sermtl.git_commit") == tracking.git_commit()  # HEAD of this checkout
    assert parent_run.data.params["train.learning_rate"] == str(params.train.learning_rate)
    assert parent_run.data.params["systems.mtl_attention.pooling"] == "attention"
    assert parent_run.data.params["data.sessions"] == "[1,2,3,4,5]"
    pooled = table[(table["system"] == "mtl_attention") & (table["subset"] == "all")]
    for row in pooled.itertuples():
        assert parent_run.data.metrics[f"pooled_mtl_attention_all_{row.dimension}_uar"] == pytest.approx(
            row.pooled_uar
        )
    assert {"results/results.md", "results/results.html", "results/results.json"} <= _artifact_paths(
        client, parent
    )
    assert tags["mlflow.note.content"].startswith("UAR")

    children = client.search_runs(
        [parent_run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(r.info.run_name for r in children) == ["egemaps_linear/fold0", "mtl_attention/fold0"]
    assert {r.info.run_id for r in children} == {neural, again}
    assert client.get_run(egemaps).info.lifecycle_stage == "deleted"

    run = client.get_run(neural)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["sermtl.data_version"] == "md5-abc"  # inherited, so child runs are searchable
    assert run.data.params["system"] == "mtl_attention"
    assert run.data.params["validation_speaker"] == "Ses02_F"
    assert run.data.params["model.rnn_hidden"] == str(params.model.rnn_hidden)
    history = client.get_metric_history(neural, "train_loss")
    assert [m.step for m in history] == EPOCHS
    assert [m.value for m in history] == pytest.approx([1.2 - 0.1 * e for e in EPOCHS])
    assert [m.step for m in client.get_metric_history(neural, "val_uar_valence")] == EPOCHS
    val_loss = sorted(client.get_metric_history(neural, "val_loss"), key=lambda m: m.step)
    assert np.isnan(val_loss[0].value) and val_loss[1].value == pytest.approx(1.2)
    expected = json.loads((train_dir / "mtl_attention/fold0/metrics.json").read_text())
    for key, value in flat_metrics(expected["evaluation"], prefix="test_").items():
        assert run.data.metrics[key] == pytest.approx(value, nan_ok=True)
    assert run.data.metrics["validation_valence_uar"] == pytest.approx(expected["validation"]["valence"])
    assert run.data.metrics["train_seconds"] == 12.5
    assert run.data.metrics["best_epoch"] == 3
    assert run.data.metrics["final_audio_seconds_per_second"] == 95.5  # also a per-epoch metric
    assert [m.step for m in client.get_metric_history(neural, "audio_seconds_per_second")] == EPOCHS

    artifacts = _artifact_paths(client, neural)
    uid = sorted(
        k.split("__")[0] for k in np.load(train_dir / "mtl_attention/fold0/attention.npz").files if "__" in k
    )[0]
    assert {
        "metrics.json",
        "history.json",
        "predictions.parquet",
        "attention.npz",
        "plots/confusion.png",
        "plots/training_curves.png",
        f"plots/attention/{uid}.png",
    } <= artifacts
    assert "plots/training_curves.png" not in _artifact_paths(client, again)  # egemaps: no history

    # the model: a LoggedModel linked to the child run, loadable and predicting from a waveform
    model_uri = run.data.tags["sermtl.model_uri"]
    assert model_uri.startswith("models:/m-")
    assert {"MLmodel", "python_model.pkl"} <= _model_files(model_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    assert [s.name for s in model.metadata.get_output_schema().inputs] == tracking.output_columns()
    waveform = AudioStore(store_dir).waveform(uid)
    predicted = model.predict(waveform)
    reference = FakePredictor(train_dir / "mtl_attention/fold0/model").predict(waveform)
    assert list(predicted.columns) == tracking.output_columns()
    assert len(predicted) == 1
    for dimension in DIMENSIONS:
        assert predicted[f"{dimension}_class"].iloc[0] == reference[dimension]["class"]
        assert predicted[f"{dimension}_prob_high"].iloc[0] == pytest.approx(
            reference[dimension]["probabilities"][2]
        )
    batch = model.unwrap_python_model().predict(None, [waveform, waveform[:8000]])
    assert len(batch) == 2

    version = tracking.register_model(model_uri, "sermtl-mtl-attention", alias="champion")
    assert client.get_model_version_by_alias("sermtl-mtl-attention", "champion").version == version
    print(f"\nmlflow servers ready {boot_s:.1f}s after module start")


def test_artifacts_on_seaweedfs_s3(servers, monkeypatch, train_dir, store_dir, fake_training):
    import boto3
    import mlflow

    server = servers["s3"].wait_ready()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
    # The client needs no S3 credentials: the server proxies artifacts (mlflow-artifacts:/).
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SERMTL_GIT_COMMIT", "feedface")  # how images built without .git say what they run
    parent = tracking.start_study("study-s3", Params(), {}, data_version="fp-1")
    child = tracking.log_fold_run(parent, train_dir / "mtl_attention" / "fold0", store_dir=store_dir)
    tracking.end_study(parent)

    keys = {
        item["Key"]
        for page in boto3.client("s3", **_boto_kwargs(servers["s3_server"]))
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    }
    names = {Path(k).name for k in keys}
    assert {"predictions.parquet", "confusion.png", "training_curves.png", "MLmodel"} <= names
    assert all(k.startswith("mlflow/") for k in keys)
    tags = tracking.client().get_run(child).data.tags
    assert tags["sermtl.git_commit"] == "feedface" and "sermtl.git_dirty" not in tags
    downloaded = mlflow.artifacts.download_artifacts(run_id=child, artifact_path="predictions.parquet")
    original = (train_dir / "mtl_attention/fold0/predictions.parquet").read_bytes()
    assert Path(downloaded).read_bytes() == original


def test_single_task_scalars_per_network_become_one_metric_each():
    from sermtl.mlops.fold_run import _final_metrics

    frame = pd.DataFrame(
        {
            "utterance_id": ["Ses01F_impro01_F000"] * 3,
            "system": "stl_mean",
            "fold": 0,
            "test_session": 1,
            "dimension": list(DIMENSIONS),
            "improvised": True,
            "label": [0, 1, 2],
            "prediction": [0, 1, 1],
            "prob_low": 0.4,
            "prob_medium": 0.3,
            "prob_high": 0.3,
        }
    )
    metrics = {
        "system": "stl_mean",
        "best_epoch": {"arousal": 1, "valence": 2, "dominance": 3},
        "epochs_run": {d: 5 for d in DIMENSIONS},
        "train_seconds": 3.0,
        "params": {"train": {"learning_rate": 0.01}},
    }
    final = _final_metrics(metrics, frame)
    assert final["best_epoch_arousal"] == 1 and final["best_epoch_dominance"] == 3
    assert final["epochs_run_valence"] == 5 and final["train_seconds"] == 3.0
    assert not any(key.startswith("params") for key in final)
