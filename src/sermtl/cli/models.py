"""The registered model's commands: promote, rollback, registry, serve."""

from __future__ import annotations

from typing import Annotated

import typer

from sermtl.cli.common import (
    ParamsOption,
    app,
    fail,
    load,
    mlflow_calls,
    refused,
    require_reason,
)
from sermtl.errors import EXIT_UNREACHABLE, ServiceUnreachable
from sermtl.params import DEFAULT_PARAMS_PATH


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name (registry.model_name).")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version to promote (default: the `challenger` alias).")
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (required); recorded in the audit trail.")
    ] = "",
    force: Annotated[
        bool,
        typer.Option(help="Promote even if the gate or the promotion rule says no."),
    ] = False,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who promotes (default: the login name).")
    ] = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Move the `champion` alias to a version after comparing it with the current champion.

    Both versions' out-of-fold predictions are paired and tested as in `sermtl significance`;
    registry.promotion.rule decides. Exit 1: refused (gate, rule, evidence); 2: no --reason;
    3: a concurrent change won; 4: the server could not be reached. Tracking server: $MLFLOW_TRACKING_URI.
    """
    from sermtl.mlops.registry import RegistryError
    from sermtl.mlops.registry import promote as run_promote

    params = load(params_path)
    require_reason("a promotion", reason)
    try:
        with mlflow_calls(params):
            result = run_promote(name, version, params=params, actor=actor, reason=reason, force=force)
    except RegistryError as exc:
        refused(exc)
    typer.echo(result.message)
    for line in result.evidence.get("reasons", []):
        typer.echo(f"  {line}")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (required); recorded in the audit trail.")
    ] = "",
    actor: Annotated[
        str | None, typer.Option("--actor", help="Who rolls back (default: the login name).")
    ] = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Move `champion` back to the previous champion; repeated rollbacks walk further back.

    Exit 1: nothing to roll back to; 2: no --reason; 3: the lock stayed held; 4: the server could not be
    reached.
    """
    from sermtl.mlops.registry import RegistryError
    from sermtl.mlops.registry import rollback as run_rollback
    from sermtl.params import Params

    params = load(params_path) if params_path.is_file() else Params()
    require_reason("a rollback", reason)
    try:
        with mlflow_calls(params):
            result = run_rollback(
                name, actor=actor, reason=reason, lock_timeout_s=params.registry.promotion.lock_timeout_s
            )
    except RegistryError as exc:
        refused(exc)
    typer.echo(result.message)


@app.command()
def registry(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Versions with aliases, gate result and pooled UARs; champion history and recent audit entries.

    Exit 2: no such registered model; 4: the server could not be reached.
    """
    from sermtl.mlops.registry import RegistryError, registry_state
    from sermtl.params import Params

    params = load(params_path) if params_path.is_file() else Params()
    try:
        with mlflow_calls(params):
            state = registry_state(name)
    except RegistryError as exc:
        fail(str(exc))
    typer.echo(state.table())


@app.command()
def serve(
    model_uri: Annotated[
        str, typer.Option("--model-uri", "-m", help="Model to serve, e.g. models:/sermtl-ser@champion.")
    ],
    host: Annotated[str, typer.Option("--host", "-h", help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 5000,
    workers: Annotated[int, typer.Option("--workers", "-w", help="uvicorn worker processes.", min=1)] = 1,
    timeout: Annotated[
        int | None,
        typer.Option(
            "--timeout", "-t", help="Seconds one request may take (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)."
        ),
    ] = None,
    max_request_bytes: Annotated[
        int | None,
        typer.Option(
            "--max-request-bytes",
            min=1,
            help="Refuse larger request bodies with 413 (default: the model's serving.max_request_bytes).",
        ),
    ] = None,
) -> None:
    """Serve a registered model: `mlflow models serve --env-manager local`, plus a request-size limit.

    MLflow's own scoring app (same routes and request formats) behind a check that answers 413 to a body
    over the limit before it is read or parsed. Tracking server: $MLFLOW_TRACKING_URI.
    """
    from sermtl.mlops.scoring import serve as run_serve

    limits = {"timeout_s": timeout, "max_request_bytes": max_request_bytes}
    try:
        run_serve(model_uri, host=host, port=port, workers=workers, **limits)
    except ServiceUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
