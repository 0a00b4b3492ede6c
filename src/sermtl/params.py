"""Experiment parameters from params.yaml, the single source shared by the CLI, DVC and KFP.

Sections are typed dataclasses so that a typo in params.yaml is an error naming the key,
not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or holds an unknown or mistyped key."""


@dataclass(frozen=True)
class Thresholds:
    low_max: float = 2.0
    high_min: float = 4.0


@dataclass(frozen=True)
class SynthParams:
    utterances: int = 400
    seed: int = 0
    mean_duration_s: float = 2.5


@dataclass(frozen=True)
class DataParams:
    corpus: str = "data/IEMOCAP_full_release"
    s3_endpoint_url: str = ""
    sample_rate: int = 16000
    sessions: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    speakers_per_session: int = 2
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_drop_fraction: float = 0.05
    synth: SynthParams = field(default_factory=SynthParams)


@dataclass(frozen=True)
class ValidationParams:
    rating_step: float = 0.5
    categories: list[str] = field(
        default_factory=lambda: ["neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx"]
    )
    min_duration_s: float = 0.3
    max_duration_s: float = 40.0
    allowed_source_sample_rates: list[int] = field(
        default_factory=lambda: [8000, 16000, 22050, 32000, 44100, 48000]
    )
    silence_rms_dbfs: float = -60.0
    clipping_fraction: float = 0.01
    max_bad_audio_fraction: float = 0.01
    # Share of wavs that no annotation names (IEMOCAP: none); more means annotations went missing.
    max_unannotated_fraction: float = 0.02
    min_class_count_per_fold: int = 1


@dataclass(frozen=True)
class FeatureParams:
    frame_ms: int = 40
    hop_ms: int = 10
    max_frames: int = 500


@dataclass(frozen=True)
class ModelParams:
    conv_channels: int = 40
    conv_kernel: int = 40
    conv_pool: int = 2
    rnn: str = "gru"
    rnn_hidden: int = 128
    rnn_layers: int = 2
    dropout: float = 0.0
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"arousal": 1.0, "valence": 1.0, "dominance": 1.0}
    )


@dataclass(frozen=True)
class TrainParams:
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    batch_size: int = 16
    max_epochs: int = 30
    early_stopping_patience: int = 5
    class_balanced_loss: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    num_workers: int = 0


@dataclass(frozen=True)
class SystemParams:
    kind: str = "neural"  # neural | egemaps
    multitask: bool = True
    pooling: str = "attention"  # attention | mean


@dataclass(frozen=True)
class EvalParams:
    proposed_system: str = "mtl_attention"
    dimensions: list[str] = field(default_factory=lambda: ["arousal", "valence", "dominance"])
    subsets: list[str] = field(default_factory=lambda: ["all", "improvised"])


@dataclass(frozen=True)
class SignificanceParams:
    # Systems the proposed system (eval.proposed_system) is compared with; empty means every other system.
    baselines: list[str] = field(default_factory=list)
    resampling: str = "bootstrap"  # bootstrap | permutation: the paired test on the UAR difference
    resamples: int = 10000
    confidence: float = 0.95  # of the bootstrap interval of the UAR difference
    alpha: float = 0.05  # family-wise: Holm runs per test over every (baseline, dimension) pair
    correction: str = "holm"  # holm | none
    subset: str = "all"  # all | improvised: which utterances are compared
    seed: int = 0


@dataclass(frozen=True)
class GateParams:
    # Which test's corrected p-values decide significance: resampling (bootstrap or permutation, as
    # significance.resampling says) | mcnemar | ztest.
    test: str = "resampling"
    # Per baseline: dimensions on which the proposed system must be significantly better.
    min_dimensions_better: int = 1
    # Over all (baseline, dimension) comparisons: how many may be significantly worse.
    max_comparisons_worse: int = 0


@dataclass(frozen=True)
class PromotionParams:
    # not_worse: the challenger is promoted if it is significantly worse than the champion on no dimension
    # and its mean UAR over dimensions is at least the champion's minus `tolerance`.
    # better: it must also be significantly better on at least one dimension.
    rule: str = "not_worse"
    tolerance: float = 0.0
    lock_timeout_s: float = 60.0  # how long a promotion waits for a concurrent one to finish


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = "sermtl-ser"
    gate: GateParams = field(default_factory=GateParams)
    promotion: PromotionParams = field(default_factory=PromotionParams)


@dataclass(frozen=True)
class ServingParams:
    max_duration_s: float = 60.0  # longer inputs are refused (memory of one request)
    max_total_duration_s: float = 120.0  # audio of all inputs of one request together
    max_request_bytes: int = 16_000_000  # request bodies larger than this are refused (413)
    min_duration_s: float = 0.1  # shorter inputs are refused; at least one frame of the front end
    return_attention: bool = False  # default for requests that do not say


@dataclass(frozen=True)
class TrackingParams:
    # Total time one MLflow call may spend retrying a server that does not answer; then it fails naming it.
    retry_budget_s: float = 20.0


