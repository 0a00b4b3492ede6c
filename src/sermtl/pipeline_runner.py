"""The library side of the Kubeflow components: one call per component, plain paths in, plain data out.

Components stay thin (import sermtl, call one function here, attach the result to their artifacts),
so the logic is tested without kfp and runs identically in the local runner and on a cluster.

Every step that talks to MLflow does so inside sermtl.mlops.tracking.mlflow_service: retries bounded by
`tracking.retry_budget_s`, and a server that cannot be reached fails the step with one
ServiceUnreachable naming it (credentials removed) after the runs it created were marked FAILED.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sermtl.fsutil import write_json
from sermtl.params import params_from_yaml
from sermtl.reports import html_page

PARAMS_WHERE = "params_yaml (pipeline parameter)"
STUDY_FILE = "study.json"  # in the collect step's output: the study's MLflow run id and data version
# Ingest report fields put on the corpus-store artifact; the long per-file lists stay in report.json.
INGEST_METADATA_KEYS = (
    "source",
    "fingerprint",
    "sample_rate",
    "annotated",
    "kept",
    "dropped",
    "drops_by_reason",
    "kept_by_session",
    "resampled_by_rate",
    "excluded_sessions",
    "audio_hours",
)
INGEST_COUNTED_LISTS = ("unannotated_wavs", "stray_wavs", "hidden_files")


class ValidationFailed(RuntimeError):
    """The corpus store broke data-quality expectations; raised so the DAG stops before training."""


def fingerprint_step(corpus_uri: str, params_yaml: str) -> str:
    """`listing:<sha256>` of the corpus' file listing: relative paths, sizes and ETags (s3://) or mtimes.

    The same listing hash that sermtl.data.ingest uses to tell whether a store is up to date, so it changes
    whenever a file is added, removed or rewritten. Only the listing is read, not the audio.
    """
    from sermtl.data.sources import listing_fingerprint, open_source

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    files = open_source(corpus_uri, params.data.s3_endpoint_url).list_files()
    return f"listing:{listing_fingerprint(files)}"


def ingest_step(
    corpus_uri: str,
    params_yaml: str,
    out_dir: str | Path,
    *,
    data_version: str = "",
    corpus_fingerprint: str = "",
) -> dict[str, Any]:
    """Ingest ``corpus_uri`` into ``out_dir``; return the metadata for the corpus-store artifact.

    ``data_version`` and ``corpus_fingerprint`` (fingerprint_step) are what the pipeline keys this step's
    cache on; they are recorded on the artifact as given.
    """
    from sermtl.data.ingest import ingest

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    report = ingest(corpus_uri, Path(out_dir), params, progress=False).to_dict()
    metadata = {key: report[key] for key in INGEST_METADATA_KEYS if key in report}
    metadata.update({key: len(report[key]) for key in INGEST_COUNTED_LISTS if key in report})
    metadata["utterances"] = report.get("kept", 0)
    metadata["params_data_hash"] = params.section_hash("data")
    metadata["data_version"] = data_version
    metadata["corpus_fingerprint"] = corpus_fingerprint
    return metadata


def validate_step(
    corpus_dir: str | Path, params_yaml: str, report_html: str | Path, docs_dir: str | Path
) -> dict[str, float]:
    """Validate the corpus store: Data Docs + summary.json to ``docs_dir``, one HTML page to ``report_html``.

    Returns scalar metrics for a KFP Metrics artifact. Raises ValidationFailed (after writing both
    reports, so they can be inspected) when any expectation failed.
    """
    from sermtl.data.validate import validate

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    summary = validate(Path(corpus_dir), Path(docs_dir), params)
    payload = _read_json(summary.summary_path)
    metrics = validation_metrics(summary.success, payload)
    failures = "" if summary.success else summary.describe_failures()
    report_html = Path(report_html)
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(render_report(summary.success, metrics, failures, payload, summary.data_docs_path))
    if not summary.success:
        raise ValidationFailed(f"corpus validation failed:\n{failures}")
    return metrics


def _read_json(path: Any) -> dict[str, Any]:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def validation_metrics(success: bool, payload: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics from summary.json (KFP Metrics hold numbers only): success as 0/1 and counts."""
    entries = payload.get("expectations") or []
    evaluated = payload.get("evaluated_expectations", len(entries))
    failed = payload.get("unsuccessful_expectations", sum(not e.get("success", True) for e in entries))
    metrics = {
        "success": 1.0 if success else 0.0,
        "evaluated_expectations": float(evaluated),
        "failed_expectations": float(failed),
    }
    rows = (payload.get("statistics") or {}).get("rows")
    if isinstance(rows, int | float):
        metrics["validated_utterances"] = float(rows)
    return metrics


