"""What every `sermtl` command shares: the app, its options, and how an error becomes one line
and an exit code."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sermtl.errors import EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE, ServiceUnreachable, redact_text
from sermtl.params import DEVICES, SUBSETS, ParamsError, load_params

# Choices come from the parameter types, so --help lists them and click refuses others before any work.
Device = enum.Enum("Device", {name: name for name in DEVICES}, type=str)
Subset = enum.Enum("Subset", {name: name for name in SUBSETS}, type=str)

app = typer.Typer(
    help="Speech emotion recognition pipeline (arousal, valence, dominance; attention-augmented multi-task).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (params.yaml).")]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr, credentials removed, and the exit code of sermtl.errors for what went wrong."""
    typer.secho(f"error: {redact_text(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def load(params_path: Path):
    try:
        return load_params(params_path)
    except ParamsError as exc:
        fail(str(exc))


@contextlib.contextmanager
def mlflow_calls(params, other_error: int = EXIT_REFUSED) -> Iterator[None]:
    """The MLflow calls of one command (sermtl.mlops.tracking.mlflow_service: retries within
    tracking.retry_budget_s). A server that cannot be reached: one line naming it, exit 4; any other
    MLflow error (the server answered, e.g. 403): one line, exit `other_error`. No credentials either way."""
    from mlflow.exceptions import MlflowException

    from sermtl.mlops.tracking import mlflow_service

    try:
        with mlflow_service(params):
            yield
    except ServiceUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        fail(f"MLflow: {first}", other_error)


def require_reason(action: str, reason: str) -> None:
    from sermtl.mlops.registry import REASON_REQUIRED

    if not reason.strip():
        fail(f"{action} {REASON_REQUIRED}", EXIT_BAD_INPUT)


def refused(exc: Exception) -> None:
    """A refused promotion/rollback: exit 1 by policy, 3 for a concurrent conflict (re-running may work)."""
    typer.secho(f"refused: {redact_text(str(exc))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=3 if getattr(exc, "conflict", False) else 1)
