"""The `sermtl` command line: one subcommand per pipeline step, all reading params.yaml."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sermtl.params import DEFAULT_PARAMS_PATH, ParamsError, load_params
from sermtl.sources import CorpusError

app = typer.Typer(
    help="Speech emotion recognition pipeline (arousal, valence, dominance; attention-augmented multi-task).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (params.yaml).")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _load(params_path: Path):
    try:
        return load_params(params_path)
    except ParamsError as exc:
        _fail(str(exc))


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
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Generate a synthetic corpus in the exact IEMOCAP_full_release layout and annotation format.

    Defaults come from the data.synth section of params.yaml.
    """
    from sermtl.synth import synthesize

    settings = _load(params_path).data.synth if params_path.is_file() else None
    summary = synthesize(
        out,
        utterances=utterances if utterances is not None else settings.utterances if settings else 400,
        seed=seed if seed is not None else settings.seed if settings else 0,
        mean_duration_s=mean_duration
        if mean_duration is not None
        else settings.mean_duration_s
        if settings
        else 4.45,
        progress=sys.stderr.isatty(),
    )
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

    from sermtl.ingest import ingest as run_ingest

    params = _load(params_path)
    if endpoint_url is not None:
        params = dataclasses.replace(
            params, data=dataclasses.replace(params.data, s3_endpoint_url=endpoint_url)
        )
    try:
        report = run_ingest(
            source or params.data.corpus, out, params, force=force, progress=sys.stderr.isatty()
        )
    except CorpusError as exc:
        _fail(str(exc))
    state = "up to date, skipped" if report.up_to_date else "written"
    typer.echo(f"{out}: {state}. {report.summary()}")


@app.command()
def validate(
    ingest_dir: Annotated[Path, typer.Option("--ingest", help="Folder written by `sermtl ingest`.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: Data Docs HTML and summary.json.")],
    params_path: ParamsOption = DEFAULT_PARAMS_PATH,
) -> None:
    """Run the great-expectations suite over the manifest and audio statistics; non-zero exit on failure."""
    from sermtl.validation import ValidationInputError
    from sermtl.validation import validate as run_validation

    params = _load(params_path)
    try:
        summary = run_validation(ingest_dir, out, params)
    except ValidationInputError as exc:
        _fail(str(exc))
    typer.echo(f"Data Docs: {summary.data_docs_path}\nSummary: {summary.summary_path}")
    if not summary.success:
        typer.secho(summary.describe_failures(), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.echo("validation passed")


def main() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
