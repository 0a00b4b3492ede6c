"""The pipeline's steps as commands: synth, ingest, validate, train, results, significance, compare."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sermtl.cli.common import (
    Device,
    ParamsOption,
    Subset,
    app,
    fail,
    load,
    mlflow_calls,
)
from sermtl.data.sources import CorpusError
from sermtl.errors import EXIT_BAD_INPUT, EXIT_UNREACHABLE, ServiceUnreachable
from sermtl.fsutil import OutputFolderError
from sermtl.params import DEFAULT_PARAMS_PATH
from sermtl.schema import DEFAULT_TRAIN_DIR, run_dir


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

    # Without a params file: the section's defaults (IEMOCAP's mean duration), synthesize's too.
    settings = load(params_path).data.synth if params_path.is_file() else SynthParams()
    given = {
        "utterances": utterances,
        "seed": seed,
        "mean_duration_s": mean_duration,
        "cue_span": cue_span,
        "cue_sharing": cue_sharing,
        "null_labels": null_labels,
    }
    # synthesize checks the options given (its message names the option, not a params.yaml key).
    chosen = dataclasses.asdict(settings) | {k: v for k, v in given.items() if v is not None}
    try:
        summary = synthesize(out, **chosen, progress=sys.stderr.isatty())
    except (OutputFolderError, ValueError) as exc:
        fail(str(exc))
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

    params = load(params_path)
    if endpoint_url is not None:
        try:
            data = dataclasses.replace(params.data, s3_endpoint_url=endpoint_url)
        except ValueError:  # pydantic's check of data.s3_endpoint_url
            fail(f"--endpoint-url: must be an http(s):// URL (got {endpoint_url!r})")
        params = dataclasses.replace(params, data=data)
    try:
        report = run_ingest(
            source or params.data.corpus, out, params, force=force, progress=sys.stderr.isatty()
        )
    except (CorpusError, OutputFolderError) as exc:
        fail(str(exc))
    except ServiceUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
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

    params = load(params_path)
    try:
        summary = run_validation(ingest_dir, out, params)
    except (ValidationInputError, OutputFolderError) as exc:
        fail(str(exc))
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
    params = load(params_path)
    from sermtl.data.audio import CorruptStoreError
    from sermtl.train.training import TrainingError, train_fold

    if system not in params.systems:
        fail(f"unknown system {system!r}; valid: {', '.join(sorted(params.systems))}")
    folds = len(params.data.sessions)
    if not 0 <= fold < folds:
        fail(f"fold {fold} is out of range; valid: 0..{folds - 1} (one per session)")
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
        fail(str(exc))
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

    params = load(params_path)
    try:
        table = collect_results(train_dir, out, params, store)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo((out / RESULTS_MARKDOWN).read_text())
    if track:
        from sermtl.mlops.tracking import track_study

        version = study_data_version(data_version, params.data.corpus, store)
        with mlflow_calls(params):
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

    params = load(params_path)
    try:
        report = run_significance(train_dir, out, params)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
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

    params = load(params_path) if params_path.is_file() or params_path != DEFAULT_PARAMS_PATH else Params()
    try:
        with mlflow_calls(params, EXIT_BAD_INPUT):
            comparison, paths = run_compare(
                study, experiment=experiment, out_dir=out, subset=subset.value, params=params, log=log
            )
    except (CompareError, FileNotFoundError, OutputFolderError) as exc:
        fail(str(exc))
    typer.echo(comparison.to_markdown())
    logged = f"; logged on run {comparison.study_id} under comparison/" if log else ""
    typer.echo(f"wrote {', '.join(str(path) for path in paths.values())}{logged}")
