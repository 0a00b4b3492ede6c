"""The `sermtl` command line: one subcommand per pipeline step, all reading params.yaml."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sermtl.data.sources import CorpusError
from sermtl.errors import EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE, ServiceUnreachable, redact_text
from sermtl.fsutil import OutputFolderError
from sermtl.params import DEFAULT_PARAMS_PATH, DEVICES, SUBSETS, ParamsError, load_params
from sermtl.schema import DEFAULT_TRAIN_DIR, run_dir

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


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr, credentials removed, and the exit code of sermtl.errors for what went wrong."""
    typer.secho(f"error: {redact_text(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _load(params_path: Path):
    try:
        return load_params(params_path)
    except ParamsError as exc:
        _fail(str(exc))


@contextlib.contextmanager
def _mlflow(params, other_error: int = EXIT_REFUSED) -> Iterator[None]:
    """The MLflow calls of one command (sermtl.mlops.tracking.mlflow_service: retries within
    tracking.retry_budget_s). A server that cannot be reached: one line naming it, exit 4; any other
    MLflow error (the server answered, e.g. 403): one line, exit `other_error`. No credentials either way."""
    from mlflow.exceptions import MlflowException

    from sermtl.mlops.tracking import mlflow_service

    try:
        with mlflow_service(params):
            yield
    except ServiceUnreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _fail(f"MLflow: {first}", other_error)


def _require_reason(action: str, reason: str) -> None:
    from sermtl.mlops.registry import REASON_REQUIRED

    if not reason.strip():
        _fail(f"{action} {REASON_REQUIRED}", EXIT_BAD_INPUT)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="IEMOCAP_full_release folder to create.")],
    utterances: Annotated[
        int | None, typer.Option(help="Number of utterances (10039 = IEMOCAP size).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; the same seed gives identical bytes.")
    ] = None,
    mean_duration: Annotated[float | None, typer.Option(help="Mean utterance duration in seconds.")] = None,
    cue_span: Annotated[
        float | None, typer.Option(help="Mean share of an utterance carrying the cues, (0, 1]; 1: all of it.")
    ] = None,
    cue_sharing: Annotated[
        float | None,
        typer.Option(help="What the dimensions share, [0, 1]: 0 independent, 0.5 IEMOCAP-like, 1 strong."),
    ] = None,
    null_labels: Annotated[
        bool | None,
        typer.Option("--null-labels/--no-null-labels", help="Labels independent of the audio (chance)."),
    ] = None,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Generate a synthetic corpus in the exact IEMOCAP_full_release layout and annotation format.

    Defaults come from the data.synth section of params.yaml (sermtl.data.synth explains the effect settings).
    """
    import dataclasses

    from sermtl.data.synth import synthesize
    from sermtl.params import SynthParams

    # Without a params file: synthesize's own defaults (IEMOCAP's mean duration).
    settings = _load(params_path).data.synth if params_path.is_file() else SynthParams(mean_duration_s=4.45)
    given = {
        "utterances": utterances,
        "seed": seed,
        "mean_duration_s": mean_duration,
        "cue_span": cue_span,
        "cue_sharing": cue_sharing,
        "null_labels": null_labels,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
    try:
        summary = synthesize(out, **dataclasses.asdict(settings), progress=sys.stderr.isatty())
    except (OutputFolderError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(
        f"wrote {summary.utterances} utterances in {summary.dialogs} dialogs "
        f"({summary.audio_seconds / 3600:.2f} h) to {summary.out_dir}"
    )


@app.command()
def ingest(
    out: Annotated[Path, typer.Option("--out", help="Output folder: manifest, audio store, report.")],
    source: Annotated[
        str | None,
        typer.Option("--source", help="Corpus folder or s3://bucket/prefix (default: data.corpus)."),
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(help="S3-compatible endpoint (default: data.s3_endpoint_url or $AWS_ENDPOINT_URL)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Re-ingest even if the output is up to date.")] = False,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Parse an IEMOCAP corpus into a Parquet manifest and a memory-mapped audio store.

    Every dropped utterance is counted by reason in report.json.
    """
    import dataclasses

    from sermtl.data.ingest import ingest as run_ingest

    params = _load(params_path)
    if endpoint_url is not None:
        params = dataclasses.replace(
            params, data=dataclasses.replace(params.data, s3_endpoint_url=endpoint_url)
        )
    try:
        report = run_ingest(
            source or params.data.corpus, out, params, force=force, progress=sys.stderr.isatty()
        )
    except (CorpusError, OutputFolderError) as exc:
        _fail(str(exc))
    except ServiceUnreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    state = "up to date, skipped" if report.up_to_date else "written"
    typer.echo(f"{out}: {state}. {report.summary()}")


