"""infra/local: the stack of the cluster (mlflow server on PostgreSQL, artifacts on SeaweedFS S3) on one
machine, through `python -m sermtl_localstack up|status|down` as users run it.

One temp folder goes through up (detached) -> a run with an artifact -> status -> down -> up again in the
foreground -> Ctrl-C: the run, its parameters and its artifact survive the restart.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sermtl_localstack import STACK_BUCKETS, pid_alive
from sermtl_localstack import port_open as _port_open

pytestmark = pytest.mark.slow

CLIENT_KEYS = {
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}
ANY_PORT = ["--mlflow-port", "0", "--s3-port", "0", "--pg-port", "0"]


def cli_env() -> dict[str, str]:
    """The test's environment without any stack settings another test may have exported."""
    env = {key: value for key, value in os.environ.items() if key not in CLIENT_KEYS}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def stack(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "sermtl_localstack", *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            values[key] = shlex.split(value)[0]
    return values


def status(directory: Path) -> tuple[int, dict]:
    done = stack("status", "--dir", str(directory), "--json", check=False)
    return done.returncode, json.loads(done.stdout)


def assert_all_stopped(state: dict) -> None:
    for name, record in state["processes"].items():
        assert not pid_alive(record["pid"], record["start_time"]), f"{name} (pid {record['pid']}) still alive"
    for name, port in state["ports"].items():
        assert not _port_open(port, timeout_s=0.5), f"something still listens on {name} port {port}"


@pytest.fixture
def stack_dir():
    # As root PostgreSQL runs as `postgres`, which must be able to enter the folder (pytest's tmp_path is
    # closed to other users): a folder of our own under the system temp dir, opened for traversal.
    base = Path(tempfile.mkdtemp(prefix="sermtl-localstack-test-"))
    base.chmod(0o711)
    directory = base / "stack"
    try:
        yield directory
    finally:
        stack("down", "--dir", str(directory), "--grace", "2", check=False)  # whatever failed above
        shutil.rmtree(base, ignore_errors=True)


def test_up_run_status_down_restart_keeps_runs(stack_dir: Path, tmp_path: Path):
    import boto3
    from mlflow.tracking import MlflowClient

    # --- up, detached: returns once every service answers ---
    up = stack("up", "--dir", str(stack_dir), *ANY_PORT, "--timeout", "240")
    assert "MLflow UI" in up.stdout
    env = read_env_file(stack_dir / "stack.env")
    assert set(env) == CLIENT_KEYS
    state = json.loads((stack_dir / "stack.json").read_text())
    assert state["running"] and state["artifacts_destination"] == "s3://mlflow/artifacts"
    assert state["backend_store_uri"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{state['ports']['mlflow']}"
    assert (
        env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{state['ports']['s3']}"
    )
    assert (stack_dir / ".gitignore").read_text().strip().endswith("*")

    code, report = status(stack_dir)
    assert code == 0 and report["state"] == "running", report
    assert all(service["healthy"] and service["alive"] for service in report["services"].values())

    # --- a run with an artifact, through the server only (the client has no S3 settings) ---
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment("local-stack")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "fold", "3")
    client.log_metric(run_id, "uar", 0.61)
    note = tmp_path / "note.txt"
    note.write_text("attention over time\n")
    client.log_artifact(run_id, str(note), "reports")
    client.set_terminated(run_id)

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    for bucket in STACK_BUCKETS:  # (SeaweedFS' ListBuckets is empty without S3 identities)
        s3.head_bucket(Bucket=bucket)
    listed = s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])
    keys = [item["Key"] for item in listed]
    key = next((k for k in keys if k.endswith(f"{run_id}/artifacts/reports/note.txt")), None)
    assert key, keys
    assert s3.get_object(Bucket="mlflow", Key=key)["Body"].read() == b"attention over time\n"
    back = client.download_artifacts(run_id, "reports/note.txt", str(tmp_path / "back1"))
    assert Path(back).read_text() == "attention over time\n"

    # --- down: every process gone, every port closed; the data stays ---
    started = time.monotonic()
    stack("down", "--dir", str(stack_dir), "--grace", "3")
    assert time.monotonic() - started < 45
    code, report = status(stack_dir)
    assert code == 3 and report["state"] == "stopped", report
    assert_all_stopped(state)
    assert "no stack running" in stack("down", "--dir", str(stack_dir)).stdout  # idempotent

    # --- up again on the same folder, in the foreground (new free ports): the run is still there ---
    command = [sys.executable, "-m", "sermtl_localstack", "up", "--dir", str(stack_dir), *ANY_PORT]
    foreground = subprocess.Popen(
        [*command, "--foreground", "--grace", "3", "--timeout", "240"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert foreground.poll() is None, foreground.communicate()[0]
            code, report = status(stack_dir)
            if code == 0 and json.loads((stack_dir / "stack.json").read_text()).get("mode") == "foreground":
                break
            assert time.monotonic() < deadline, report
            time.sleep(1)
        state = json.loads((stack_dir / "stack.json").read_text())
        assert state["supervisor"]["pid"] == foreground.pid
        env = read_env_file(stack_dir / "stack.env")
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.get_run(run_id)
        assert run.data.params == {"fold": "3"} and run.data.metrics == {"uar": 0.61}
        assert run.info.status == "FINISHED"
        assert client.get_experiment_by_name("local-stack").experiment_id == experiment_id
        back = client.download_artifacts(run_id, "reports/note.txt", str(tmp_path / "back2"))
        assert Path(back).read_text() == "attention over time\n"

        # --- Ctrl-C stops everything ---
        foreground.send_signal(signal.SIGINT)
        output, _ = foreground.communicate(timeout=120)
        assert foreground.returncode == 0, output
    finally:
        if foreground.poll() is None:
            foreground.kill()
            foreground.wait()
    code, report = status(stack_dir)
    assert code == 3 and report["state"] == "stopped", report
    assert_all_stopped(state)
