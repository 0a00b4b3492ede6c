"""Training and evaluation of one (system, fold) of the leave-one-session-out protocol: the entry point
that trains each seed's sub-run and combines them, with the public names of the job modules beside it.

Design notes (why it is built this way): docs/design/training.md.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sermtl.data.audio import AudioStore
from sermtl.data.folds import Fold, leave_one_session_out
from sermtl.fsutil import check_output_dir, read_marker, write_marker
from sermtl.model.batching import UtteranceSet
from sermtl.schema import CHECKPOINT_FILE, RUN_METRICS_FILE, SEED_RUN_PATTERN, TRAIN_RUN_OUTPUT
from sermtl.train.inference import (
    Predictor,
    load_predictor,
    predict_segments,
    predict_utterances,
    utterance_attention,
    validation_scores,
)
from sermtl.train.run_files import (
    CHECKPOINT_VERSION,
    MODEL_FORMAT,
    MODEL_FORMATS,
    SEED_DIR_PREFIX,
    read_metrics,
    run_fingerprint,
    seed_dir,
)
from sermtl.train.seed_ensemble import combine_seeds
from sermtl.train.seed_run import ATTENTION_UTTERANCES, FoldSetup, history_records, train_seed
from sermtl.train.trainer import (
    EVAL_BATCH_FACTOR,
    MTL_NETWORK,
    NetworkSpec,
    class_balanced_weights,
    derive_seed,
    multitask_loss,
    network_specs,
)

__all__ = [
    "ATTENTION_UTTERANCES",
    "CHECKPOINT_VERSION",
    "EVAL_BATCH_FACTOR",
    "MODEL_FORMAT",
    "MODEL_FORMATS",
    "MTL_NETWORK",
    "SEED_DIR_PREFIX",
    "NetworkSpec",
    "Predictor",
    "TrainingError",
    "class_balanced_weights",
    "combine_seeds",
    "derive_seed",
    "history_records",
    "load_predictor",
    "multitask_loss",
    "network_specs",
    "predict_segments",
    "predict_utterances",
    "resolve_device",
    "seed_dir",
    "train_fold",
    "utterance_attention",
    "validation_scores",
]

_SEED_DIR_RE = re.compile(SEED_RUN_PATTERN)


class TrainingError(ValueError):
    """A request that cannot be trained: unknown system, fold out of range, unavailable device."""


def resolve_device(requested: str | None, params: Any) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    name = (requested or params.train.device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise TrainingError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def train_fold(
    store_dir: Path | str,
    system_name: str,
    fold_index: int,
    out_dir: Path | str,
    params: Any,
    *,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `system_name` on fold `fold_index` once per seed of train.seeds (the eGeMAPS baseline, which
    is deterministic, once), write the run directory and return its metrics."""
    system = _check_request(params, system_name, fold_index)
    check_output_dir(out_dir, TRAIN_RUN_OUTPUT, [("store", store_dir)])
    if system.kind == "egemaps":
        from sermtl.model import egemaps

        return egemaps.train_fold(store_dir, system_name, fold_index, out_dir, params)  # no seeds

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    torch_device = resolve_device(device, params)
    store = _open_store(store_dir, params)
    fold = leave_one_session_out(store.manifest, params.data.sessions)[fold_index]
    seeds = [int(seed) for seed in params.train.seeds]
    fingerprint = run_fingerprint(params, system_name, system, fold_index, store_dir)
    metrics_path = out_dir / RUN_METRICS_FILE
    if resume and metrics_path.is_file():
        existing = read_metrics(metrics_path)
        if existing.get("fingerprint") == fingerprint:
            return existing
    _claim_seed_dirs(out_dir, seeds)
    # Remove outputs of an earlier run, so a half-replaced directory can never look finished. A checkpoint
    # beside them is an earlier sermtl's: checkpoints are kept per seed sub-run.
    metrics_path.unlink(missing_ok=True)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    store.verify_checksum()  # same-size corruption; one sequential read, cheap next to an epoch
    dimensions = list(params.eval.dimensions)
    setup = FoldSetup(
        store_dir=store_dir,
        system_name=system_name,
        system=system,
        params=params,
        fold=fold,
        specs=network_specs(system, dimensions),
        sets=_fold_sets(store, fold, dimensions),
        dimensions=dimensions,
        device=torch_device,
        resume=resume,
        progress=progress,
    )
    with _deterministic_cpu(torch_device, params):
        for seed in seeds:
            train_seed(setup, seed=seed, run_dir=seed_dir(out_dir, seed))
        return combine_seeds(out_dir, seeds, params, system_name, fingerprint)


def _check_request(params: Any, system_name: str, fold_index: int) -> Any:
    if system_name not in params.systems:
        raise TrainingError(f"unknown system {system_name!r}; valid: {', '.join(sorted(params.systems))}")
    folds = len(params.data.sessions)
    if not 0 <= fold_index < folds:
        raise TrainingError(f"fold {fold_index} is out of range; valid: 0..{folds - 1} (one per session)")
    return params.systems[system_name]


def _open_store(store_dir: Path, params: Any) -> AudioStore:
    store = AudioStore(store_dir)
    if store.sample_rate != params.data.sample_rate:
        raise TrainingError(
            f"{store_dir}: store holds {store.sample_rate} Hz audio but data.sample_rate is "
            f"{params.data.sample_rate}; re-run ingestion"
        )
    return store


def _fold_sets(
    store: AudioStore, fold: Fold, dimensions: list[str]
) -> tuple[UtteranceSet, UtteranceSet, UtteranceSet]:
    """The fold's train, validation and test utterances; each must hold some."""
    train_set = UtteranceSet(store, fold.train_ids, dimensions)
    val_set = UtteranceSet(store, fold.validation_ids, dimensions)
    test_set = UtteranceSet(store, fold.test_ids, dimensions)
    if not len(train_set) or not len(val_set) or not len(test_set):
        raise TrainingError(
            f"fold {fold.index}: empty split (train/validation/test must all hold utterances)"
        )
    return train_set, val_set, test_set


@contextmanager
def _deterministic_cpu(device: torch.device, params: Any) -> Iterator[None]:
    """On CPU: deterministic algorithms and train.cpu_threads threads (when > 0) while training; the
    caller's settings are restored after."""
    deterministic_before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if params.train.cpu_threads > 0:
            torch.set_num_threads(params.train.cpu_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
        torch.set_num_threads(threads_before)


def _claim_seed_dirs(out_dir: Path, seeds: list[int]) -> None:
    """Mark the fold's folder as a training run's (schema.TRAIN_RUN_OUTPUT knows its seed sub-runs by
    name) and remove the sub-runs of seeds no longer in train.seeds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(out_dir) is None:
        write_marker(out_dir, TRAIN_RUN_OUTPUT)  # written in place: the run folder is ours from here on
    wanted = {seed_dir(out_dir, seed).name for seed in seeds}
    for name in sorted(os.listdir(out_dir)):
        path = out_dir / name
        if _SEED_DIR_RE.fullmatch(name) and name not in wanted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