@app.command()
def validate(
    ingest_dir: Annotated[Path, typer.Option("--ingest", help="Folder written by `sermtl ingest`.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: Data Docs HTML and summary.json.")],
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Run the great-expectations suite over the manifest and audio statistics; non-zero exit on failure."""
    from sermtl.data.validate import ValidationInputError
    from sermtl.data.validate import validate as run_validation

    params = _load(params_path)
    try:
        summary = run_validation(ingest_dir, out, params)
    except (ValidationInputError, OutputFolderError) as exc:
        _fail(str(exc))
    typer.echo(f"Data Docs: {summary.data_docs_path}\nSummary: {summary.summary_path}")
    if not summary.success:
        typer.secho(summary.describe_failures(), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.echo("validation passed")


@app.command()
def train(
    system: Annotated[str, typer.Option("--system", help="System name from the systems section.")],
    fold: Annotated[int, typer.Option("--fold", help="Leave-one-session-out fold index (0-based).")],
    store: Annotated[Path, typer.Option("--store", help="Folder written by `sermtl ingest`.")] = Path(
        "artifacts/ingest"
    ),
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: artifacts/train/<system>/fold<K>).")
    ] = None,
    device: Annotated[Device | None, typer.Option("--device", help="Default: train.device.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from a checkpoint; skip a finished run.")
    ] = True,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Train one system on one fold: predictions, metrics, history, attention and the model.

    A neural system trains once per seed of train.seeds (sub-runs seed<s>/) and predicts with their mean
    probabilities. A finished run with the same parameters is skipped; a killed one resumes from its
    checkpoint, in the seed it was killed in.
    """
    params = _load(params_path)
    from sermtl.data.audio import CorruptStoreError
    from sermtl.train.training import TrainingError, train_fold

    if system not in params.systems:
        _fail(f"unknown system {system!r}; valid: {', '.join(sorted(params.systems))}")
    folds = len(params.data.sessions)
    if not 0 <= fold < folds:
        _fail(f"fold {fold} is out of range; valid: 0..{folds - 1} (one per session)")
    folder = out if out is not None else run_dir(DEFAULT_TRAIN_DIR, system, fold)
    try:
        metrics = train_fold(
            store,
            system,
            fold,
            folder,
            params,
            device=device.value if device else None,
            resume=resume,
            progress=sys.stderr.isatty(),
        )
    except (TrainingError, CorruptStoreError, FileNotFoundError, OutputFolderError) as exc:
        _fail(str(exc))
    by_dimension = metrics["evaluation"]["all"]
    uars = " ".join(f"{d}={by_dimension[d]['uar']:.3f}" for d in params.eval.dimensions if d in by_dimension)
    seeds = metrics.get("seeds") or []
    ensemble = f" (mean of seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    typer.echo(
        f"{system} fold {fold} (test session {metrics['test_session']}): test UAR{ensemble} {uars}; "
        f"{metrics.get('train_seconds', 0.0):.1f} s training on {metrics.get('device', '?')} -> {folder}"
    )


