"""Experiment parameters from params.yaml, the single source shared by the CLI, DVC and KFP.

Sections are typed dataclasses, and each field says what values make sense (`checked(..)`: a range, a
few words, a pattern), so that a typo or a nonsensical value in params.yaml is an error naming the file,
the key and what is allowed, before any stage writes anything. Checks that tie fields together (e.g.
`data.thresholds.low_max < high_min`, `eval.proposed_system` is a system) are in `_inconsistencies`.
The sections as written (profile `paper`) and every profile merged over them are checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import operator
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sermtl.schema import DIMENSIONS

DEFAULT_PARAMS_PATH = Path("params.yaml")
SUBSETS = ("all", "improvised")  # as sermtl.evaluate.metrics.SUBSETS (not imported here: it pulls in pandas)
DEVICES = ("auto", "cpu", "cuda")  # train.device and `sermtl train --device`
IEMOCAP_SESSIONS = 5


class ParamsError(ValueError):
    """params.yaml is missing, malformed or holds an unknown, mistyped or nonsensical key."""


class _Invalid(Exception):
    """A bad value at `path` (e.g. train.batch_size); params_from_dict adds the file's name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)


@dataclass(frozen=True)
class Rule:
    """What a field's value must be beyond its type. Bounds, words and patterns apply to the value, or to
    each item of a list and each value of a mapping; `keys` and `key_pattern` to a mapping's keys."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    one_of: tuple[str, ...] = ()
    pattern: tuple[str, str] | None = None  # (regular expression, what it means)
    keys: tuple[str, ...] = ()
    key_pattern: tuple[str, str] | None = None
    min_items: int = 0
    distinct: bool = False

    def bounds(self) -> str:
        """The allowed range in words: ">= 1", "> 0", "in [0, 1)", ... ("" when unbounded)."""
        low = self.at_least if self.at_least is not None else self.above
        high = self.at_most if self.at_most is not None else self.below
        closed_low, closed_high = self.at_least is not None, self.at_most is not None
        if low is not None and high is not None:
            return f"in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        if low is not None:
            return f"{'>=' if closed_low else '>'} {low:g}"
        if high is not None:
            return f"{'<=' if closed_high else '<'} {high:g}"
        return ""

    def check(self, value: Any, path: str) -> None:
        if isinstance(value, list | dict):
            self._check_container(value, path)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                self._check_one(item, f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]")
        else:
            self._check_one(value, path)

    def _check_container(self, value: list | dict, path: str) -> None:
        if len(value) < self.min_items:
            raise _Invalid(path, f"must list at least {self.min_items} item(s) (got {value!r})")
        if self.distinct and len({repr(v) for v in value}) < len(value):
            raise _Invalid(path, f"must list each item once (got {value!r})")
        for key in value if isinstance(value, dict) else ():
            if self.keys and key not in self.keys:
                names = ", ".join(self.keys)
                raise _Invalid(
                    f"{path}.{key}", f"unknown key{did_you_mean(key, self.keys)} (expected one of: {names})"
                )
            if self.key_pattern and not re.fullmatch(self.key_pattern[0], str(key)):
                raise _Invalid(f"{path}.{key}", f"the key must be {self.key_pattern[1]} (got {key!r})")

    def _check_one(self, value: Any, path: str) -> None:
        if self.one_of and value not in self.one_of:
            words = ", ".join(word or '""' for word in self.one_of)
            raise _Invalid(path, f"must be one of {words} (got {value!r})")
        if self.pattern and not re.fullmatch(self.pattern[0], value):
            raise _Invalid(path, f"must be {self.pattern[1]} (got {value!r})")
        if self.bounds() and not (
            math.isfinite(value)
            and (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (self.below is None or value < self.below)
        ):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise _Invalid(path, f"must be {kind} {self.bounds()} (got {value!r})")


def rule(**checks: Any) -> dict[str, Rule]:
    """Field metadata: `field(default_factory=list, metadata=rule(min_items=1))`."""
    return {"rule": Rule(**checks)}


def checked(default: Any, **checks: Any) -> Any:
    """A field with an immutable default and the Rule its value must satisfy: `checked(16, at_least=1)`."""
    return field(default=default, metadata=rule(**checks))


# Patterns shared by several fields.
_NAME = (r"[A-Za-z0-9][-A-Za-z0-9_.]*", "a name of letters, digits, '-', '_' and '.'")
_LABEL_KEY = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_CPU = r"([0-9]*[.])?[0-9]+m?"
_MEMORY = r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?"
_FRACTION = {"at_least": 0.0, "at_most": 1.0}
_PROBABILITY = {"above": 0.0, "below": 1.0}  # strictly between 0 and 1
_POSITIVE = {"above": 0.0}


@dataclass(frozen=True)
class Thresholds:
    # 3-level classes on IEMOCAP's 1..5 scale: low <= low_max < medium < high_min <= high.
    low_max: float = checked(2.0, at_least=1.0, at_most=5.0)
    high_min: float = checked(4.0, at_least=1.0, at_most=5.0)


@dataclass(frozen=True)
class SynthParams:
    utterances: int = checked(400, at_least=60, at_most=200_000)  # sermtl.data.synth's MIN/MAX_UTTERANCES
    seed: int = checked(0, at_least=0)
    mean_duration_s: float = checked(2.5, at_least=0.8, at_most=12.0)  # sermtl.data.synth's bounds
    # Effect settings (sermtl.data.synth's docstring); the defaults give the generator's corpus before them.
    cue_span: float = checked(0.5, above=0.0, at_most=1.0)  # mean share of an utterance carrying cues
    cue_sharing: float = checked(0.5, **_FRACTION)  # 0 independent dimensions .. 1 strongly shared
    null_labels: bool = False  # true: labels drawn independently of the audio (chance by construction)


@dataclass(frozen=True)
class DataParams:
    corpus: str = checked("data/IEMOCAP_full_release", pattern=(r".*\S.*", "a folder or s3:// URI"))
    s3_endpoint_url: str = checked("", pattern=(r"(https?://\S+)?", "an http(s):// URL, or empty"))
    sample_rate: int = checked(16000, at_least=8000, at_most=96000)
    # Leave-one-session-out needs two sessions at least (the next one lends the validation speaker).
    sessions: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        metadata=rule(at_least=1, at_most=IEMOCAP_SESSIONS, min_items=2, distinct=True),
    )
    speakers_per_session: int = checked(2, at_least=1)
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_drop_fraction: float = checked(0.05, **_FRACTION)
    synth: SynthParams = field(default_factory=SynthParams)


@dataclass(frozen=True)
class ValidationParams:
    rating_step: float = checked(0.5, above=0.0, at_most=4.0)
    categories: list[str] = field(
        default_factory=lambda: ["neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx"],
        metadata=rule(min_items=1, distinct=True),
    )
    min_duration_s: float = checked(0.3, **_POSITIVE)
    max_duration_s: float = checked(40.0, **_POSITIVE)
    allowed_source_sample_rates: list[int] = field(
        default_factory=lambda: [8000, 16000, 22050, 32000, 44100, 48000],
        metadata=rule(at_least=1, min_items=1, distinct=True),
    )
    silence_rms_dbfs: float = checked(-60.0, at_most=0.0)
    clipping_fraction: float = checked(0.01, **_FRACTION)
    max_bad_audio_fraction: float = checked(0.01, **_FRACTION)
    # Share of wavs that no annotation names (IEMOCAP: none); more means annotations went missing.
    max_unannotated_fraction: float = checked(0.02, **_FRACTION)
    min_class_count_per_fold: int = checked(1, at_least=0)


@dataclass(frozen=True)
class FeatureParams:
    frame_ms: int = checked(40, at_least=1)
    hop_ms: int = checked(10, at_least=1)
    max_frames: int = checked(500, at_least=1)


@dataclass(frozen=True)
class ModelParams:
    conv_channels: int = checked(40, at_least=1)
    conv_kernel: int = checked(40, at_least=1)
    conv_pool: int = checked(2, at_least=1)
    rnn: str = checked("gru", one_of=("gru", "lstm"))
    rnn_hidden: int = checked(128, at_least=1)
    rnn_layers: int = checked(2, at_least=1)
    dropout: float = checked(0.0, at_least=0.0, below=1.0)
    # Not in the reference front end: log-compress and batch-normalise each frame's vector (model.py).
    frame_log: bool = True
    frame_norm: bool = True
    # Per dimension; a dimension left out weighs 1.0.
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"arousal": 1.0, "valence": 1.0, "dominance": 1.0},
        metadata=rule(keys=DIMENSIONS, at_least=0.0),
    )


@dataclass(frozen=True)
class TrainParams:
    optimizer: str = checked("adam", one_of=("adam", "adamw"))
    learning_rate: float = checked(1e-4, **_POSITIVE)
    batch_size: int = checked(16, at_least=1)
    max_epochs: int = checked(30, at_least=1)
    # Epochs without a better validation score before stopping; 0 would stop before the first epoch.
    early_stopping_patience: int = checked(5, at_least=1)
    # Largest gradient norm per step (0: no clipping). One bad batch can otherwise throw a small recurrent
    # network back to predicting one class (seen on the demo at lr 1e-2), and early stopping keeps that.
    grad_clip_norm: float = checked(1.0, at_least=0)
    # Every system alike: inverse-frequency class weights in the neural cross-entropy (sermtl.train.training)
    # and class_weight="balanced" in the eGeMAPS logistic regressions (model.egemaps). UAR is the metric.
    class_balanced_loss: bool = True
    # One training run per seed, fold and network; a (system, fold) predicts with the mean of its seeds'
    # class probabilities (train.training). The eGeMAPS baseline is deterministic: one run, seeds ignored.
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata=rule(at_least=0, min_items=1, distinct=True)
    )
    device: str = checked("auto", one_of=DEVICES)
    # Intra-op threads of a CPU training run. Fixed, because the thread count changes float reductions and
    # so the trained weights: with it in params a fold trains bit-identically in the DAG (two tasks at once)
    # and by hand. 0: torch's default (one per core; results then depend on the machine).
    cpu_threads: int = checked(1, at_least=0)
    bf16: bool = True
    compile: bool = False
    num_workers: int = checked(0, at_least=0)


@dataclass(frozen=True)
class SystemParams:
    kind: str = checked("neural", one_of=("neural", "egemaps"))
    multitask: bool = True
    pooling: str = checked("attention", one_of=("attention", "mean"))


@dataclass(frozen=True)
class EvalParams:
    proposed_system: str = "mtl_attention"  # one of systems (checked with them)
    dimensions: list[str] = field(
        default_factory=lambda: ["arousal", "valence", "dominance"],
        metadata=rule(one_of=DIMENSIONS, min_items=1, distinct=True),
    )
    subsets: list[str] = field(
        default_factory=lambda: list(SUBSETS), metadata=rule(one_of=SUBSETS, min_items=1, distinct=True)
    )


@dataclass(frozen=True)
class SignificanceParams:
    # Systems the proposed system (eval.proposed_system) is compared with; empty means every other system.
    baselines: list[str] = field(default_factory=list, metadata=rule(distinct=True))
    # bootstrap | permutation: the paired test on the UAR difference (permutation: calibrated per speaker)
    resampling: str = checked("permutation", one_of=("bootstrap", "permutation"))
    # utterance | dialog | speaker | session: what the resampling test and its interval treat as independent
    # (from the IEMOCAP utterance id); speaker: the claim is about new speakers (sermtl.evaluate.significance)
    unit: str = checked("speaker", one_of=("utterance", "dialog", "speaker", "session"))
    resamples: int = checked(10000, at_least=1)
    confidence: float = checked(0.95, **_PROBABILITY)  # of the bootstrap interval of the UAR difference
    # family-wise: Holm runs per test over every (baseline, dimension) pair
    alpha: float = checked(0.05, **_PROBABILITY)
    correction: str = checked("holm", one_of=("holm", "none"))
    subset: str = checked("all", one_of=SUBSETS)  # which utterances are compared
    seed: int = checked(0, at_least=0)


@dataclass(frozen=True)
class GateParams:
    # Which test's corrected p-values decide significance: resampling (bootstrap or permutation, as
    # significance.resampling says) | mcnemar | ztest.
    test: str = checked("resampling", one_of=("resampling", "mcnemar", "ztest"))
    # Per baseline: dimensions on which the proposed system must be significantly better.
    min_dimensions_better: int = checked(1, at_least=0)
    # Over all (baseline, dimension) comparisons: how many may be significantly worse.
    max_comparisons_worse: int = checked(0, at_least=0)


@dataclass(frozen=True)
class PromotionParams:
    # not_worse (non-inferiority): the challenger is promoted only if, on every dimension, the lower bound
    # of the significance.confidence interval of (challenger - champion) UAR is at least -`margin`: it has
    # to show that it is at most `margin` worse; "no significant difference" is not enough.
    # better: it must also be significantly better on at least one dimension (the resampling test at
    # significance.unit, corrected over the dimensions). See sermtl.mlops.registry.promotion_decision.
    rule: str = checked("not_worse", one_of=("not_worse", "better"))
    # UAR points as a fraction (0.01 = one point): the largest loss against the champion still "not worse"
    margin: float = checked(0.01, **_FRACTION)
    # how long a promotion waits for a concurrent one to finish (0: it gives up at once)
    lock_timeout_s: float = checked(60.0, at_least=0.0)


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = checked("sermtl-ser", pattern=_NAME)
    gate: GateParams = field(default_factory=GateParams)
    promotion: PromotionParams = field(default_factory=PromotionParams)


@dataclass(frozen=True)
class ServingParams:
    max_duration_s: float = checked(60.0, **_POSITIVE)  # longer inputs are refused (memory of one request)
    # audio of all inputs of one request together (at least max_duration_s)
    max_total_duration_s: float = checked(120.0, **_POSITIVE)
    max_request_bytes: int = checked(16_000_000, at_least=1)  # larger request bodies are refused (413)
    # shorter inputs are refused; at least one frame of the front end (features.frame_ms)
    min_duration_s: float = checked(0.1, **_POSITIVE)
    return_attention: bool = False  # default for requests that do not say


@dataclass(frozen=True)
class TrackingParams:
    # Total time one MLflow call may spend retrying a server that does not answer; then it fails naming it.
    retry_budget_s: float = checked(20.0, **_POSITIVE)


# --- cluster: how the Kubeflow pipeline is compiled for Kubernetes ----------------------------------------
#
# Read when the pipeline is compiled (pipelines/sermtl_pipeline.py reads the repository's params.yaml when
# it is imported) and written into the compiled YAML. No sermtl step reads them at run time, and the local
# runner (`make run`) ignores them, except the retry policy, which kfp.local 2.17 also applies.

_IMAGE = (r"\S*", "an image reference without spaces, or empty")


@dataclass(frozen=True)
class ImageParams:
    # Empty: components.DEFAULT_IMAGE. $SERMTL_IMAGE, when set at compile time, wins over this value.
    cpu: str = checked("", pattern=_IMAGE)
    # Empty: the CPU image with "-cuda" appended to its tag (infra/docker/README.md). $SERMTL_CUDA_IMAGE wins.
    cuda: str = checked("", pattern=_IMAGE)


@dataclass(frozen=True)
class TolerationParams:
    key: str = checked("nvidia.com/gpu", pattern=(f"(?:{_LABEL_KEY})?", "a taint key, or empty (any key)"))
    operator: str = checked("Exists", one_of=("Exists", "Equal"))  # Equal compares `value`
    value: str = checked("", pattern=(_LABEL_VALUE, "a taint value"))
    # "": every effect
    effect: str = checked("NoSchedule", one_of=("NoSchedule", "PreferNoSchedule", "NoExecute", ""))


@dataclass(frozen=True)
class GpuParams:
    # false: training runs on the CPU image without accelerator, node selector or tolerations.
    enabled: bool = True
    # the extended resource the device plugin advertises
    accelerator_type: str = checked(
        "nvidia.com/gpu", pattern=(r"[A-Za-z0-9][-A-Za-z0-9_./]*", "a resource name (nvidia.com/gpu)")
    )
    limit: int = checked(1, at_least=1)
    # label -> value, e.g. a GPU node pool
    node_selector: dict[str, str] = field(
        default_factory=dict,
        metadata=rule(key_pattern=(_LABEL_KEY, "a node label"), pattern=(_LABEL_VALUE, "a label value")),
    )
    tolerations: list[TolerationParams] = field(default_factory=lambda: [TolerationParams()])


@dataclass(frozen=True)
class RetryParams:
    count: int = checked(
        2, at_least=0
    )  # retries after a failed attempt, for every step (a step may set its own)
    backoff_s: int = checked(15, at_least=0)  # wait before the first retry
    backoff_factor: float = checked(2.0, at_least=1.0)  # each further wait is this many times longer
    backoff_max_s: int = checked(
        600, at_least=0
    )  # kfp's backoff_max_duration: the most the backoff may grow to


@dataclass(frozen=True)
class StepParams:
    # requests, Kubernetes quantities
    cpu: str = checked("1", pattern=(_CPU, "a CPU quantity such as 2, 0.5 or 500m"))
    memory: str = checked("2Gi", pattern=(_MEMORY, "a memory quantity such as 4Gi or 512Mi"))
    # empty: no limit
    cpu_limit: str = checked(
        "", pattern=(f"(?:{_CPU})?", "a CPU quantity such as 2 or 500m, or empty (no limit)")
    )
    memory_limit: str = checked(
        "", pattern=(f"(?:{_MEMORY})?", "a memory quantity such as 8Gi, or empty (no limit)")
    )
    retries: int = checked(-1, at_least=-1)  # -1: cluster.retry.count


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


_SECRET_NAME = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?"


@dataclass(frozen=True)
class SecretParams:
    # Kubernetes Secret in the run's namespace; empty: none is mounted
    name: str = checked("", pattern=(_SECRET_NAME, "a Kubernetes object name (lowercase), or empty"))
    # Secret key -> environment variable of the task
    env: dict[str, str] = field(
        default_factory=dict,
        metadata=rule(
            key_pattern=(r"[-._A-Za-z0-9]+", "a Secret key"),
            pattern=(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name"),
        ),
    )


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
    # `paper`: the sections as written; else a name under `profiles:` (merged over them, see _read).
    profile: str = "paper"
    data: DataParams = field(default_factory=DataParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    features: FeatureParams = field(default_factory=FeatureParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    systems: dict[str, SystemParams] = field(
        default_factory=_default_systems, metadata=rule(key_pattern=_NAME)
    )
    eval: EvalParams = field(default_factory=EvalParams)
    significance: SignificanceParams = field(default_factory=SignificanceParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    serving: ServingParams = field(default_factory=ServingParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)

    @property
    def extra(self) -> dict[str, Any]:
        """Always empty: every section is typed and an unknown one is an error (kept for old callers)."""
        return {}

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


SECTIONS = tuple(f.name for f in dataclasses.fields(Params) if f.name != "profile")


# --- reading params.yaml ----------------------------------------------------------------------------------


# Fields ordered against each other: (key, relation, other key), on the merged parameters.
ORDER = (
    ("data.thresholds.low_max", "<", "data.thresholds.high_min"),
    ("validation.min_duration_s", "<", "validation.max_duration_s"),
    ("features.hop_ms", "<=", "features.frame_ms"),  # a longer hop would skip audio between frames
    ("serving.min_duration_s", "<", "serving.max_duration_s"),
    ("serving.max_total_duration_s", ">=", "serving.max_duration_s"),
)
_RELATIONS = {"<": (operator.lt, "below"), "<=": (operator.le, "at most"), ">=": (operator.ge, "at least")}


def _inconsistencies(p: Params) -> Iterator[tuple[str, str]]:
    """(key path, what is wrong) for each rule that ties fields together, on the merged parameters."""
    for key, relation, other in ORDER:
        value, bound = operator.attrgetter(key)(p), operator.attrgetter(other)(p)
        holds, words = _RELATIONS[relation]
        if not holds(value, bound):
            yield key, f"must be {words} {other} = {bound:g} (got {value:g})"
    f, m, rate, serving = p.features, p.model, p.data.sample_rate, p.serving
    frame, needed = round(f.frame_ms * rate / 1000), m.conv_kernel * (m.conv_pool + 1) - 1  # as ModelConfig
    if frame < needed:
        why = f"features.frame_ms = {f.frame_ms} at data.sample_rate = {rate} gives {frame}"
        yield (
            "model.conv_kernel",
            f"{m.conv_kernel} with model.conv_pool = {m.conv_pool} needs frames of {needed}+ samples; {why}",
        )
    if serving.min_duration_s * 1000 + 1e-9 < f.frame_ms:
        frame_s = f"features.frame_ms = {f.frame_ms} ms"
        yield (
            "serving.min_duration_s",
            f"must be one frame or more, {frame_s} (got {serving.min_duration_s:g})",
        )
    systems, proposed = ", ".join(p.systems), p.eval.proposed_system
    if not p.systems:
        yield "systems", "must define at least one system"
    if proposed not in p.systems:
        yield "eval.proposed_system", f"must be one of the systems {systems} (got {proposed!r})"
    for i, baseline in enumerate(p.significance.baselines):
        if baseline == proposed or baseline not in p.systems:
            others = f"the systems {systems} other than eval.proposed_system"
            yield f"significance.baselines[{i}]", f"must be one of {others} (got {baseline!r})"
    for i, toleration in enumerate(p.cluster.gpu.tolerations):
        where = f"cluster.gpu.tolerations[{i}]"
        if toleration.operator == "Exists" and toleration.value:
            yield f"{where}.value", f"must be empty when operator is Exists (got {toleration.value!r})"
        if toleration.operator == "Equal" and not toleration.key:
            yield f"{where}.key", "must be set when operator is Equal"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# Keys that an older params.yaml may still hold: key path -> what to write instead (also under profiles.*).
REPLACED_KEYS = {
    "train.seed": "replaced by train.seeds, a list of seeds (write `seeds: [0]` for one run as before)",
    "registry.promotion.tolerance": (
        "replaced by registry.promotion.margin, with another meaning: `tolerance` was a shortfall of the "
        "mean UAR, `margin` is how far below 0 the lower bound of the confidence interval of (challenger - "
        "champion) UAR may reach on every dimension; rename the key to `margin` and review its value "
        "(default 0.01, one UAR point)"
    ),
}


def did_you_mean(word: object, names: Iterable[object]) -> str:
    """The hint "; did you mean `train`?" for a typo, or "" (cutoff 0.7: no `cpu` for `gpu`)."""
    close = difflib.get_close_matches(str(word), [str(n) for n in names], n=1, cutoff=0.7)
    return f"; did you mean `{close[0]}`?" if close else ""


def _known(raw: dict[str, Any], path: str, names: tuple[str, ...], noun: str) -> None:
    for key in raw:
        if key not in names:
            where = _join(path, key)
            for old, instead in REPLACED_KEYS.items():
                if where == old or where.endswith(f".{old}"):
                    raise _Invalid(where, f"no longer a key: {instead}")
            hint = did_you_mean(key, names)
            raise _Invalid(where, f"unknown {noun}{hint} (expected one of: {', '.join(names)})")


def _field_default(cls: type, name: str) -> Any:
    """The default of a dataclass field (what a section that leaves the field out gets)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None if f.default is dataclasses.MISSING else f.default
    return None