# --- cluster: how the Kubeflow pipeline is compiled for Kubernetes ----------------------------------------
#
# Read when the pipeline is compiled (pipelines/sermtl_pipeline.py reads the repository's params.yaml when
# it is imported) and written into the compiled YAML. No sermtl step reads them at run time, and the local
# runner (`make run`) ignores them, except the retry policy, which kfp.local 2.17 also applies.


@dataclass(frozen=True)
class ImageParams:
    # Empty: components.DEFAULT_IMAGE. $SERMTL_IMAGE, when set at compile time, wins over this value.
    cpu: str = ""
    # Empty: the CPU image with "-cuda" appended to its tag (infra/docker/README.md). $SERMTL_CUDA_IMAGE wins.
    cuda: str = ""


@dataclass(frozen=True)
class TolerationParams:
    key: str = "nvidia.com/gpu"
    operator: str = "Exists"  # Exists | Equal (Equal compares `value`)
    value: str = ""
    effect: str = "NoSchedule"  # NoSchedule | PreferNoSchedule | NoExecute | "" (every effect)


@dataclass(frozen=True)
class GpuParams:
    # false: training runs on the CPU image without accelerator, node selector or tolerations.
    enabled: bool = True
    accelerator_type: str = "nvidia.com/gpu"  # the extended resource the device plugin advertises
    limit: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)  # label -> value, e.g. a GPU node pool
    tolerations: list[TolerationParams] = field(default_factory=lambda: [TolerationParams()])


@dataclass(frozen=True)
class RetryParams:
    count: int = 2  # retries after a failed attempt, for every step (a step may set its own)
    backoff_s: int = 15  # wait before the first retry
    backoff_factor: float = 2.0  # each further wait is this many times longer
    backoff_max_s: int = 600  # kfp's backoff_max_duration: the most the backoff may grow to


@dataclass(frozen=True)
class StepParams:
    cpu: str = "1"  # requests, Kubernetes quantities
    memory: str = "2Gi"
    cpu_limit: str = ""  # empty: no limit
    memory_limit: str = ""
    retries: int = -1  # -1: cluster.retry.count


def _step(cpu: str, memory: str, memory_limit: str) -> StepParams:
    return StepParams(cpu, memory, memory_limit=memory_limit)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SecretParams:
    name: str = ""  # Kubernetes Secret in the run's namespace; empty: none is mounted
    env: dict[str, str] = field(default_factory=dict)  # Secret key -> environment variable of the task


# The keys of the two Secrets that infra/k8s/README.md defines for pipeline tasks, each mapped to the
# environment variable of the same name. sermtl-s3's MLFLOW_S3_ENDPOINT_URL is left out: artifacts go
# through the MLflow server, so no task needs it.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class SecretsParams:
    # MLflow client settings: for the steps that write to MLflow (collect, significance, gate, register).
    mlflow: SecretParams = field(
        default_factory=lambda: SecretParams("sermtl-mlflow", {k: k for k in MLFLOW_SECRET_KEYS})
    )
    # The corpus bucket: for the steps that read an s3:// corpus (fingerprint, ingest).
    s3: SecretParams = field(
        default_factory=lambda: SecretParams("sermtl-s3", {k: k for k in S3_SECRET_KEYS})
    )


@dataclass(frozen=True)
class ClusterParams:
    images: ImageParams = field(default_factory=ImageParams)
    gpu: GpuParams = field(default_factory=GpuParams)
    retry: RetryParams = field(default_factory=RetryParams)
    steps: StepsParams = field(default_factory=StepsParams)
    secrets: SecretsParams = field(default_factory=SecretsParams)


def _default_systems() -> dict[str, SystemParams]:
    return {
        "mtl_attention": SystemParams("neural", True, "attention"),
        "mtl_mean": SystemParams("neural", True, "mean"),
        "stl_attention": SystemParams("neural", False, "attention"),
        "stl_mean": SystemParams("neural", False, "mean"),
        "egemaps_linear": SystemParams("egemaps"),
    }


