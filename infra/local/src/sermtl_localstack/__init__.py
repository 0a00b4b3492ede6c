"""Real servers on loopback for tests and single-machine use: an S3-compatible store (SeaweedFS), a
PostgreSQL server (an MLflow backend store) and an MLflow tracking server, alone or as the local stack.
Nothing here talks to the internet; the job modules are re-exported here for tests/ and infra/local/.
"""

from sermtl_localstack.cli import main
from sermtl_localstack.mlflow_server import MlflowServer, mlflow_command
from sermtl_localstack.ports import LOOPBACK, free_port, free_port_pair, port_free, port_open
from sermtl_localstack.postgres import PG_SERVER_BINARIES, PostgresServer, postgres_bindir
from sermtl_localstack.processes import (
    pid_alive,
    proc_start_time,
    stop_pid,
    stop_process,
    stop_process_group,
)
from sermtl_localstack.seaweedfs import SeaweedS3, weed_binary
from sermtl_localstack.stack import (
    STACK_ARTIFACTS_DESTINATION,
    STACK_BUCKETS,
    STACK_DEFAULT_PORTS,
    STACK_ENV_FILE,
    STACK_SERVICES,
    STACK_STATE_FILE,
    LocalStack,
    StackError,
)

__all__ = [
    "LOOPBACK",
    "PG_SERVER_BINARIES",
    "STACK_ARTIFACTS_DESTINATION",
    "STACK_BUCKETS",
    "STACK_DEFAULT_PORTS",
    "STACK_ENV_FILE",
    "STACK_SERVICES",
    "STACK_STATE_FILE",
    "LocalStack",
    "MlflowServer",
    "PostgresServer",
    "SeaweedS3",
    "StackError",
    "free_port",
    "free_port_pair",
    "main",
    "mlflow_command",
    "pid_alive",
    "port_free",
    "port_open",
    "postgres_bindir",
    "proc_start_time",
    "stop_pid",
    "stop_process",
    "stop_process_group",
    "weed_binary",
]
