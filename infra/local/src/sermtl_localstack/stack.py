"""The cluster's services (infra/k8s) on one machine: PostgreSQL, SeaweedFS S3 and an MLflow server on
loopback, started, stopped and checked from any process through `stack.json` (infra/local/*.sh)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sermtl_localstack.mlflow_server import MlflowServer
from sermtl_localstack.ports import LOOPBACK, free_port, free_port_pair, port_free, port_open
from sermtl_localstack.postgres import PostgresServer, postgres_bindir
from sermtl_localstack.processes import pid_alive, proc_start_time, stop_pid, stop_process
from sermtl_localstack.seaweedfs import SeaweedS3

STACK_STATE_FILE = "stack.json"
STACK_ENV_FILE = "stack.env"
# The Kubernetes services' ports (infra/k8s): MLflow 5000, SeaweedFS S3 8333, PostgreSQL 5432.
STACK_DEFAULT_PORTS = {"mlflow": 5000, "s3": 8333, "postgres": 5432}
# mlflow: the MLflow server's artifacts; dvc: a DVC remote; sermtl-data: the corpus (as on the cluster).
STACK_BUCKETS = ("mlflow", "dvc", "sermtl-data")
STACK_ARTIFACTS_DESTINATION = "s3://mlflow/artifacts"
STACK_SERVICES = ("postgres", "seaweedfs", "mlflow")


class StackError(RuntimeError):
    """The local stack cannot do what was asked (busy port, partly running stack, ...): the message says."""


@dataclass
class LocalStack:
    """The cluster's services (infra/k8s) on one machine, on 127.0.0.1, with their data in `directory`:

    - PostgreSQL (`PostgresServer`, durable): MLflow's backend store, database `mlflow`, `directory/postgres`;
    - SeaweedFS (`SeaweedS3`) with the S3 gateway and the buckets of STACK_BUCKETS, `directory/seaweedfs`;
    - `mlflow server` (`MlflowServer`) on that database with proxied artifacts in s3://mlflow/artifacts,
      its log in `directory/mlflow`.

    `up()` starts all three and writes `stack.json` (ports, pids) and `stack.env` (what a client exports);
    `down()` stops them, from this process or any other; the data stays for the next `up()`. A port left
    None is the last run's (else STACK_DEFAULT_PORTS); 0 picks a free one.
    """

    directory: Path
    mlflow_port: int | None = None
    s3_port: int | None = None
    pg_port: int | None = None
    workers: int = 1
    buckets: tuple[str, ...] = STACK_BUCKETS

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        self._servers: dict[str, object] = {}

    @property
    def state_path(self) -> Path:
        return self.directory / STACK_STATE_FILE

    @property
    def env_path(self) -> Path:
        return self.directory / STACK_ENV_FILE

    def read_state(self) -> dict:
        import json

        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict) -> None:
        import json

        from sermtl.fsutil import atomic_write_text

        atomic_write_text(self.state_path, json.dumps(state, indent=2) + "\n")

    # --- ports and state ---

    def _port(self, name: str, requested: int | None, previous: dict, pair: bool = False) -> int:
        port = requested if requested is not None else previous.get(name, STACK_DEFAULT_PORTS[name])
        if port == 0:
            return free_port_pair() if pair else free_port()
        busy = [p for p in ((port, port + 10000) if pair else (port,)) if not port_free(p)]
        if busy:
            option = {"s3": "--s3-port", "postgres": "--pg-port", "mlflow": "--mlflow-port"}[name]
            extra = f" (SeaweedFS also needs {port + 10000} for gRPC)" if pair else ""
            raise StackError(
                f"port {busy[0]} for {name} is in use{extra}: "
                f"pick another with {option} PORT (0: any free port)"
            )
        return port

    @staticmethod
    def _reusable(port: int | None) -> int | None:
        """A SeaweedFS internal port of the last run, if it and its gRPC port are still free."""
        return (
            port if port and port_free(port) and port + 10000 <= 65535 and port_free(port + 10000) else None
        )

    def _record(self, pid: int | None) -> dict:
        return {"pid": pid, "start_time": proc_start_time(pid) if pid else None}

    def alive(self, state: dict) -> dict[str, bool]:
        """Per service: whether the process `state` recorded still runs (same pid, same start time)."""
        processes = state.get("processes", {})
        return {
            name: pid_alive(processes.get(name, {}).get("pid"), processes.get(name, {}).get("start_time"))
            for name in STACK_SERVICES
        }

    def client_env(self, state: dict | None = None) -> dict[str, str]:
        """What a client of the stack exports (the content of stack.env)."""
        state = state or self.read_state()
        s3 = f"http://{LOOPBACK}:{state['ports']['s3']}"
        return {
            "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{state['ports']['mlflow']}",
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": state["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": state["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _write_env(self, state: dict) -> None:
        import shlex

        lines = [
            f"# The sermtl local stack in {self.directory} (`python -m sermtl_localstack up`).",
            f"# In a shell: source {shlex.quote(str(self.env_path))}",
            *(f"export {key}={shlex.quote(value)}" for key, value in self.client_env(state).items()),
            f"# MLflow's backend store (used by the server only): {state['backend_store_uri']}",
            f"# DVC remote: dvc remote add -d local s3://dvc/<project> && "
            f"dvc remote modify local endpointurl http://{LOOPBACK}:{state['ports']['s3']}",
        ]
        self.env_path.write_text("\n".join(lines) + "\n")

    # --- up ---

    # --- up ---

    def up(self, timeout_s: float = 180.0) -> dict:
        """Start PostgreSQL, SeaweedFS (+ buckets) and mlflow server; return the state once all answer.

        An already running stack is left as it is; a partly running one is an error (run `down` first).
        On any failure everything started here is stopped again."""
        self._prepare_directory()
        previous = self.read_state()
        alive = self.alive(previous)
        if all(alive.values()):
            return previous
        if any(alive.values()):
            running = ", ".join(name for name, up in alive.items() if up)
            raise StackError(f"the stack in {self.directory} is partly running ({running}): run `down` first")

        last_ports = previous.get("ports", {})
        ports = self._choose_ports(last_ports)
        s3, postgres, mlflow = self._start_services(ports, last_ports, timeout_s)
        state = self._running_state(ports, s3, postgres, mlflow)
        self._write_state(state)
        self._write_env(state)
        return state

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        gitignore = self.directory / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# sermtl local stack: data and logs, never committed\n*\n")

    def _choose_ports(self, last_ports: dict) -> dict[str, int]:
        ports = {
            "postgres": self._port("postgres", self.pg_port, last_ports),
            "s3": self._port("s3", self.s3_port, last_ports, pair=True),
            "mlflow": self._port("mlflow", self.mlflow_port, last_ports),
        }
        if len(set(ports.values())) < len(ports):
            raise StackError(f"the services need different ports: {ports}")
        return ports

    def _start_services(
        self, ports: dict[str, int], last_ports: dict, timeout_s: float
    ) -> tuple[SeaweedS3, PostgresServer, MlflowServer]:
        """Start the three with their boots overlapping; on any failure stop those started and re-raise."""
        s3 = SeaweedS3(
            self.directory / "seaweedfs",
            s3_port=ports["s3"],
            master_port=self._reusable(last_ports.get("weed_master")),
            volume_port=self._reusable(last_ports.get("weed_volume")),
            filer_port=self._reusable(last_ports.get("weed_filer")),
        )
        postgres = PostgresServer(self.directory / "postgres", port=ports["postgres"], durable=True)
        mlflow: MlflowServer | None = None
        self._servers = {"seaweedfs": s3, "postgres": postgres}
        try:
            s3.start(timeout_s=timeout_s, wait=False)  # boots while PostgreSQL starts
            self._start_postgres(postgres, timeout_s)
            mlflow = MlflowServer(
                self.directory / "mlflow",
                backend_store_uri=postgres.create_database("mlflow"),
                artifacts_destination=STACK_ARTIFACTS_DESTINATION,
                port=ports["mlflow"],
                env=s3.client_env(),
                workers=self.workers,
            )
            self._servers["mlflow"] = mlflow
            mlflow.start(timeout_s=timeout_s, wait=False)  # boots (and migrates the database) meanwhile
            s3.wait_ready(timeout_s)
            self._create_buckets(s3)
            mlflow.wait_ready(timeout_s)
        except BaseException:
            for server in (mlflow, s3, postgres):
                if server is not None:
                    with contextlib.suppress(Exception):
                        server.stop()
            raise
        return s3, postgres, mlflow

    @staticmethod
    def _start_postgres(postgres: PostgresServer, timeout_s: float) -> None:
        try:
            postgres.start(timeout_s=timeout_s)
        except PermissionError as exc:
            raise StackError(
                f"{exc}. As root, PostgreSQL runs as user {postgres.os_user!r}, which must be able to "
                f"reach {postgres.directory}: choose a --dir whose parent folders it can enter (o+x)"
            ) from exc

    def _running_state(
        self, ports: dict[str, int], s3: SeaweedS3, postgres: PostgresServer, mlflow: MlflowServer
    ) -> dict:
        """What stack.json records of a stack that just came up: ports, pids, URIs, logs."""
        assert s3.process is not None and mlflow.process is not None
        return {
            "directory": str(self.directory),
            "running": True,
            "mode": "background",
            "supervisor": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ports": {
                **ports,
                "weed_master": s3.master_port,
                "weed_volume": s3.volume_port,
                "weed_filer": s3.filer_port,
            },
            "processes": {
                "postgres": self._record(postgres.postmaster_pid()),
                "seaweedfs": self._record(s3.process.pid),
                "mlflow": self._record(mlflow.process.pid),
            },
            "backend_store_uri": mlflow.backend_store_uri,
            "artifacts_destination": STACK_ARTIFACTS_DESTINATION,
            "buckets": list(self.buckets),
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
            "logs": {
                "postgres": str(postgres.log_path),
                "seaweedfs": str(s3.directory / "weed.log"),
                "mlflow": str(mlflow.log_path),
            },
        }

    def _create_buckets(self, s3: SeaweedS3) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            region_name="us-east-1",
        )
        # (ListBuckets is empty without S3 identities in SeaweedFS 4.x: ask for each bucket instead.)
        for bucket in self.buckets:
            try:
                client.head_bucket(Bucket=bucket)
            except client.exceptions.ClientError:
                client.create_bucket(Bucket=bucket)

    # --- foreground ---

    def run_foreground(self, timeout_s: float = 180.0, grace_s: float = 10.0) -> int:
        """`up`, then wait for Ctrl-C / SIGTERM (or a service dying) and stop everything; the exit status."""
        stop_signal: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            stop_signal.append(signum)

        previous = {
            sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            if any(self.alive(self.read_state()).values()):
                raise StackError(f"the stack in {self.directory} is already running: run `down` first")
            state = self.up(timeout_s)
            state.update(mode="foreground", supervisor=self._record(os.getpid()))
            self._write_state(state)
            print(self.describe(state), flush=True)
            print("Ctrl-C stops the stack.", flush=True)
            died: list[str] = []
            while not stop_signal and not died:
                time.sleep(0.5)
                died = [name for name, up in self.alive(state).items() if not up]
            if died:
                print(f"{', '.join(died)} stopped on its own: stopping the rest", file=sys.stderr, flush=True)
            self.down(grace_s)
            print(f"stopped the stack in {self.directory}", flush=True)
            return 1 if died else 0
        finally:
            for server in self._servers.values():  # reap our children (down() already stopped them)
                process = getattr(server, "process", None)
                if process is not None:
                    with contextlib.suppress(Exception):
                        stop_process(process, grace_s=1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --- down ---

    def down(self, grace_s: float = 10.0) -> bool:
        """Stop the stack (mlflow's process group, SeaweedFS, `pg_ctl stop -m fast`); data stays.

        SeaweedFS takes ~25 s to exit on SIGTERM: after `grace_s` it is killed (its data is already written).
        Returns False when nothing was running."""
        state = self.read_state()
        if not state:
            return False
        supervisor = state.get("supervisor") or {}
        if state.get("mode") == "foreground" and supervisor.get("pid") not in (None, os.getpid()):
            # The foreground `up` stops everything itself when told to; what it leaves is stopped below.
            stop_pid(supervisor["pid"], supervisor.get("start_time"), grace_s=grace_s + 30, group=False)
            state = self.read_state()
        processes = state.get("processes", {})
        was_running = any(self.alive(state).values())
        mlflow, weed = processes.get("mlflow", {}), processes.get("seaweedfs", {})
        # SIGTERM to MLflow and SeaweedFS at once, PostgreSQL meanwhile, then wait for each.
        for record in (mlflow, weed):
            if pid_alive(record.get("pid"), record.get("start_time")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(record["pid"], signal.SIGTERM)
        stop_pid(mlflow.get("pid"), mlflow.get("start_time"), grace_s=10)
        postgres_dir = self.directory / "postgres"
        if (postgres_dir / "data" / "postmaster.pid").exists():
            PostgresServer(
                postgres_dir,
                port=state.get("ports", {}).get("postgres", 0),
                durable=True,
                bindir=postgres_bindir(),
            ).stop()
        stop_pid(weed.get("pid"), weed.get("start_time"), grace_s=grace_s)
        state["running"] = False
        state["supervisor"] = None
        state["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_state(state)
        return was_running

    # --- status ---

    def status(self) -> dict:
        """Per service: pid alive and port answering; `state` is running, stopped, degraded or absent."""
        import urllib.error
        import urllib.request

        state = self.read_state()
        if not state:
            return {"directory": str(self.directory), "state": "absent", "services": {}}
        ports = state.get("ports", {})
        alive = self.alive(state)
        mlflow_healthy = False
        if alive["mlflow"]:
            with contextlib.suppress(urllib.error.URLError, OSError):
                url = f"http://{LOOPBACK}:{ports['mlflow']}/health"
                with urllib.request.urlopen(url, timeout=3) as response:
                    mlflow_healthy = response.status == 200
        services = {
            "postgres": {
                "url": state.get("backend_store_uri"),
                "healthy": alive["postgres"] and port_open(ports.get("postgres")),
            },
            "seaweedfs": {
                "url": f"http://{LOOPBACK}:{ports.get('s3')}",
                "healthy": alive["seaweedfs"] and port_open(ports.get("s3")),
            },
            "mlflow": {"url": f"http://{LOOPBACK}:{ports.get('mlflow')}", "healthy": mlflow_healthy},
        }
        for name, service in services.items():
            service.update(pid=state.get("processes", {}).get(name, {}).get("pid"), alive=alive[name])
        healthy = [service["healthy"] for service in services.values()]
        overall = "running" if all(healthy) else "stopped" if not any(alive.values()) else "degraded"
        return {
            "directory": str(self.directory),
            "state": overall,
            "services": services,
            "env": str(self.env_path),
        }

    def describe(self, state: dict) -> str:
        ports, buckets = state["ports"], ", ".join(state["buckets"])
        return "\n".join(
            [
                f"sermtl local stack in {self.directory}",
                f"  MLflow UI / tracking  http://{LOOPBACK}:{ports['mlflow']}",
                f"  S3 (SeaweedFS)        http://{LOOPBACK}:{ports['s3']}  buckets: {buckets}",
                f"  PostgreSQL            {state['backend_store_uri']}",
                f"  client settings       source {self.env_path}",
            ]
        )