def _expectation_row(entry: dict[str, Any]) -> str:
    ok = bool(entry.get("success"))
    cells = (
        entry.get("name", "?"),
        entry.get("table", ""),
        entry.get("column") or "",
        "ok" if ok else "FAILED",
        "" if entry.get("unexpected_count") is None else entry["unexpected_count"],
    )
    tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
    return f"<tr class='{'ok' if ok else 'bad'}'>{tds}</tr>"


def render_report(
    success: bool,
    metrics: dict[str, float],
    failures: str,
    payload: dict[str, Any],
    data_docs_path: Any = None,
) -> str:
    """One self-contained HTML page (no scripts, no CDN): what the KFP UI shows for the HTML artifact.

    The great-expectations Data Docs are a multi-page site that loads assets from a CDN, so they
    travel in their own artifact; this page summarises them from summary.json.
    """
    verdict = "passed" if success else "FAILED"
    entries = sorted(payload.get("expectations") or [], key=lambda e: bool(e.get("success")))
    rows = "".join(_expectation_row(e) for e in entries)
    header = "".join(f"<th>{h}</th>" for h in ("expectation", "table", "column", "result", "unexpected"))
    table = f"<h2>Expectations</h2><table><tr>{header}</tr>{rows}</table>" if rows else ""
    metric_items = "".join(f"<li>{html.escape(k)}: {v:g}</li>" for k, v in metrics.items())
    failure_block = f"<h2>Failures</h2><pre>{html.escape(failures)}</pre>" if failures else ""
    docs = (
        f"<p>Great-expectations Data Docs: {html.escape(str(data_docs_path))}</p>" if data_docs_path else ""
    )
    raw = html.escape(json.dumps(payload, indent=2, sort_keys=True, default=str))
    style = (
        "td,th{text-align:left}.ok td:nth-child(4){color:#1a7f37}"
        ".bad td:nth-child(4){color:#cf222e;font-weight:bold}"
        "pre{background:#f6f8fa;padding:1em;overflow:auto}"
        ".passed{color:#1a7f37}.FAILED{color:#cf222e}"
    )
    body = (
        f"<h1>Corpus validation <span class='{verdict}'>{verdict}</span></h1>"
        f"<ul>{metric_items}</ul>{failure_block}{table}{docs}"
        f"<details><summary>summary.json</summary><pre>{raw}</pre></details>"
    )
    return html_page("sermtl corpus validation", body, style)


def dvc_data_version(corpus_uri: str, repo_root: str | Path = ".") -> str:
    """The md5 that `data.dvc` records for the folder holding the corpus, or "" if DVC does not track it.

    This names the corpus version in MLflow tags; `dvc status data.dvc` says whether the workspace
    still matches it.
    """
    import yaml

    dvc_file = Path(repo_root) / "data.dvc"
    if corpus_uri.startswith("s3://") or not dvc_file.is_file():
        return ""
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    except yaml.YAMLError:
        return ""
    corpus = Path(corpus_uri).resolve()
    for out in outs:
        tracked = (dvc_file.parent / str(out.get("path", ""))).resolve()
        if out.get("md5") and (corpus == tracked or tracked in corpus.parents):
            return f"dvc:{out['md5']}"
    return ""


def study_data_version(given: str, corpus_uri: str = "", store_dir: str | Path | None = None) -> str:
    """The corpus version for MLflow tags: as given, else the DVC hash, else the ingest fingerprint."""
    version = given or (dvc_data_version(corpus_uri) if corpus_uri else "")
    if not version and store_dir is not None:
        fingerprint = _read_json(Path(store_dir) / "report.json").get("fingerprint")
        version = f"ingest:{fingerprint}" if fingerprint else ""
    return version


def plan_step(params_yaml: str) -> list[dict[str, Any]]:
    """Every (system, fold) of the study: the items of the DAG's ParallelFor."""
    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    return [
        {"system": system, "fold": fold}
        for system in params.systems
        for fold in range(len(params.data.sessions))
    ]


