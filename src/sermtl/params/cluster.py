"""The `cluster` section: how the Kubeflow pipeline is compiled for Kubernetes.

Read when the pipeline is compiled (pipelines/sermtl_pipeline.py reads the repository's params.yaml when it is
imported) and written into the compiled YAML. No step reads it at run time, and the local runner ignores it,
except the retry policy, which kfp.local 2.17 also applies."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import StrictBool as Bool
from pydantic import StrictFloat as Float
from pydantic import StrictInt as Int
from pydantic import StrictStr as Str

from sermtl.params.rules import AT_LEAST_0, AT_LEAST_1, LABEL_KEY, LABEL_VALUE, Rule, section

IMAGE = Rule(pattern=(r"\S*", "an image reference without spaces, or empty"))
CPU = r"([0-9]*[.])?[0-9]+m?"
MEMORY = r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?"
SECRET_NAME = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?"

# The keys of the two Secrets that infra/k8s/README.md defines for pipeline tasks, each mapped to the
# environment variable of the same name. sermtl-s3's MLFLOW_S3_ENDPOINT_URL is left out: artifacts go
# through the MLflow server, so no task needs it.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@section
class ImageParams:
    # Empty: components.DEFAULT_IMAGE. $SERMTL_IMAGE, when set at compile time, wins over this value.
    cpu: Annotated[Str, IMAGE] = ""
    # Empty: the CPU image with "-cuda" appended to its tag (infra/docker/README.md). $SERMTL_CUDA_IMAGE wins.
    cuda: Annotated[Str, IMAGE] = ""


@section
class TolerationParams:
    key: Annotated[Str, Rule(pattern=(f"(?:{LABEL_KEY})?", "a taint key, or empty (any key)"))] = (
        "nvidia.com/gpu"
    )
    operator: Literal["Exists", "Equal"] = "Exists"  # Equal compares `value`
    value: Annotated[Str, Rule(pattern=(LABEL_VALUE, "a taint value"))] = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] = "NoSchedule"  # "": every effect


@section
class GpuParams:
    # false: training runs on the CPU image without accelerator, node selector or tolerations.
    enabled: Bool = True
    # the extended resource the device plugin advertises
    accelerator_type: Annotated[
        Str, Rule(pattern=(r"[A-Za-z0-9][-A-Za-z0-9_./]*", "a resource name (nvidia.com/gpu)"))
    ] = "nvidia.com/gpu"
    limit: Annotated[Int, AT_LEAST_1] = 1
    # label -> value, e.g. a GPU node pool
    node_selector: Annotated[
        dict[Str, Str], Rule(key_pattern=(LABEL_KEY, "a node label"), pattern=(LABEL_VALUE, "a label value"))
    ] = field(default_factory=dict)
    tolerations: list[TolerationParams] = field(default_factory=lambda: [TolerationParams()])


@section
class RetryParams:
    count: Annotated[Int, AT_LEAST_0] = (
        2  # retries after a failed attempt, for every step (a step may set its own)
    )
    backoff_s: Annotated[Int, AT_LEAST_0] = 15  # wait before the first retry
    backoff_factor: Annotated[Float, Rule(at_least=1.0)] = 2.0  # each further wait is this many times longer
    backoff_max_s: Annotated[Int, AT_LEAST_0] = (
        600  # kfp's backoff_max_duration: the most the backoff grows to
    )


@section
class StepParams:
    # requests, Kubernetes quantities
    cpu: Annotated[Str, Rule(pattern=(CPU, "a CPU quantity such as 2, 0.5 or 500m"))] = "1"
    memory: Annotated[Str, Rule(pattern=(MEMORY, "a memory quantity such as 4Gi or 512Mi"))] = "2Gi"
    # empty: no limit
    cpu_limit: Annotated[
        Str, Rule(pattern=(f"(?:{CPU})?", "a CPU quantity such as 2 or 500m, or empty (no limit)"))
    ] = ""
    memory_limit: Annotated[
        Str, Rule(pattern=(f"(?:{MEMORY})?", "a memory quantity such as 8Gi, or empty (no limit)"))
    ] = ""
    retries: Annotated[Int, Rule(at_least=-1)] = -1  # -1: cluster.retry.count


def _step(cpu: str, memory: str, memory_limit: str) -> StepParams:
    return StepParams(cpu, memory, memory_limit=memory_limit)


@section
class StepsParams:
    """One entry per pipeline step; a step left out of params.yaml keeps these requests."""

    fingerprint: StepParams = field(default_factory=lambda: _step("0.5", "512Mi", "1Gi"))
    ingest: StepParams = field(default_factory=lambda: _step("2", "4Gi", "8Gi"))
    validate: StepParams = field(default_factory=lambda: _step("1", "2Gi", "4Gi"))
    plan: StepParams = field(default_factory=lambda: _step("0.5", "512Mi", "1Gi"))
    train: StepParams = field(default_factory=lambda: _step("4", "16Gi", "32Gi"))
    collect: StepParams = field(default_factory=lambda: _step("1", "4Gi", "8Gi"))
    significance: StepParams = field(default_factory=lambda: _step("1", "2Gi", "4Gi"))
    gate: StepParams = field(default_factory=lambda: _step("0.5", "1Gi", "2Gi"))
    register: StepParams = field(default_factory=lambda: _step("1", "4Gi", "8Gi"))


@section
class SecretParams:
    # Kubernetes Secret in the run's namespace; empty: none is mounted
    name: Annotated[Str, Rule(pattern=(SECRET_NAME, "a Kubernetes object name (lowercase), or empty"))] = ""
    # Secret key -> environment variable of the task
    env: Annotated[
        dict[Str, Str],
        Rule(
            key_pattern=(r"[-._A-Za-z0-9]+", "a Secret key"),
            pattern=(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name"),
        ),
    ] = field(default_factory=dict)


@section
class SecretsParams:
    # MLflow client settings: for the steps that write to MLflow (collect, significance, gate, register).
    mlflow: SecretParams = field(
        default_factory=lambda: SecretParams("sermtl-mlflow", {k: k for k in MLFLOW_SECRET_KEYS})
    )
    # The corpus bucket: for the steps that read an s3:// corpus (fingerprint, ingest).
    s3: SecretParams = field(
        default_factory=lambda: SecretParams("sermtl-s3", {k: k for k in S3_SECRET_KEYS})
    )


@section
class ClusterParams:
    images: ImageParams = field(default_factory=ImageParams)
    gpu: GpuParams = field(default_factory=GpuParams)
    retry: RetryParams = field(default_factory=RetryParams)
    steps: StepsParams = field(default_factory=StepsParams)
    secrets: SecretsParams = field(default_factory=SecretsParams)
