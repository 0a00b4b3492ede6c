"""Collect component: the study's results table, its report, and its MLflow parent and child runs."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def collect_study(
    corpus_store: Input[Dataset],
    trained_runs: Input[list[Model]],
    params_yaml: str,
    data_version: str,
    pipeline_run_id: str,
    pipeline_task: str,
    study_results: Output[Dataset],
    results_report: Output[HTML],
    results_table: Output[Markdown],
    study_metrics: Output[Metrics],
    proposed_runs: Output[Model],
) -> None:
    """Pool every run into the results table (JSON/Markdown/HTML) and log the study to MLflow, its runs
    tagged with the KFP run (pipeline_run_id) and task (pipeline_task) that logged them."""
    from sermtl.pipeline_runner import collect_step

    metrics = collect_step(
        [run.path for run in trained_runs],
        corpus_store.path,
        params_yaml,
        study_results.path,
        results_report.path,
        results_table.path,
        data_version=data_version,
        pipeline_run_id=pipeline_run_id,
        pipeline_task=pipeline_task,
        proposed_dir=proposed_runs.path,
    )
    for name, value in metrics.items():
        study_metrics.log_metric(name, value)
