"""Decision components: significance of the proposed system, the registration gate, the registration."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def test_significance(
    study_results: Input[Dataset],
    params_yaml: str,
    significance: Output[Dataset],
    significance_report: Output[HTML],
    significance_table: Output[Markdown],
    significance_metrics: Output[Metrics],
) -> None:
    """Paired tests of the proposed system against each baseline (sermtl.significance), logged to MLflow."""
    from sermtl.pipeline_runner import significance_step

    metrics = significance_step(
        study_results.path, params_yaml, significance.path, significance_report.path, significance_table.path
    )
    for name, value in metrics.items():
        significance_metrics.log_metric(name, value)


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def registration_gate(significance: Input[Dataset], study_results: Input[Dataset], params_yaml: str) -> str:
    """ "passed" or "failed" by the gate in params.yaml (registry.gate); the reasons are logged, and a
    failure is recorded on the study's MLflow run."""
    from sermtl.pipeline_runner import gate_step

    decision, reasons = gate_step(significance.path, study_results.path, params_yaml)
    print(f"registration gate {decision}:\n{reasons}")
    return decision


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def register_model(
    proposed_runs: Input[Model],
    significance: Input[Dataset],
    study_results: Input[Dataset],
    params_yaml: str,
) -> str:
    """Register the proposed system's fold ensemble in the MLflow Model Registry as `challenger`."""
    from sermtl.pipeline_runner import register_step

    result = register_step(proposed_runs.path, significance.path, study_results.path, params_yaml)
    return f"{result['model_name']} version {result['version']}"
