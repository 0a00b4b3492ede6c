"""A throw-away (or, for the local stack, persistent) PostgreSQL cluster on loopback: MLflow's backend
store. Uses the machine's PostgreSQL server binaries, run as user `postgres` when we are root."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sermtl_localstack.ports import LOOPBACK, free_port

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

    def postmaster_pid(self) -> int | None:
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
                pid = self.postmaster_pid()
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
