"""Shared test settings: no telemetry, and a small params object for miniature corpora."""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole test session."""
    from sermtl_localstack import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1 for the whole test session (a throw-away cluster in a temp
    folder; as root it runs as the `postgres` user). If it cannot start, tests using it error with why."""
    from sermtl_localstack import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_mlflow_server(tmp_path_factory, postgres_server, s3_server):
    """`mlflow server` with its backend store on PostgreSQL and proxied artifacts on SeaweedFS S3.

    Returned while it boots (~20 s of schema migrations), so set-up can overlap: call `.wait_ready()`
    before use (it returns at once when the server is up). Two workers, so concurrent clients really hit
    the database from different processes. Clients need only MLFLOW_TRACKING_URI=<.tracking_uri>.
    """
    import boto3
    from sermtl_localstack import MlflowServer

    bucket = "mlflow-pg"
    boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-pg"),
        backend_store_uri=postgres_server.create_database("mlflow"),
        artifacts_destination=f"s3://{bucket}/artifacts",
        env=s3_server.client_env(),
        workers=2,
    )
    try:
        server.start(wait=False)
        yield server
    finally:
        server.stop()
