"""A training run directory's files, shared by a seed's sub-run and the fold that combines them: where a
seed's sub-run lives, the fingerprint that tells a stale result, and the writers of its outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sermtl.fsutil import atomic_directory, atomic_write, write_json
from sermtl.model.network import ModelConfig
from sermtl.schema import MANIFEST_FILE, MODEL_DIR, SEED_RUN_PREFIX, STORE_META_FILE

CHECKPOINT_VERSION = 1
MODEL_FORMAT = 2  # 2: a model/ may hold several seeds' networks per dimension, averaged
MODEL_FORMATS = (1, 2)  # what load_predictor reads
SEED_DIR_PREFIX = SEED_RUN_PREFIX  # a fold's sub-run of seed s is <fold>/seed<s>


def seed_dir(out_dir: Path | str, seed: int) -> Path:
    """The sub-run of one seed inside a fold's run directory: `<out_dir>/seed<s>`."""
    return Path(out_dir) / f"{SEED_DIR_PREFIX}{int(seed)}"


def run_fingerprint(
    params: Any, system_name: str, system: Any, fold_index: int, store_dir: Path, seed: int | None = None
) -> str:
    """What a result depends on; a checkpoint or result with another fingerprint is stale. The fold's
    (`seed` None) includes train.seeds; a seed sub-run's its own seed instead, not the other seeds."""
    train = dataclasses.asdict(params.train)
    for volatile in ("device", "num_workers", "compile"):
        train.pop(volatile, None)
    if seed is not None:
        train.pop("seeds")
        train["seed"] = int(seed)
    digest = hashlib.sha256()
    for name in (MANIFEST_FILE, STORE_META_FILE):
        digest.update((store_dir / name).read_bytes())
    payload = {
        "version": CHECKPOINT_VERSION,
        "system_name": system_name,
        "system": dataclasses.asdict(system),
        "fold": fold_index,
        "sessions": list(params.data.sessions),
        "sample_rate": params.data.sample_rate,
        "dimensions": list(params.eval.dimensions),
        "features": dataclasses.asdict(params.features),
        "model": dataclasses.asdict(params.model),
        "train": train,
        "store": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json, or {} when it cannot be read (then the run is not finished)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def params_record(params: Any, system: Any, seed: int | None = None) -> dict[str, Any]:
    """The parameters metrics.json records; a seed sub-run's train section has its seed, not train.seeds."""
    train = dataclasses.asdict(params.train)
    if seed is not None:
        train.pop("seeds")
        train["seed"] = int(seed)
    return {
        "model": dataclasses.asdict(params.model),
        "train": train,
        "features": dataclasses.asdict(params.features),
        "system": dataclasses.asdict(system),
    }


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def write_model_dir(
    out_dir: Path,
    system_name: str,
    max_frames: int,
    dimensions: list[str],
    networks: dict[str, tuple[ModelConfig, dict[str, torch.Tensor]]],
    seed: int,
) -> None:
    with atomic_directory(out_dir / MODEL_DIR) as tmp:
        description = {
            "format": MODEL_FORMAT,
            "system": system_name,
            "dimensions": list(dimensions),
            "max_frames": max_frames,
            "seeds": [seed],
            "networks": {
                name: {"file": f"{name}.pt", "config": config.to_dict(), "network": name, "seed": seed}
                for name, (config, _) in networks.items()
            },
        }
        write_json(tmp / "config.json", description)
        for name, (_, state) in networks.items():
            torch.save(state, tmp / f"{name}.pt")
