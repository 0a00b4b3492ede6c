"""The images at work: ingest, validate and one training run inside the CPU image give the host's manifest and
predictions, and the MLflow image serves with PostgreSQL, S3 and basic auth. Opt-in (`make test-containers`,
which builds the images first): SERMTL_TEST_CONTAINERS=1 and the images of this checkout's tag present."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.data.synth import synthesize
from sermtl.schema import AUDIO_FILE, MANIFEST_FILE, PREDICTIONS_FILE

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "infra" / "containers" / "containers.conf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SERMTL_TEST_CONTAINERS") != "1", reason="opt-in: make test-containers"
    ),
]


def built(image: str, override: str) -> str:
    """`localhost/<image>:<this checkout's tag>` (or $<override>), skipping the test when it is not built."""
    tag = subprocess.run([ROOT / "infra/docker/image-tag.sh"], capture_output=True, text=True, check=True)
    name = os.environ.get(override) or f"localhost/{image}:{tag.stdout.strip()}"
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    if (
        shutil.which("podman") is None
        or subprocess.run(["podman", "image", "exists", name], env=env).returncode
    ):
        pytest.skip(f"{name} is not built (make images)")
    return name


def in_container(name: str, work: Path, *args: str) -> None:
    command = ["podman", "run", "--rm", "--network", "none", "-v", f"{work}:/data:U", name, *args]
    result = subprocess.run(
        command, env={**os.environ, "CONTAINERS_CONF": str(CONF)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def on_host(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def test_ingest_validate_and_training_in_the_cpu_image_match_the_host(tmp_path):
    name = built("sermtl", "SERMTL_TEST_IMAGE")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["max_epochs"] = 2
    raw.setdefault("profiles", {}).setdefault("demo", {}).setdefault("train", {})["max_epochs"] = 2
    for side in ("container", "host"):
        work = tmp_path / side
        synthesize(work / "IEMOCAP_full_release", utterances=60, seed=0, mean_duration_s=0.8)
        raw["data"]["corpus"] = (
            "/data/IEMOCAP_full_release" if side == "container" else str(work / "IEMOCAP_full_release")
        )
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    box, host = tmp_path / "container", tmp_path / "host"
    steps = [
        ["ingest", "--out", "{w}/ingest", "--params", "{w}/params.yaml"],
        ["validate", "--ingest", "{w}/ingest", "--out", "{w}/validate", "--params", "{w}/params.yaml"],
        [
            "train",
            "--system",
            "mtl_attention",
            "--fold",
            "0",
            "--store",
            "{w}/ingest",
            "--out",
            "{w}/train/mtl_attention/fold0",
            "--params",
            "{w}/params.yaml",
            "--device",
            "cpu",
        ],
    ]
    for step in steps:
        in_container(name, box, *(arg.format(w="/data") for arg in step))
        on_host(*(arg.format(w=host) for arg in step))
    pd.testing.assert_frame_equal(*(pd.read_parquet(w / "ingest" / MANIFEST_FILE) for w in (box, host)))
    assert (box / "ingest" / AUDIO_FILE).read_bytes() == (host / "ingest" / AUDIO_FILE).read_bytes()
    predictions = [pd.read_parquet(w / "train/mtl_attention/fold0" / PREDICTIONS_FILE) for w in (box, host)]
    pd.testing.assert_frame_equal(*predictions)


def test_the_mlflow_image_serves_with_postgres_s3_and_basic_auth(tmp_path, postgres_server, s3_server):
    """The tracking-server image on the local stack's PostgreSQL and S3, basic auth on: a client without
    credentials gets 401; with them it logs a run and an artifact and reads both back; the file is in S3."""
    import time
    import urllib.error
    import urllib.request

    import boto3
    import mlflow
    from sermtl_localstack.ports import free_port

    name = built("sermtl-mlflow", "SERMTL_TEST_MLFLOW_IMAGE")
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="mlflow-image")
    auth = tmp_path / "auth"
    auth.mkdir()
    password = "sermtl-admin-Passw0rd"
    (auth / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:////auth/basic_auth.db\n"
        f"admin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port, container = free_port(), f"sermtl-mlflow-test-{os.getpid()}"
    server_env = {
        **s3_server.client_env(),
        "MLFLOW_AUTH_CONFIG_PATH": "/auth/basic_auth.ini",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
    }
    command = [
        "podman",
        "run",
        "-d",
        "--rm",
        "--name",
        container,
        "--network",
        "host",
        "-v",
        f"{auth}:/auth:U",
    ]
    command += [arg for key, value in server_env.items() for arg in ("-e", f"{key}={value}")]
    command += [
        name,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        postgres_server.create_database("mlflow_image"),
        "--artifacts-destination",
        "s3://mlflow-image/artifacts",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, subprocess.run(
                    ["podman", "logs", container], env=env, capture_output=True, text=True
                ).stderr
                time.sleep(1)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
        assert refused.value.code == 401
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("image-check"))
        client.log_metric(run.info.run_id, "uar", 0.651)
        (tmp_path / "note.txt").write_text("from a client")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert client.get_run(run.info.run_id).data.metrics == {"uar": 0.651}
        assert (
            Path(client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path))).read_text()
            == "from a client"
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-image").get("Contents", [])]
        assert any(key.endswith(f"{run.info.run_id}/artifacts/note.txt") for key in keys), keys
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        subprocess.run(["podman", "rm", "-f", container], env=env, capture_output=True)