@dataclass(frozen=True)
class Params:
    profile: str = "paper"
    data: DataParams = field(default_factory=DataParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    features: FeatureParams = field(default_factory=FeatureParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    systems: dict[str, SystemParams] = field(default_factory=_default_systems)
    eval: EvalParams = field(default_factory=EvalParams)
    significance: SignificanceParams = field(default_factory=SignificanceParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    serving: ServingParams = field(default_factory=ServingParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    # Sections no stage has typed yet are kept verbatim.
    extra: dict[str, Any] = field(default_factory=dict)

    def section_hash(self, name: str) -> str:
        """Stable hash of one section, used to decide whether a stage's output is up to date."""
        section = getattr(self, name)
        if dataclasses.is_dataclass(section):
            section = dataclasses.asdict(section)
        elif isinstance(section, dict):
            section = {
                k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in section.items()
            }
        payload = yaml.safe_dump(section, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Fields that take one of a few words; anything else is an error naming the key.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("ModelParams", "rnn"): ("gru", "lstm"),
    ("TrainParams", "optimizer"): ("adam", "adamw"),
    ("TrainParams", "device"): ("auto", "cpu", "cuda"),
    ("SystemParams", "kind"): ("neural", "egemaps"),
    ("SystemParams", "pooling"): ("attention", "mean"),
    ("SignificanceParams", "resampling"): ("bootstrap", "permutation"),
    ("SignificanceParams", "correction"): ("holm", "none"),
    ("SignificanceParams", "subset"): ("all", "improvised"),
    ("GateParams", "test"): ("resampling", "mcnemar", "ztest"),
    ("PromotionParams", "rule"): ("not_worse", "better"),
    ("TolerationParams", "operator"): ("Exists", "Equal"),
    ("TolerationParams", "effect"): ("NoSchedule", "PreferNoSchedule", "NoExecute", ""),
}

# Fields whose value must match a pattern (Kubernetes quantities as kfp accepts them).
_CPU = r"([0-9]*[.])?[0-9]+m?"
_MEMORY = r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?"
FORMATS: dict[tuple[str, str], tuple[str, str]] = {
    ("StepParams", "cpu"): (_CPU, "a CPU quantity such as 2, 0.5 or 500m"),
    ("StepParams", "memory"): (_MEMORY, "a memory quantity such as 4Gi or 512Mi"),
    ("StepParams", "cpu_limit"): (f"(?:{_CPU})?", "a CPU quantity such as 2 or 500m, or empty (no limit)"),
    ("StepParams", "memory_limit"): (f"(?:{_MEMORY})?", "a memory quantity such as 8Gi, or empty (no limit)"),
    ("GpuParams", "accelerator_type"): (r"[A-Za-z0-9][-A-Za-z0-9_./]*", "a resource name (nvidia.com/gpu)"),
}
# Smallest allowed value of numeric fields.
MINIMUMS: dict[tuple[str, str], float] = {
    ("GpuParams", "limit"): 1,
    ("RetryParams", "count"): 0,
    ("RetryParams", "backoff_s"): 0,
    ("RetryParams", "backoff_factor"): 1.0,
    ("RetryParams", "backoff_max_s"): 0,
    ("StepParams", "retries"): -1,
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_KEY = re.compile(r"[-._A-Za-z0-9]+")


def _check(cls: type, name: str, value: Any, where: str) -> None:
    """The per-field rules above, and the shape of a Secret's key -> env mapping."""
    allowed = CHOICES.get((cls.__name__, name))
    if allowed and value not in allowed:
        words = ", ".join(word or '""' for word in allowed)
        raise ParamsError(f"{where}: {value!r} is not one of {words}")
    pattern = FORMATS.get((cls.__name__, name))
    if pattern and not re.fullmatch(pattern[0], value):
        raise ParamsError(f"{where}: {value!r} is not {pattern[1]}")
    minimum = MINIMUMS.get((cls.__name__, name))
    if minimum is not None and value < minimum:
        raise ParamsError(f"{where}: {value!r} is below the minimum {minimum:g}")
    if (cls.__name__, name) == ("SecretParams", "env"):
        for key, env in value.items():
            if not _SECRET_KEY.fullmatch(str(key)):
                raise ParamsError(f"{where}.{key}: not a valid Secret key")
            if not _ENV_NAME.fullmatch(env):
                raise ParamsError(f"{where}.{key}: {env!r} is not a valid environment variable name")


def _field_default(cls: type, name: str) -> Any:
    """The default of a dataclass field (what a section that leaves the field out gets)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None if f.default is dataclasses.MISSING else f.default
    return None


def _build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """`cls` from a mapping; keys left out keep `base`'s values (the field's default), else the class's."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            # A nested section keeps the defaults of its field (e.g. cluster.steps.train's own requests).
            kwargs[name] = _build(hints[name], value, f"{where}.{name}", _field_default(cls, name))
        else:
            kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
        _check(cls, name, kwargs[name], f"{where}.{name}")
    return dataclasses.replace(base, **kwargs) if isinstance(base, cls) else cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or isinstance(value, bool) != (hint is bool)
    ):
        raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def apply_profile(raw: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """Merge `profiles[profile]` over the sections; `paper` (or no profile) leaves them as written."""
    profile = raw.get("profile", "paper")
    profiles = raw.get("profiles") or {}
    if profile == "paper":
        return {k: v for k, v in raw.items() if k != "profiles"}
    if profile not in profiles:
        known = ", ".join(["paper", *profiles]) or "paper"
        raise ParamsError(f"{where}:profile: unknown profile {profile!r}; known: {known}")
    merged = _merge({k: v for k, v in raw.items() if k != "profiles"}, profiles[profile])
    merged["profile"] = profile
    return merged


def params_from_dict(raw: dict[str, Any], where: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping at the top level")
    raw = apply_profile(raw, where)
    typed = {f.name for f in dataclasses.fields(Params)} - {"extra"}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Params)
    for name in typed:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{where}:{name}")
    kwargs["extra"] = {k: v for k, v in raw.items() if k not in typed}
    return Params(**kwargs)


def params_from_yaml(text: str, where: str = "params.yaml") -> Params:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{where}: not valid YAML: {exc}") from exc
    return params_from_dict(raw, where)


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found (run from the repository root or pass --params)")
    return params_from_yaml(path.read_text(), str(path))
