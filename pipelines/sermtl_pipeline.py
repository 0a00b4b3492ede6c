"""The sermtl Kubeflow DAG: ingest -> validate.

The whole params.yaml travels as one string parameter so that the cluster run and the local run
read exactly the same settings as the DVC stages and the CLI.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.ingest import ingest_corpus
from components.validate import validate_corpus

PIPELINE_NAME = "sermtl"

# Requests compiled into the YAML for the cluster scheduler (the local runner ignores them).
INGEST_RESOURCES = {"cpu": "2", "memory": "4Gi"}
VALIDATE_RESOURCES = {"cpu": "1", "memory": "2Gi"}

# Keep third-party telemetry off in every task, locally and on the cluster.
TASK_ENV = {"GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


class PipelineOutputs(NamedTuple):
    corpus_store: Dataset
    validation_report: HTML
    validation_summary: Metrics
    validation_docs: Artifact


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
        "IEMOCAP-layout corpus into the training audio store, then validate it with great-expectations."
    ),
)
def sermtl_pipeline(corpus_uri: str, params_yaml: str) -> PipelineOutputs:
    """Ingest the corpus named by ``corpus_uri`` and validate it; params_yaml is params.yaml's text."""
    ingest = _configure(
        ingest_corpus(corpus_uri=corpus_uri, params_yaml=params_yaml), "Ingest corpus", INGEST_RESOURCES
    )
    validate = _configure(
        validate_corpus(corpus_store=ingest.outputs["corpus_store"], params_yaml=params_yaml),
        "Validate corpus",
        VALIDATE_RESOURCES,
    )
    return PipelineOutputs(
        corpus_store=ingest.outputs["corpus_store"],
        validation_report=validate.outputs["validation_report"],
        validation_summary=validate.outputs["validation_summary"],
        validation_docs=validate.outputs["validation_docs"],
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
