"""The sermtl Kubeflow DAG: ingest -> validate -> train every (system, fold) -> collect the study ->
test significance -> registration gate -> (if passed) register the proposed model as `challenger`.

The whole params.yaml travels as one string parameter so that the cluster run and the local run
read exactly the same settings as the DVC stages and the CLI.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics

from components.collect import collect_study
from components.decide import register_model, registration_gate, test_significance
from components.ingest import ingest_corpus
from components.train import plan_study, train_system_fold
from components.validate import validate_corpus

PIPELINE_NAME = "sermtl"

# Requests compiled into the YAML for the cluster scheduler (the local runner ignores them).
INGEST_RESOURCES = {"cpu": "2", "memory": "4Gi"}
VALIDATE_RESOURCES = {"cpu": "1", "memory": "2Gi"}
PLAN_RESOURCES = {"cpu": "0.5", "memory": "512Mi"}
TRAIN_RESOURCES = {"cpu": "4", "memory": "16Gi"}
COLLECT_RESOURCES = {"cpu": "1", "memory": "4Gi"}
SIGNIFICANCE_RESOURCES = {"cpu": "1", "memory": "2Gi"}
GATE_RESOURCES = {"cpu": "0.5", "memory": "1Gi"}
REGISTER_RESOURCES = {"cpu": "1", "memory": "4Gi"}

# Keep third-party telemetry off in every task, locally and on the cluster.
TASK_ENV = {"GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


class PipelineOutputs(NamedTuple):
    corpus_store: Dataset
    validation_report: HTML
    validation_summary: Metrics
    validation_docs: Artifact
    study_results: Dataset
    results_report: HTML
    results_table: Markdown
    significance: Dataset
    significance_report: HTML
    significance_table: Markdown


def _configure(task: dsl.PipelineTask, display_name: str, resources: dict[str, str]) -> dsl.PipelineTask:
    task.set_display_name(display_name)
    task.set_cpu_request(resources["cpu"]).set_memory_request(resources["memory"])
    for name, value in TASK_ENV.items():
        task.set_env_variable(name, value)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "Speech emotion recognition (attention-augmented multi-task learning): ingest the "
        "IEMOCAP-layout corpus into the training audio store, validate it with great-expectations, train "
        "the proposed system and its baselines leave-one-session-out, test significance, and register the "
        "proposed model in MLflow if it passes the gate."
    ),
)
def sermtl_pipeline(corpus_uri: str, params_yaml: str, data_version: str = "") -> PipelineOutputs:
    """Ingest and validate the corpus, train the study, collect it; params_yaml is params.yaml's text.

    data_version names the corpus version (the DVC hash) for the MLflow tags.
    """
    ingest = _configure(
        ingest_corpus(corpus_uri=corpus_uri, params_yaml=params_yaml), "Ingest corpus", INGEST_RESOURCES
    )
    validate = _configure(
        validate_corpus(corpus_store=ingest.outputs["corpus_store"], params_yaml=params_yaml),
        "Validate corpus",
        VALIDATE_RESOURCES,
    )
    plan = _configure(plan_study(params_yaml=params_yaml), "Plan study", PLAN_RESOURCES)
    plan.after(validate)  # nothing trains on a corpus that failed validation
    with dsl.ParallelFor(plan.output) as run:
        train = _configure(
            train_system_fold(
                corpus_store=ingest.outputs["corpus_store"],
                params_yaml=params_yaml,
                system=run.system,
                fold=run.fold,
            ),
            "Train system/fold",
            TRAIN_RESOURCES,
        )
    collect = _configure(
        collect_study(
            corpus_store=ingest.outputs["corpus_store"],
            trained_runs=dsl.Collected(train.outputs["trained_run"]),
            params_yaml=params_yaml,
            data_version=data_version,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "Collect study",
        COLLECT_RESOURCES,
    )
    significance = _configure(
        test_significance(study_results=collect.outputs["study_results"], params_yaml=params_yaml),
        "Test significance",
        SIGNIFICANCE_RESOURCES,
    )
    gate = _configure(
        registration_gate(
            significance=significance.outputs["significance"],
            study_results=collect.outputs["study_results"],
            params_yaml=params_yaml,
        ),
        "Registration gate",
        GATE_RESOURCES,
    )
    with dsl.If(gate.output == "passed", name="gate-passed"):
        _configure(
            register_model(
                proposed_runs=collect.outputs["proposed_runs"],
                significance=significance.outputs["significance"],
                study_results=collect.outputs["study_results"],
                params_yaml=params_yaml,
            ),
            "Register model",
            REGISTER_RESOURCES,
        )
    return PipelineOutputs(
        corpus_store=ingest.outputs["corpus_store"],
        validation_report=validate.outputs["validation_report"],
        validation_summary=validate.outputs["validation_summary"],
        validation_docs=validate.outputs["validation_docs"],
        study_results=collect.outputs["study_results"],
        results_report=collect.outputs["results_report"],
        results_table=collect.outputs["results_table"],
        significance=significance.outputs["significance"],
        significance_report=significance.outputs["significance_report"],
        significance_table=significance.outputs["significance_table"],
    )


def compile_pipeline(path: str | Path) -> Path:
    """Compile the DAG to a KFP IR YAML (deterministic bytes, so it can be diffed and golden-tested)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=sermtl_pipeline, package_path=str(path))
    return path


if __name__ == "__main__":
    import sys

    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else "sermtl_pipeline.yaml"))