def _build(cls: type, raw: Any, path: str, base: Any = None) -> Any:
    """`cls` from a mapping; keys left out keep `base`'s values (the field's default), else the class's."""
    if not isinstance(raw, dict):
        raise _Invalid(path, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _known(raw, path, tuple(fields), "key")
    kwargs = {}
    for name, value in raw.items():
        where = _join(path, name)
        if dataclasses.is_dataclass(hints[name]):
            # A nested section keeps the defaults of its field (e.g. cluster.steps.train's own requests).
            kwargs[name] = _build(hints[name], value, where, _field_default(cls, name))
        else:
            kwargs[name] = _coerce(hints[name], value, where)
        rule = fields[name].metadata.get("rule")
        if rule is not None:
            rule.check(kwargs[name], where)
    return dataclasses.replace(base, **kwargs) if isinstance(base, cls) else cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(where, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(where, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or isinstance(value, bool) != (hint is bool)
    ):
        raise _Invalid(where, f"expected {hint.__name__}, got {value!r}")
    return value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def _consistent(params: Params, suffix: str = "") -> Params:
    for path, message in _inconsistencies(params):
        raise _Invalid(path, message + suffix)
    return params


def _read(raw: Any) -> Params:
    """The sections as written (profile `paper`) and each profile merged over them, all checked; the one
    `profile` names is returned."""
    if not isinstance(raw, dict):
        raise _Invalid("", f"expected a mapping of sections at the top level, got {type(raw).__name__}")
    _known(raw, "", ("profile", *SECTIONS, "profiles"), "section")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise _Invalid("profiles", f"expected a mapping of profile name -> sections, got {profiles!r}")
    written = {k: v for k, v in raw.items() if k != "profiles"}
    paper = _consistent(_build(Params, written, ""))
    merged = {}
    for name, overrides in profiles.items():
        path = f"profiles.{name}"
        if name == "paper":
            raise _Invalid(
                path, "'paper' is the sections as written; a profile of that name would be ignored"
            )
        if not isinstance(overrides, dict):
            raise _Invalid(path, f"expected a mapping of sections, got {overrides!r}")
        _known(overrides, path, SECTIONS, "section")
        _build(Params, overrides, path)  # the overrides alone, so that an error names the key as written
        profile = dataclasses.replace(_build(Params, _merge(written, overrides), ""), profile=name)
        merged[name] = _consistent(profile, f" (with {path} merged)")
    selected = paper.profile
    if selected == "paper":
        return paper
    if selected not in merged:
        known = ", ".join(["paper", *map(str, merged)])
        hint = did_you_mean(selected, ["paper", *map(str, merged)])
        raise _Invalid("profile", f"unknown profile {selected!r}{hint} (expected one of: {known})")
    return merged[selected]


def params_from_dict(raw: dict[str, Any], where: str = "params") -> Params:
    """Typed, checked parameters; a ParamsError names `where` (the file), the key path and what is allowed."""
    try:
        return _read(raw)
    except _Invalid as exc:
        raise ParamsError(f"{where}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys, silently; params.yaml refuses them."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark
            )
        seen.add(key if isinstance(key, str | int | float) else id(key_node))
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def params_from_yaml(text: str, where: str = "params.yaml") -> Params:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError(f"{where}: not valid YAML: {' '.join(str(problem).split())}{at}") from exc
    return params_from_dict(raw, where)


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found (run from the repository root or pass --params)")
    return params_from_yaml(path.read_text(), str(path))
