"""The sermtl Kubeflow DAG: fingerprint -> ingest -> validate -> train every (system, fold) -> collect ->
significance -> gate -> register the proposed model as `challenger`. Parameters, cluster settings and
caching: docs/design/pipeline.md."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
import dataclasses
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics

from components import resolve_images
from components.collect import collect_study
from components.decide import register_model, registration_gate, test_significance
from components.ingest import fingerprint_corpus, ingest_corpus
from components.train import plan_study, train_system_fold
from components.validate import validate_corpus
from sermtl.params import ClusterParams, load_params

PIPELINE_NAME = "sermtl"
REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_PATH = REPO_ROOT / "params.yaml"  # whose `cluster` section the module-level pipeline is built with

# Keep third-party telemetry off in every task, locally and on the cluster.
TASK_ENV = {"GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}

# Which Secrets (cluster.secrets) each step gets as environment variables: the corpus bucket for the steps
# that read an s3:// corpus, the MLflow client settings for the steps that talk to MLflow. Training,
# validation and planning read only KFP artifacts and params: they get no credentials.
STEP_SECRETS: dict[str, tuple[str, ...]] = {
    "fingerprint": ("s3",),
    "ingest": ("s3",),
    "collect": ("mlflow",),
    "significance": ("mlflow",),
    "gate": ("mlflow",),
    "register": ("mlflow",),
}
# Steps whose cache is off. They write to MLflow (the study and its children, the significance report,
# the gate decision, the registered version): a cache hit would skip that and leave the new run without
# its study in MLflow. fingerprint must look at the corpus on every run (it is ingest's cache key).
NOT_CACHED = frozenset({"fingerprint", "collect", "significance", "gate", "register"})


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


def cluster_params(path: Path = PARAMS_PATH) -> ClusterParams:
    """The `cluster` section of params.yaml (profile applied); the defaults when there is no such file."""
    return load_params(path).cluster if path.is_file() else ClusterParams()


def _configure(
    task: dsl.PipelineTask, step: str, display_name: str, cluster: ClusterParams, image: str
) -> dsl.PipelineTask:
    """Name, image, requests/limits, retries, env, Secrets and caching of one task (cluster.steps.<step>)."""
    settings = getattr(cluster.steps, step)
    task.set_display_name(display_name)
    task.set_container_image(image)
    task.set_cpu_request(settings.cpu).set_memory_request(settings.memory)
    if settings.cpu_limit:
        task.set_cpu_limit(settings.cpu_limit)
    if settings.memory_limit:
        task.set_memory_limit(settings.memory_limit)
    retry = cluster.retry
    task.set_retry(
        num_retries=retry.count if settings.retries < 0 else settings.retries,
        backoff_duration=f"{retry.backoff_s}s",
        backoff_factor=retry.backoff_factor,
        backoff_max_duration=f"{retry.backoff_max_s}s",
    )
    for name, value in TASK_ENV.items():
        task.set_env_variable(name, value)
    for role in STEP_SECRETS.get(step, ()):
        secret = getattr(cluster.secrets, role)
        if secret.name and secret.env:  # only references: the values stay in the cluster's Secret
            kubernetes.use_secret_as_env(
                task, secret_name=secret.name, secret_key_to_env=dict(sorted(secret.env.items()))
            )
    if step in NOT_CACHED:
        task.set_caching_options(enable_caching=False)
    return task


def _request_gpu(task: dsl.PipelineTask, cluster: ClusterParams) -> None:
    """Accelerator type and limit, node selector and tolerations of the training task (cluster.gpu)."""
    gpu = cluster.gpu
    task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.limit)
    for label, value in sorted(gpu.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in gpu.tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key or None,
            operator=toleration.operator,
            value=toleration.value or None,
            effect=toleration.effect or None,
        )


# long: it holds the DAG below, which reads top to bottom in the order of the compiled YAML.
def build_pipeline(cluster: ClusterParams):
    """The @dsl.pipeline for these cluster settings (the module's `sermtl_pipeline` uses params.yaml's)."""
    cpu_image, cuda_image = resolve_images(cluster.images.cpu, cluster.images.cuda)
    # The CUDA image only where a GPU is asked for; without one, training runs on the CPU image.
    train_image = cuda_image if cluster.gpu.enabled else cpu_image

    # long: the DAG, one task after the other as KFP compiles it; a task's settings sit beside it.
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=(
            "Speech emotion recognition (attention-augmented multi-task learning): ingest the "
            "IEMOCAP-layout corpus into the training audio store, validate it with great-expectations, "
            "train the proposed system and its baselines leave-one-session-out, test significance, and "
            "register the proposed model in MLflow if it passes the gate."
        ),
    )
    def sermtl_pipeline(corpus_uri: str, params_yaml: str, data_version: str = "") -> PipelineOutputs:
        """Ingest and validate the corpus, train the study, collect it; params_yaml is params.yaml's text.

        data_version names the corpus version (the DVC hash) for the MLflow tags and ingest's cache key.
        """
        fingerprint = _configure(
            fingerprint_corpus(corpus_uri=corpus_uri, params_yaml=params_yaml),
            "fingerprint",
            "Fingerprint corpus",
            cluster,
            cpu_image,
        )
        ingest = _configure(
            ingest_corpus(
                corpus_uri=corpus_uri,
                params_yaml=params_yaml,
                data_version=data_version,
                corpus_fingerprint=fingerprint.output,
            ),
            "ingest",
            "Ingest corpus",
            cluster,
            cpu_image,
        )
        validate = _configure(
            validate_corpus(corpus_store=ingest.outputs["corpus_store"], params_yaml=params_yaml),
            "validate",
            "Validate corpus",
            cluster,
            cpu_image,
        )
        plan = _configure(plan_study(params_yaml=params_yaml), "plan", "Plan study", cluster, cpu_image)
        plan.after(validate)  # nothing trains on a corpus that failed validation
        with dsl.ParallelFor(plan.output) as run:
            train = _configure(
                train_system_fold(
                    corpus_store=ingest.outputs["corpus_store"],
                    params_yaml=params_yaml,
                    system=run.system,
                    fold=run.fold,
                ),
                "train",
                "Train system/fold",
                cluster,
                train_image,
            )
            if cluster.gpu.enabled:
                _request_gpu(train, cluster)
        collect = _configure(
            collect_study(
                corpus_store=ingest.outputs["corpus_store"],
                trained_runs=dsl.Collected(train.outputs["trained_run"]),
                params_yaml=params_yaml,
                data_version=data_version,
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                pipeline_task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
            ),
            "collect",
            "Collect study",
            cluster,
            cpu_image,
        )
        significance = _configure(
            test_significance(study_results=collect.outputs["study_results"], params_yaml=params_yaml),
            "significance",
            "Test significance",
            cluster,
            cpu_image,
        )
        gate = _configure(
            registration_gate(
                significance=significance.outputs["significance"],
                study_results=collect.outputs["study_results"],
                params_yaml=params_yaml,
            ),
            "gate",
            "Registration gate",
            cluster,
            cpu_image,
        )
        with dsl.If(gate.output == "passed", name="gate-passed"):
            _configure(
                register_model(
                    proposed_runs=collect.outputs["proposed_runs"],
                    significance=significance.outputs["significance"],
                    study_results=collect.outputs["study_results"],
                    params_yaml=params_yaml,
                ),
                "register",
                "Register model",
                cluster,
                cpu_image,
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

    return sermtl_pipeline


CLUSTER = cluster_params()
sermtl_pipeline = build_pipeline(CLUSTER)


def compile_pipeline(path: str | Path, cluster: ClusterParams | None = None) -> Path:
    """Compile the DAG to a KFP IR YAML (deterministic bytes, so it can be diffed and golden-tested).

    `cluster` replaces params.yaml's cluster section (e.g. a cluster without GPUs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from sermtl.mlops.kfp_client import standard_yaml_dumpers

    pipeline = sermtl_pipeline if cluster is None else build_pipeline(cluster)
    with standard_yaml_dumpers():
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
    return path


def without_retries(cluster: ClusterParams) -> ClusterParams:
    """The same settings with no retry anywhere: for local runs, where a failed task is a bug to see now."""
    steps = cluster.steps
    no_retry = {
        field.name: dataclasses.replace(getattr(steps, field.name), retries=0)
        for field in dataclasses.fields(steps)
    }
    retry = dataclasses.replace(cluster.retry, count=0)
    return dataclasses.replace(cluster, retry=retry, steps=dataclasses.replace(steps, **no_retry))


if __name__ == "__main__":
    import sys

    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else "sermtl_pipeline.yaml"))
