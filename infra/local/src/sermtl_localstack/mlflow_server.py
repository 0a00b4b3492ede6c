"""`mlflow server` on loopback (sqlite or PostgreSQL backend, proxied artifacts in a folder or on S3):
the tracking server the tests and the local stack give clients as MLFLOW_TRACKING_URI."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sermtl_localstack.ports import LOOPBACK, free_port
from sermtl_localstack.processes import stop_process_group


def mlflow_command() -> list[str]:
    """The venv's `mlflow` next to the interpreter, else on PATH, else `python -m mlflow`."""
    candidate = Path(sys.executable).parent / "mlflow"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


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