def train_step(
    store_dir: str | Path, params_yaml: str, system: str, fold: int, out_dir: str | Path
) -> dict[str, float]:
    """Train and evaluate one (system, fold) into ``out_dir``; return its test metrics for KFP."""
    from sermtl.evaluate.metrics import flat_metrics
    from sermtl.train.training import train_fold

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    result = train_fold(Path(store_dir), system, int(fold), Path(out_dir), params, progress=False)
    return flat_metrics({"all": result["evaluation"]["all"]}, prefix="test_")


def link_runs(run_dirs: list[str], train_dir: Path) -> Path:
    """Lay KFP's flat list of run folders out as <train_dir>/<system>/fold<k> (symlinks), as the CLI has them.

    Each run names its (system, fold) in metrics.json.
    """
    from sermtl.schema import RUN_METRICS_FILE, run_dir

    for run in run_dirs:
        meta = _read_json(Path(run) / RUN_METRICS_FILE)
        if "system" not in meta or "fold" not in meta:
            raise FileNotFoundError(f"{run}: no {RUN_METRICS_FILE} naming its system and fold")
        link = run_dir(train_dir, meta["system"], meta["fold"])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(run).resolve(), target_is_directory=True)
    return train_dir


def collect_step(
    run_dirs: list[str],
    store_dir: str | Path,
    params_yaml: str,
    results_dir: str | Path,
    report_html: str | Path,
    table_markdown: str | Path,
    *,
    data_version: str = "",
    pipeline_run_id: str = "",
    pipeline_task: str = "",
    track: bool = True,
    proposed_dir: str | Path | None = None,
) -> dict[str, float]:
    """Results table of the study from the ParallelFor's run folders, logged to MLflow as one study.

    ``pipeline_run_id`` and ``pipeline_task`` (the KFP run and the task logging the study) become the
    `sermtl.kfp_run_id` and `sermtl.kfp_task` tags of the study run and, inherited, of its children.

    ``proposed_dir`` receives a copy of the proposed system's fold runs (<system>/fold<k>), what the
    register step needs, so that it does not have to gather the ParallelFor's outputs again.

    KFP hands the runs over as a flat list of folders; each names its (system, fold) in metrics.json,
    so they are linked into the artifacts/train/<system>/fold<k> layout that `sermtl results` reads.
    """
    import tempfile

    from sermtl.evaluate.results import RESULTS_HTML, RESULTS_MARKDOWN, collect_results
    from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    proposed_kind = OutputKind.of("collect-proposed", [params.eval.proposed_system])
    if proposed_dir is not None:
        check_output_dir(proposed_dir, proposed_kind, [("store", store_dir or None)])
    with tempfile.TemporaryDirectory(prefix="sermtl-study-") as scratch:
        train_dir = link_runs(run_dirs, Path(scratch) / "train")
        table = collect_results(train_dir, Path(results_dir), params, store_dir or None)
        version = study_data_version(data_version, store_dir=store_dir)
        study = {"data_version": version, "pipeline_run_id": pipeline_run_id, "study_run_id": ""}
        if track:
            from sermtl.mlops.tracking import TAG_KFP_RUN, TAG_KFP_TASK, mlflow_service, track_study

            kfp_tags = {TAG_KFP_RUN: pipeline_run_id or None, TAG_KFP_TASK: pipeline_task or None}
            with mlflow_service(params):
                study["study_run_id"] = track_study(
                    train_dir,
                    Path(store_dir),
                    Path(results_dir),
                    table,
                    params,
                    version,
                    pipeline_run_id,
                    tags=kfp_tags,
                )
        write_json(Path(results_dir) / STUDY_FILE, study)  # what the decision steps need of the study
        if proposed_dir is not None:
            import shutil

            system = params.eval.proposed_system
            with atomic_directory(Path(proposed_dir), proposed_kind) as staging:
                shutil.copytree(train_dir / system, staging / system, symlinks=False)
    for source, target in ((RESULTS_HTML, report_html), (RESULTS_MARKDOWN, table_markdown)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text((Path(results_dir) / source).read_text())
    pooled = table[table["subset"] == "all"]
    return {f"pooled_uar_{row.system}_{row.dimension}": float(row.pooled_uar) for row in pooled.itertuples()}


def read_study(results_dir: str | Path) -> dict[str, str]:
    """The collect step's study.json: study_run_id ("" when untracked), data_version, pipeline_run_id."""
    path = Path(results_dir) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study record (the collect step writes it)")
    return {key: str(value) for key, value in _read_json(path).items()}


def significance_step(
    results_dir: str | Path,
    params_yaml: str,
    out_dir: str | Path,
    report_html: str | Path,
    table_markdown: str | Path,
    *,
    track: bool = True,
) -> dict[str, float]:
    """Paired tests of the proposed system against each baseline on the study's pooled predictions.

    Writes significance.{json,md,html} to ``out_dir``, copies the page and table to the KFP outputs,
    logs them on the study's MLflow run, and returns the corrected p-values and differences as metrics.
    """
    import pandas as pd

    from sermtl.evaluate.metrics import validate_predictions
    from sermtl.evaluate.results import POOLED_PREDICTIONS
    from sermtl.evaluate.significance import significance_tests, write_report
    from sermtl.schema import SIGNIFICANCE_HTML, SIGNIFICANCE_MARKDOWN

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    path = Path(results_dir) / POOLED_PREDICTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pooled predictions (the collect step writes them)")
    report = significance_tests(validate_predictions(pd.read_parquet(path), str(path)), params)
    write_report(report, Path(out_dir))
    for source, target in ((SIGNIFICANCE_HTML, report_html), (SIGNIFICANCE_MARKDOWN, table_markdown)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text((Path(out_dir) / source).read_text())
    study_run_id = read_study(results_dir)["study_run_id"]
    if track and study_run_id:
        from sermtl.evaluate.compare import log_significance
        from sermtl.mlops.tracking import mlflow_service

        with mlflow_service(params):
            log_significance(study_run_id, Path(out_dir))
    metrics = {}
    for c in report.comparisons:
        key = f"{c.baseline}_{c.dimension}"
        metrics[f"uar_difference_{key}"] = float(c.difference)
        metrics.update({f"p_{test}_{key}": float(p) for test, p in c.p_adjusted.items()})
    return metrics


GATE_PASSED, GATE_FAILED = "passed", "failed"


def gate_step(significance_dir: str | Path, results_dir: str | Path, params_yaml: str) -> tuple[str, str]:
    """The registration gate on the significance report: ("passed" | "failed", the reasons as text).

    A failed gate is recorded on the study's MLflow run here (nothing downstream runs); a passed one is
    recorded by the register step together with the registration.
    """
    from sermtl.evaluate.gate import gate_decision
    from sermtl.evaluate.significance import read_report
    from sermtl.mlops.registry import record_gate_decision

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    decision = gate_decision(read_report(Path(significance_dir)), params.registry.gate)
    study_run_id = read_study(results_dir)["study_run_id"]
    if study_run_id and not decision.passed:
        from sermtl.mlops.tracking import mlflow_service

        with mlflow_service(params):
            record_gate_decision(study_run_id, decision, params)
    return (GATE_PASSED if decision.passed else GATE_FAILED), "\n".join(decision.reasons)


def register_step(
    train_dir: str | Path, significance_dir: str | Path, results_dir: str | Path, params_yaml: str
) -> dict[str, str]:
    """Register the proposed system's fold ensemble as the `challenger` version (after a passed gate).

    ``train_dir`` holds <proposed system>/fold<k> (the collect step's copy, or a CLI train dir).
    """
    from sermtl.evaluate.significance import read_report
    from sermtl.mlops.registry import register_study_model
    from sermtl.mlops.tracking import mlflow_service

    params = params_from_yaml(params_yaml, PARAMS_WHERE)
    study = read_study(results_dir)
    if not study["study_run_id"]:
        raise RuntimeError(f"{results_dir}: the study was not tracked in MLflow: nothing to register")
    with mlflow_service(params):
        result = register_study_model(
            study["study_run_id"],
            Path(train_dir),
            read_report(Path(significance_dir)),
            params,
            data_version=study["data_version"] or None,
            pipeline_run_id=study["pipeline_run_id"] or None,
        )
    return {
        "model_name": result.name,
        "version": str(result.version or ""),
        "model_uri": str(result.model_uri or ""),
        "reused": str(result.reused).lower(),
    }
