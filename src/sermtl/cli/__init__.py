"""The `sermtl` command line: one subcommand per pipeline step, all reading params.yaml (common.py: the app
and its error handling; stages.py, models.py, pipeline.py: the commands)."""

from __future__ import annotations

import os

# Each module registers its commands on `app`, in the order `sermtl --help` lists them.
from sermtl.cli.common import app

# isort: split
from sermtl.cli import stages  # noqa: F401

# isort: split
from sermtl.cli import models, pipeline  # noqa: F401

__all__ = ["app", "main"]


def main() -> None:
    for name, value in (("GX_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(name, value)
    app()
