"""The sections of params.yaml as typed, frozen pydantic dataclasses: the one place where each key's type,
allowed values and default are written (the CLI's choices come from the same types)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import field
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import StrictBool as Bool
from pydantic import StrictFloat as Float
from pydantic import StrictInt as Int
from pydantic import StrictStr as Str

from sermtl.params.cluster import ClusterParams
from sermtl.params.rules import AT_LEAST_0, AT_LEAST_1, FRACTION, NAME, POSITIVE, PROBABILITY, Rule, section
from sermtl.schema import DIMENSIONS

IEMOCAP_SESSIONS = 5
Device = Literal["auto", "cpu", "cuda"]  # train.device and `sermtl train --device`
Subset = Literal["all", "improvised"]  # as sermtl.evaluate.metrics.SUBSETS (which pulls in pandas)
Dimension = Literal[DIMENSIONS]  # type: ignore[valid-type]
Test = Literal["resampling", "mcnemar", "ztest"]  # registry.gate.test
DEVICES: tuple[str, ...] = get_args(Device)
SUBSETS: tuple[str, ...] = get_args(Subset)
TESTS: tuple[str, ...] = get_args(Test)


@section
class Thresholds:
    # 3-level classes on IEMOCAP's 1..5 scale: low <= low_max < medium < high_min <= high.
    low_max: Annotated[Float, Rule(at_least=1.0, at_most=5.0)] = 2.0
    high_min: Annotated[Float, Rule(at_least=1.0, at_most=5.0)] = 4.0


@section
class SynthParams:
    # The bounds are sermtl.data.synth's MIN/MAX_UTTERANCES and duration limits.
    utterances: Annotated[Int, Rule(at_least=60, at_most=200_000)] = 400
    seed: Annotated[Int, AT_LEAST_0] = 0
    mean_duration_s: Annotated[Float, Rule(at_least=0.8, at_most=12.0)] = 4.45  # IEMOCAP's mean
    # Effect settings (docs/design/synth.md); the defaults are the generator's anchors (synth_model).
    cue_span: Annotated[Float, Rule(above=0.0, at_most=1.0)] = 0.5  # mean share of an utterance with cues
    cue_sharing: Annotated[Float, FRACTION] = 0.5  # 0 independent dimensions .. 1 strongly shared
    null_labels: Bool = False  # true: labels drawn independently of the audio (chance by construction)


@section
class DataParams:
    corpus: Annotated[Str, Rule(pattern=(r".*\S.*", "a folder or s3:// URI"))] = "data/IEMOCAP_full_release"
    s3_endpoint_url: Annotated[Str, Rule(pattern=(r"(https?://\S+)?", "an http(s):// URL, or empty"))] = ""
    sample_rate: Annotated[Int, Rule(at_least=8000, at_most=96000)] = 16000
    # Leave-one-session-out needs two sessions at least (the next one lends the validation speaker).
    sessions: Annotated[list[Int], Rule(at_least=1, at_most=IEMOCAP_SESSIONS, min_items=2, distinct=True)] = (
        field(default_factory=lambda: [1, 2, 3, 4, 5])
    )
    speakers_per_session: Annotated[Int, AT_LEAST_1] = 2
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_drop_fraction: Annotated[Float, FRACTION] = 0.05
    synth: SynthParams = field(default_factory=SynthParams)


@section
class ValidationParams:
    rating_step: Annotated[Float, Rule(above=0.0, at_most=4.0)] = 0.5
    categories: Annotated[list[Str], Rule(min_items=1, distinct=True)] = field(
        default_factory=lambda: ["neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx"]
    )
    min_duration_s: Annotated[Float, POSITIVE] = 0.3
    max_duration_s: Annotated[Float, POSITIVE] = 40.0
    allowed_source_sample_rates: Annotated[list[Int], Rule(at_least=1, min_items=1, distinct=True)] = field(
        default_factory=lambda: [8000, 16000, 22050, 32000, 44100, 48000]
    )
    silence_rms_dbfs: Annotated[Float, Rule(at_most=0.0)] = -60.0
    clipping_fraction: Annotated[Float, FRACTION] = 0.01
    max_bad_audio_fraction: Annotated[Float, FRACTION] = 0.01
    # Share of wavs that no annotation names (IEMOCAP: none); more means annotations went missing.
    max_unannotated_fraction: Annotated[Float, FRACTION] = 0.02
    min_class_count_per_fold: Annotated[Int, AT_LEAST_0] = 1


@section
class FeatureParams:
    frame_ms: Annotated[Int, AT_LEAST_1] = 40
    hop_ms: Annotated[Int, AT_LEAST_1] = 10
    max_frames: Annotated[Int, AT_LEAST_1] = 500


@section
class ModelParams:
    conv_channels: Annotated[Int, AT_LEAST_1] = 40
    conv_kernel: Annotated[Int, AT_LEAST_1] = 40
    conv_pool: Annotated[Int, AT_LEAST_1] = 2
    rnn: Literal["gru", "lstm"] = "gru"
    rnn_hidden: Annotated[Int, AT_LEAST_1] = 128
    rnn_layers: Annotated[Int, AT_LEAST_1] = 2
    dropout: Annotated[Float, Rule(at_least=0.0, below=1.0)] = 0.0
    # Not in the reference front end: log-compress and batch-normalise each frame's vector (model/network.py).
    frame_log: Bool = True
    frame_norm: Bool = True
    # Per dimension; a dimension left out weighs 1.0.
    loss_weights: Annotated[dict[Dimension, Float], AT_LEAST_0] = field(
        default_factory=lambda: {"arousal": 1.0, "valence": 1.0, "dominance": 1.0}
    )


@section
class TrainParams:
    optimizer: Literal["adam", "adamw"] = "adam"
    learning_rate: Annotated[Float, POSITIVE] = 1e-4
    batch_size: Annotated[Int, AT_LEAST_1] = 16
    max_epochs: Annotated[Int, AT_LEAST_1] = 30
    # Epochs without a better validation score before stopping; 0 would stop before the first epoch.
    early_stopping_patience: Annotated[Int, AT_LEAST_1] = 5
    # Largest gradient norm per step (0: no clipping). One bad batch can otherwise throw a small recurrent
    # network back to predicting one class (seen on the demo at lr 1e-2), and early stopping keeps that.
    grad_clip_norm: Annotated[Float, AT_LEAST_0] = 1.0
    # Every system alike: inverse-frequency class weights in the neural cross-entropy (sermtl.train)
    # and class_weight="balanced" in the eGeMAPS logistic regressions (model.egemaps). UAR is the metric.
    class_balanced_loss: Bool = True
    # One training run per seed, fold and network; a (system, fold) predicts with the mean of its seeds'
    # class probabilities. The eGeMAPS baseline is deterministic: one run, seeds ignored.
    seeds: Annotated[list[Int], Rule(at_least=0, min_items=1, distinct=True)] = field(
        default_factory=lambda: [0, 1, 2]
    )
    device: Device = "auto"
    # Intra-op threads of a CPU training run. Fixed, because the thread count changes float reductions and
    # so the trained weights: with it in params a fold trains bit-identically in the DAG (two tasks at once)
    # and by hand. 0: torch's default (one per core; results then depend on the machine).
    cpu_threads: Annotated[Int, AT_LEAST_0] = 1
    bf16: Bool = True
    compile: Bool = False
    num_workers: Annotated[Int, AT_LEAST_0] = 0


@section
class SystemParams:
    kind: Literal["neural", "egemaps"] = "neural"
    multitask: Bool = True
    pooling: Literal["attention", "mean"] = "attention"


@section
class EvalParams:
    proposed_system: Str = "mtl_attention"  # one of systems (checked with them)
    dimensions: Annotated[list[Dimension], Rule(min_items=1, distinct=True)] = field(
        default_factory=lambda: ["arousal", "valence", "dominance"]
    )
    subsets: Annotated[list[Subset], Rule(min_items=1, distinct=True)] = field(
        default_factory=lambda: list(SUBSETS)
    )


@section
class SignificanceParams:
    # Systems the proposed system (eval.proposed_system) is compared with; empty means every other system.
    baselines: Annotated[list[Str], Rule(distinct=True)] = field(default_factory=list)
    # the paired test on the UAR difference (permutation: calibrated per speaker)
    resampling: Literal["bootstrap", "permutation"] = "permutation"
    # what the resampling test and its interval treat as independent (from the IEMOCAP utterance id);
    # speaker: the claim is about new speakers (docs/design/significance.md)
    unit: Literal["utterance", "dialog", "speaker", "session"] = "speaker"
    resamples: Annotated[Int, AT_LEAST_1] = 10000
    confidence: Annotated[Float, PROBABILITY] = 0.95  # of the bootstrap interval of the UAR difference
    # family-wise: Holm runs per test over every (baseline, dimension) pair
    alpha: Annotated[Float, PROBABILITY] = 0.05
    correction: Literal["holm", "none"] = "holm"
    subset: Subset = "all"  # which utterances are compared
    seed: Annotated[Int, AT_LEAST_0] = 0


@section
class GateParams:
    # Which test's corrected p-values decide significance: resampling (bootstrap or permutation, as
    # significance.resampling says) | mcnemar | ztest.
    test: Test = "resampling"
    # Per baseline: dimensions on which the proposed system must be significantly better.
    min_dimensions_better: Annotated[Int, AT_LEAST_0] = 1
    # Over all (baseline, dimension) comparisons: how many may be significantly worse.
    max_comparisons_worse: Annotated[Int, AT_LEAST_0] = 0


@section
class PromotionParams:
    # not_worse (non-inferiority): the challenger is promoted only if, on every dimension, the lower bound
    # of the significance.confidence interval of (challenger - champion) UAR is at least -`margin`: it has
    # to show that it is at most `margin` worse; "no significant difference" is not enough.
    # better: it must also be significantly better on at least one dimension (the resampling test at
    # significance.unit, corrected over the dimensions). See sermtl.mlops.registry.promotion_decision.
    rule: Literal["not_worse", "better"] = "not_worse"
    # UAR points as a fraction (0.01 = one point): the largest loss against the champion still "not worse"
    margin: Annotated[Float, FRACTION] = 0.01
    # how long a promotion waits for a concurrent one to finish (0: it gives up at once)
    lock_timeout_s: Annotated[Float, AT_LEAST_0] = 60.0


@section
class RegistryParams:
    model_name: Annotated[Str, Rule(pattern=NAME)] = "sermtl-ser"
    gate: GateParams = field(default_factory=GateParams)
    promotion: PromotionParams = field(default_factory=PromotionParams)


@section
class ServingParams:
    max_duration_s: Annotated[Float, POSITIVE] = 60.0  # longer inputs are refused (memory of one request)
    # audio of all inputs of one request together (at least max_duration_s)
    max_total_duration_s: Annotated[Float, POSITIVE] = 120.0
    max_request_bytes: Annotated[Int, AT_LEAST_1] = 16_000_000  # larger request bodies are refused (413)
    # shorter inputs are refused; at least one frame of the front end (features.frame_ms)
    min_duration_s: Annotated[Float, POSITIVE] = 0.1
    return_attention: Bool = False  # default for requests that do not say


@section
class TrackingParams:
    # Total time one MLflow call may spend retrying a server that does not answer; then it fails naming it.
    retry_budget_s: Annotated[Float, POSITIVE] = 20.0


def _default_systems() -> dict[str, SystemParams]:
    return {
        "mtl_attention": SystemParams("neural", True, "attention"),
        "mtl_mean": SystemParams("neural", True, "mean"),
        "stl_attention": SystemParams("neural", False, "attention"),
        "stl_mean": SystemParams("neural", False, "mean"),
        "egemaps_linear": SystemParams("egemaps"),
    }


@section
class Params:
    # `paper`: the sections as written; else a name under `profiles:` (merged over them, see loading).
    profile: Str = "paper"
    data: DataParams = field(default_factory=DataParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    features: FeatureParams = field(default_factory=FeatureParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    systems: Annotated[dict[Str, SystemParams], Rule(key_pattern=NAME)] = field(
        default_factory=_default_systems
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