@app.command()
def results(
    train_dir: Annotated[
        Path, typer.Option("--train-dir", help="Folder of run folders <system>/fold<k>.")
    ] = DEFAULT_TRAIN_DIR,
    out: Annotated[Path, typer.Option("--out", help="Output folder for the results table.")] = Path(
        "artifacts/results"
    ),
    store: Annotated[
        Path | None, typer.Option("--store", help="Ingest folder, for the attention plots in MLflow.")
    ] = None,
    track: Annotated[
        bool, typer.Option(help="Log the study to MLflow ($MLFLOW_TRACKING_URI or ./mlruns).")
    ] = True,
    data_version: Annotated[
        str,
        typer.Option(
            help="Corpus version tag for MLflow (default: data.dvc's hash, else the ingest fingerprint)."
        ),
    ] = "",
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Pool every (system, fold) run into the results table (JSON, Markdown, HTML).

    The study is also logged to MLflow: a parent run with one child run per (system, fold).
    """
    from sermtl.evaluate.results import RESULTS_MARKDOWN, collect_results
    from sermtl.pipeline_runner import study_data_version

    params = _load(params_path)
    try:
        table = collect_results(train_dir, out, params, store)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo((out / RESULTS_MARKDOWN).read_text())
    if track:
        from sermtl.mlops.tracking import track_study

        version = study_data_version(data_version, params.data.corpus, store)
        with _mlflow(params):
            parent = track_study(train_dir, store, out, table, params, version)
        typer.echo(f"MLflow study run: {parent}")


@app.command()
def significance(
    train_dir: Annotated[
        Path, typer.Option("--train-dir", help="Folder of run folders <system>/fold<k>.")
    ] = DEFAULT_TRAIN_DIR,
    out: Annotated[Path, typer.Option("--out", help="Output folder for significance.{json,md,html}.")] = Path(
        "artifacts/significance"
    ),
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Paired tests of the proposed system against each baseline (bootstrap/permutation, McNemar, z-test).

    Settings come from the significance section of params.yaml; p-values are Holm-corrected per test.
    """
    from sermtl.evaluate.significance import run_significance, to_markdown

    params = _load(params_path)
    try:
        report = run_significance(train_dir, out, params)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(to_markdown(report))


@app.command()
def compare(
    study: Annotated[
        str | None,
        typer.Option("--study", help="Parent run id of the study (default: the latest finished study)."),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", help="Experiment searched (default: $MLFLOW_EXPERIMENT_NAME or sermtl)"),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for comparison.{md,html,json}.")] = Path(
        "artifacts/comparison"
    ),
    subset: Annotated[Subset, typer.Option("--subset", help="Utterances compared.")] = Subset("all"),
    log: Annotated[bool, typer.Option(help="Also log the files on the study run under comparison/.")] = True,
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Systems x dimensions of a study read back from MLflow: pooled UAR with bootstrap CI, fold mean ± sd.

    Markers come from the study's logged significance report (registry.gate.test).
    Tracking server: $MLFLOW_TRACKING_URI (else ./mlruns); without params.yaml the defaults are used.
    Exit 2: no such study or it cannot be compared; 4: the server could not be reached.
    """
    from sermtl.evaluate.compare import CompareError, run_compare
    from sermtl.params import Params

    params = _load(params_path) if params_path.is_file() or params_path != DEFAULT_PARAMS_PATH else Params()
    try:
        with _mlflow(params, EXIT_BAD_INPUT):
            comparison, paths = run_compare(
                study, experiment=experiment, out_dir=out, subset=subset.value, params=params, log=log
            )
    except (CompareError, FileNotFoundError, OutputFolderError) as exc:
        _fail(str(exc))
    typer.echo(comparison.to_markdown())
    logged = f"; logged on run {comparison.study_id} under comparison/" if log else ""
    typer.echo(f"wrote {', '.join(str(path) for path in paths.values())}{logged}")


def _refused(exc: Exception) -> None:
    """A refused promotion/rollback: exit 1 by policy, 3 for a concurrent conflict (re-running may work)."""
    typer.secho(f"refused: {redact_text(str(exc))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=3 if getattr(exc, "conflict", False) else 1)


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

    params = _load(params_path)
    _require_reason("a promotion", reason)
    try:
        with _mlflow(params):
            result = run_promote(name, version, params=params, actor=actor, reason=reason, force=force)
    except RegistryError as exc:
        _refused(exc)
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

    params = _load(params_path) if params_path.is_file() else Params()
    _require_reason("a rollback", reason)
    try:
        with _mlflow(params):
            result = run_rollback(
                name, actor=actor, reason=reason, lock_timeout_s=params.registry.promotion.lock_timeout_s
            )
    except RegistryError as exc:
        _refused(exc)
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

    params = _load(params_path) if params_path.is_file() else Params()
    try:
        with _mlflow(params):
            state = registry_state(name)
    except RegistryError as exc:
        _fail(str(exc))
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
        _fail(str(exc), EXIT_UNREACHABLE)


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
        _fail(str(exc))


def _param_pairs(pairs: list[str] | None) -> dict[str, str]:
    from sermtl.mlops.kfp_client import KfpError, parse_param_pairs

    try:
        return parse_param_pairs(pairs or [])
    except KfpError as exc:
        _fail(str(exc))


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
        _fail(str(exc))
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
        _fail(str(exc))
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
        _fail(str(exc))
    _echo_upload(result.upload)
    state = "created" if result.created else "already exists, kept"
    typer.echo(
        f"recurring run {result.name!r} ({result.recurring_run_id}): {state}; cron {result.cron!r}, "
        f"max concurrency {result.max_concurrency}\n{result.url}"
    )


def main() -> None:
    for name, value in (("GX_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(name, value)
    app()


if __name__ == "__main__":
    main()
