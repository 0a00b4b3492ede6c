"""`sermtl pipeline ...`: compile a named Kubeflow pipeline version, submit it, schedule it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sermtl.cli.common import (
    ParamsOption,
    app,
    fail,
)
from sermtl.params import DEFAULT_PARAMS_PATH

# --- Kubeflow Pipelines: compile a named version, submit it, schedule it ------------------------------

pipeline_app = typer.Typer(
    help="Kubeflow Pipelines: compile a named pipeline version, upload and run it, schedule it.",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")

KfpOutOption = Annotated[
    Path, typer.Option("--out", help="Folder of compiled versions; each goes to <out>/<version>/.")
]
HostOption = Annotated[
    str,
    typer.Option("--host", envvar="KF_PIPELINES_ENDPOINT", help="KFP API URL, e.g. http://localhost:8080."),
]
ExperimentOption = Annotated[str, typer.Option("--experiment", help="KFP experiment (created if missing).")]
ParamPairsOption = Annotated[
    list[str] | None,
    typer.Option("--param", help="Pipeline parameter key=value, repeatable (e.g. corpus_uri=s3://b/p)."),
]
NamespaceOption = Annotated[
    str | None, typer.Option("--namespace", help="Kubernetes namespace (multi-user KFP; manifests).")
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="KFP_TOKEN", help="Bearer token for the KFP API; never printed."),
]


def _compiled_version(out: Path, params_path: Path, namespace: str | None = None):
    from sermtl.mlops.kfp_client import KfpError, compile_version

    try:
        return compile_version(out, params_path, namespace=namespace)
    except KfpError as exc:
        fail(str(exc))


def _param_pairs(pairs: list[str] | None) -> dict[str, str]:
    from sermtl.mlops.kfp_client import KfpError, parse_param_pairs

    try:
        return parse_param_pairs(pairs or [])
    except KfpError as exc:
        fail(str(exc))


def _echo_upload(upload) -> None:
    pipeline = "created" if upload.pipeline_created else "found"
    version = "uploaded" if upload.version_created else "already there, reused"
    typer.echo(f"pipeline version {upload.version_name} ({upload.version_id}): {version}")
    typer.echo(f"pipeline id {upload.pipeline_id} ({pipeline}); experiment {upload.experiment!r}")


@pipeline_app.command("compile")
def pipeline_compile(
    out: KfpOutOption = Path("artifacts/kfp"),
    namespace: NamespaceOption = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Compile the DAG with params.yaml compiled in: the IR YAML and the Pipeline/PipelineVersion manifests.

    The version name is sermtl-<package version>-<commit>[-dirty]-p<sha256(params.yaml)[:8]>.
    """
    compiled = _compiled_version(out, params_path, namespace)
    typer.echo(f"version {compiled.name}")
    typer.echo(f"  IR YAML:   {compiled.pipeline_path}")
    typer.echo(f"  manifests: {compiled.manifests_path} (kubectl apply -f)")


@pipeline_app.command("submit")
def pipeline_submit(
    host: HostOption,
    experiment: ExperimentOption = "sermtl",
    param: ParamPairsOption = None,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Run name (default: <version>-<UTC time>).")
    ] = None,
    out: KfpOutOption = Path("artifacts/kfp"),
    namespace: NamespaceOption = None,
    token: TokenOption = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Compile, upload the version (reused if it exists) and start a run.

    --params picks the params.yaml compiled into the version (the run's params_yaml).
    """
    from sermtl.mlops.kfp_client import KfpError, submit

    pairs = _param_pairs(param)
    compiled = _compiled_version(out, params_path, namespace)
    try:
        result = submit(
            host,
            compiled,
            experiment=experiment,
            params=pairs,
            run_name=run_name,
            namespace=namespace,
            existing_token=token,
        )
    except KfpError as exc:
        fail(str(exc))
    _echo_upload(result.upload)
    typer.echo(f"run {result.run_name!r}: {result.run_id}\n{result.run_url}")


@pipeline_app.command("schedule")
def pipeline_schedule(
    host: HostOption,
    cron: Annotated[
        str, typer.Option("--cron", help="Cron schedule: 5 fields, or 6 with seconds first (KFP's format).")
    ],
    experiment: ExperimentOption = "sermtl",
    param: ParamPairsOption = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Recurring run name (default: the version name).")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="Runs of the schedule allowed at once.")] = 1,
    catchup: Annotated[bool, typer.Option(help="Backfill missed runs after a pause.")] = False,
    out: KfpOutOption = Path("artifacts/kfp"),
    namespace: NamespaceOption = None,
    token: TokenOption = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Compile, upload the version and create a recurring run of it (kept if an identical one exists)."""
    from sermtl.mlops.kfp_client import KfpError, normalize_cron, schedule

    pairs = _param_pairs(param)
    try:
        normalize_cron(cron)  # refuse a bad schedule before compiling or connecting
    except KfpError as exc:
        fail(str(exc))
    compiled = _compiled_version(out, params_path, namespace)
    try:
        result = schedule(
            host,
            compiled,
            cron=cron,
            experiment=experiment,
            params=pairs,
            name=name,
            max_concurrency=max_concurrency,
            no_catchup=not catchup,
            namespace=namespace,
            existing_token=token,
        )
    except KfpError as exc:
        fail(str(exc))
    _echo_upload(result.upload)
    state = "created" if result.created else "already exists, kept"
    typer.echo(
        f"recurring run {result.name!r} ({result.recurring_run_id}): {state}; cron {result.cron!r}, "
        f"max concurrency {result.max_concurrency}\n{result.url}"
    )
