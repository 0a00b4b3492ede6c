"""Validate component: data-quality expectations on the corpus store; a failure stops the DAG."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def validate_corpus(
    corpus_store: Input[Dataset],
    params_yaml: str,
    validation_report: Output[HTML],
    validation_summary: Output[Metrics],
    validation_docs: Output[Artifact],
) -> None:
    """Run sermtl.validation; writes the HTML report and Data Docs, raises RuntimeError on failure."""
    from sermtl.pipeline_runner import validate_step

    metrics = validate_step(corpus_store.path, params_yaml, validation_report.path, validation_docs.path)
    for name, value in metrics.items():
        validation_summary.log_metric(name, value)
