"""Experiment parameters from params.yaml, the single source shared by the CLI, DVC and KFP.

Sections are typed dataclasses so that a typo in params.yaml is an error naming the key,
not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    return_attention: bool = False  # default for requests that do not say


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
}


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    for name, value in kwargs.items():
        allowed = CHOICES.get((cls.__name__, name))
        if allowed and value not in allowed:
            raise ParamsError(f"{where}.{name}: {value!r} is not one of {', '.join(allowed)}")
    return cls(**kwargs)


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
