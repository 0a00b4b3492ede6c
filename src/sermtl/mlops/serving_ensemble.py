"""Which trained fold models make up a served ensemble, and its serving.json: checked when the model is
logged, so that the served model needs neither params.yaml nor the training folder.

Design notes (why it is built this way): docs/design/serving.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sermtl.params import Params, ServingParams
from sermtl.schema import CLASS_NAMES, DIMENSIONS, MODEL_DIR, run_dir

SERVING_FORMAT = 1
SERVING_CONFIG_FILE = "serving.json"
# serving.json keys of the request limits (also in the MLmodel metadata as sermtl.limits)
LIMIT_KEYS = ("max_duration_s", "min_duration_s", "max_total_duration_s", "max_request_bytes")


def ordered_dimensions(dimensions: Sequence[str]) -> list[str]:
    """The dimensions in the schema's order, any unknown ones after them."""
    return [d for d in DIMENSIONS if d in dimensions] + [d for d in dimensions if d not in DIMENSIONS]


def _fold_list(folds: list[int] | int) -> list[int]:
    if isinstance(folds, bool) or not isinstance(folds, int | list | tuple):
        raise ValueError(f"folds: expected a count or a list of fold indices, got {folds!r}")
    chosen = list(range(folds)) if isinstance(folds, int) else [int(k) for k in folds]
    if not chosen:
        raise ValueError("folds: an ensemble needs at least one fold")
    if len(set(chosen)) != len(chosen) or min(chosen) < 0:
        raise ValueError(f"folds: expected distinct non-negative fold indices, got {chosen}")
    return chosen


def ensemble_members(
    train_dir: Path, system: str, folds: list[int] | int, params: Params
) -> tuple[dict[int, Path], dict[str, Any]]:
    """{fold: model dir} of a trained neural system and its serving.json; errors name what is wrong."""
    spec = params.systems.get(system)
    if spec is None:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(params.systems)}")
    if spec.kind != "neural":
        raise ValueError(
            f"system {system!r} is of kind {spec.kind!r}: only neural systems can be served as an ensemble "
            "(the eGeMAPS baseline's model/ holds scikit-learn pipelines over openSMILE features, with no "
            "predictor that takes audio)"
        )
    members: dict[int, Path] = {}
    agreed = _Agreed(system=system, sample_rate=params.data.sample_rate)
    for fold in _fold_list(folds):
        model_dir = run_dir(train_dir, system, fold) / MODEL_DIR
        agreed.add(model_dir / "config.json", fold)
        members[fold] = model_dir
    return members, _serving_config(agreed, list(members), params)


@dataclass
class _Agreed:
    """What every fold's model must agree on (seeds, dimensions, sample rate, framing), fold by fold."""

    system: str
    sample_rate: int  # data.sample_rate
    dimensions: list[str] | None = None
    seeds: list[int] | None = None
    framing: set[tuple[int, int]] = field(default_factory=set)  # (frame_samples, hop_samples)
    networks: int = 0

    def add(self, config_path: Path, fold: int) -> None:
        """One fold's model/config.json; raises naming the file where it disagrees with the others."""
        from sermtl.train.training import MODEL_FORMATS

        system = self.system
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; has fold {fold} of {system} been trained?")
        description = json.loads(config_path.read_text())
        if description.get("format") not in MODEL_FORMATS:
            raise ValueError(f"{config_path}: unsupported model format {description.get('format')!r}")
        fold_seeds = [int(seed) for seed in description.get("seeds", [])]  # format 1: one unnamed seed
        if self.seeds is None:
            self.seeds = fold_seeds
        elif fold_seeds != self.seeds:
            raise ValueError(
                f"{config_path}: networks of seeds {fold_seeds}, other folds have seeds {self.seeds}; an "
                "ensemble averages the same seeds in every fold (retrain the folds with one train.seeds)"
            )
        self.networks += len(description["networks"])
        if description.get("system", system) != system:
            raise ValueError(f"{config_path}: a model of system {description['system']!r}, not {system!r}")
        if self.dimensions is None:
            self.dimensions = list(description["dimensions"])
        elif set(description["dimensions"]) != set(self.dimensions):
            raise ValueError(
                f"{config_path}: dimensions {description['dimensions']} differ from {self.dimensions}"
            )
        for network in description["networks"].values():
            config = network["config"]
            if int(config["sample_rate"]) != self.sample_rate:
                raise ValueError(
                    f"{config_path}: network trained at {config['sample_rate']} Hz but "
                    f"data.sample_rate is {self.sample_rate} Hz"
                )
            self.framing.add((int(config["frame_samples"]), int(config["hop_samples"])))


def _min_duration_s(limits: ServingParams, frame_samples: int, rate: int) -> float:
    """The served model's minimum: serving.min_duration_s raised to one frame of the front end (shorter
    audio is a single zero-padded frame); the limits are checked here, before anything is logged."""
    min_duration_s = max(float(limits.min_duration_s), frame_samples / rate)
    if not 0 < min_duration_s <= min(limits.max_duration_s, limits.max_total_duration_s):
        raise ValueError(
            f"serving: the minimum duration ({min_duration_s:g} s: serving.min_duration_s "
            f"{limits.min_duration_s:g} s or one {frame_samples / rate:g} s frame) must be positive and "
            f"at most serving.max_duration_s ({limits.max_duration_s:g} s) and "
            f"serving.max_total_duration_s ({limits.max_total_duration_s:g} s)"
        )
    if limits.max_request_bytes <= 0:
        raise ValueError(f"serving.max_request_bytes must be positive, got {limits.max_request_bytes}")
    return min_duration_s


def _serving_config(agreed: _Agreed, folds: list[int], params: Params) -> dict[str, Any]:
    """serving.json: the served model's own limits, so that it needs no params.yaml when served."""
    if len(agreed.framing) != 1:
        raise ValueError(
            f"{agreed.system}: fold networks frame the audio differently {sorted(agreed.framing)}"
        )
    ((frame_samples, hop_samples),) = agreed.framing
    rate = params.data.sample_rate
    limits = params.serving
    return {
        "format": SERVING_FORMAT,
        "system": agreed.system,
        "folds": folds,
        "sample_rate": rate,
        "max_duration_s": float(limits.max_duration_s),
        "min_duration_s": _min_duration_s(limits, frame_samples, rate),
        "max_total_duration_s": float(limits.max_total_duration_s),
        "max_request_bytes": int(limits.max_request_bytes),
        "return_attention": bool(limits.return_attention),
        "dimensions": ordered_dimensions(agreed.dimensions or []),
        "class_names": list(CLASS_NAMES),
        "frame_s": frame_samples / rate,
        "frame_hop_s": hop_samples / rate,
        "seeds": agreed.seeds or [],
        "networks": agreed.networks,
        "ensemble": (
            "mean of the fold and seed networks' class probabilities (class = argmax) and attention weights"
        ),
    }
