"""One seed's sub-run of a fold: its network(s) trained, with a checkpoint after every epoch that a resumed
run continues, then scored on the test session and every output written, metrics.json last."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sermtl.data.folds import Fold
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, evaluate_predictions, validate_predictions
from sermtl.fsutil import atomic_write, check_output_dir, read_marker, write_json, write_marker
from sermtl.model.batching import UtteranceSet
from sermtl.model.network import ModelConfig, SerModel
from sermtl.schema import (
    ATTENTION_FILE,
    CHECKPOINT_FILE,
    HISTORY_FILE,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    TRAIN_RUN_OUTPUT,
)
from sermtl.train.inference import predict_utterances
from sermtl.train.run_files import (
    CHECKPOINT_VERSION,
    params_record,
    read_metrics,
    run_fingerprint,
    write_model_dir,
    write_npz,
    write_parquet,
)
from sermtl.train.trainer import EVAL_BATCH_FACTOR, MTL_NETWORK, NetworkSpec, NetworkTrainer, cpu_state

ATTENTION_UTTERANCES = 4  # test utterances whose attention weights are kept

# What each network of a seed's sub-run ends with: its config, the trained model, its summary.
Trained = dict[str, tuple[ModelConfig, SerModel, dict[str, Any]]]


@dataclass(frozen=True)
class FoldSetup:
    """What every seed's sub-run of one fold shares: the request, its data and where it runs."""

    store_dir: Path
    system_name: str
    system: Any
    params: Any
    fold: Fold
    specs: list[NetworkSpec]
    sets: tuple[UtteranceSet, UtteranceSet, UtteranceSet]  # train, validation, test
    dimensions: list[str]
    device: torch.device
    resume: bool
    progress: bool


def train_seed(setup: FoldSetup, *, seed: int, run_dir: Path) -> dict[str, Any]:
    """One seed's sub-run: the system's network(s) trained with `seed` (a finished sub-run with the same
    fingerprint is kept, a checkpoint continued) and scored on the test session."""
    check_output_dir(run_dir, TRAIN_RUN_OUTPUT, [("store", setup.store_dir)])
    fingerprint = run_fingerprint(
        setup.params, setup.system_name, setup.system, setup.fold.index, setup.store_dir, seed
    )
    metrics_path, checkpoint_path = run_dir / RUN_METRICS_FILE, run_dir / CHECKPOINT_FILE
    if setup.resume and metrics_path.is_file():
        existing = read_metrics(metrics_path)
        if existing.get("fingerprint") == fingerprint:
            return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(run_dir) is None:
        write_marker(run_dir, TRAIN_RUN_OUTPUT)  # written in place: the run folder is ours from here on
    checkpoint = _open_checkpoint(setup, run_dir, checkpoint_path, fingerprint)
    # Remove outputs of an earlier run, so a half-replaced directory can never look finished.
    metrics_path.unlink(missing_ok=True)

    trained: Trained = {}
    for spec in setup.specs:
        trained[spec.name] = _train_one(
            setup, spec, seed=seed, checkpoint=checkpoint, checkpoint_path=checkpoint_path
        )
    metrics = _finish(setup, run_dir=run_dir, seed=seed, trained=trained, fingerprint=fingerprint)
    checkpoint_path.unlink(missing_ok=True)
    return metrics


# ----------------------------------------------------------------------------------------------------
# Checkpoints and training


def _atomic_torch_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a corrupt checkpoint is not worth failing for: train afresh
        return None
    if checkpoint.get("version") != CHECKPOINT_VERSION or checkpoint.get("fingerprint") != fingerprint:
        return None
    return checkpoint


def _open_checkpoint(
    setup: FoldSetup, run_dir: Path, checkpoint_path: Path, fingerprint: str
) -> dict[str, Any]:
    """The sub-run's checkpoint to continue (resume, same fingerprint), else a fresh one."""
    if not setup.resume:
        checkpoint_path.unlink(missing_ok=True)
    checkpoint = _load_checkpoint(checkpoint_path, fingerprint) if setup.resume else None
    if checkpoint is None:
        checkpoint = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "finished": {}}
    elif setup.progress:
        tqdm.write(
            f"{run_dir}: resuming from checkpoint (epoch {checkpoint.get('epoch', 0)})", file=sys.stderr
        )
    return checkpoint


def _subset(data: UtteranceSet, tasks: list[str]) -> UtteranceSet:
    """The same utterances with only the label columns of `tasks` (a single-task network's view)."""
    view = copy.copy(data)
    columns = [data.tasks.index(t) for t in tasks]
    view.tasks = list(tasks)
    view.labels = data.labels[:, columns]
    return view


def _train_one(
    setup: FoldSetup,
    spec: NetworkSpec,
    *,
    seed: int,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
) -> tuple[ModelConfig, SerModel, dict[str, Any]]:
    """One network of the sub-run: kept if the checkpoint has it finished, else trained (or continued)."""
    params, fold = setup.params, setup.fold
    train_set, val_set, _ = setup.sets
    config = ModelConfig.from_params(params, spec.tasks, setup.system.pooling)
    trainer = NetworkTrainer(
        spec,
        config,
        train_set=_subset(train_set, spec.tasks),
        val_set=_subset(val_set, spec.tasks),
        params=params,
        fold_index=fold.index,
        seed=seed,
        device=setup.device,
        describe=f"{setup.system_name} fold{fold.index} seed{seed} {spec.name}",
        progress=setup.progress,
    )
    finished = checkpoint["finished"].get(spec.name)
    if finished is not None:
        trainer.model.load_state_dict(finished["state"])
        return config, trainer.model, finished["summary"]
    current = checkpoint.get("current")
    if current is not None and current.get("network") == spec.name:
        trainer.load_state(current)

    def save(state: dict[str, Any]) -> None:
        checkpoint["current"] = state
        checkpoint["epoch"] = state["epoch"]
        checkpoint["network"] = spec.name
        _atomic_torch_save(checkpoint, checkpoint_path)

    trainer.run(save)
    summary = trainer.summary()
    summary["history"] = trainer.history
    checkpoint["finished"][spec.name] = {"state": cpu_state(trainer.model), "summary": summary}
    checkpoint.pop("current", None)
    _atomic_torch_save(checkpoint, checkpoint_path)
    return config, trainer.model, summary


# ----------------------------------------------------------------------------------------------------
# Scoring the test session and the sub-run's outputs


def _finish(
    setup: FoldSetup, *, run_dir: Path, seed: int, trained: Trained, fingerprint: str
) -> dict[str, Any]:
    """Score the test session with one seed's networks, write every output of its sub-run (metrics.json
    last) and return the metrics."""
    probabilities, attention_arrays = _score_test_session(setup, trained)
    test_set = setup.sets[2]
    table = _prediction_table(test_set, probabilities, setup.dimensions, setup.system_name, setup.fold)

    first_config = next(iter(trained.values()))[0]
    write_model_dir(
        run_dir,
        setup.system_name,
        setup.params.features.max_frames,
        setup.dimensions,
        {name: (config, cpu_state(model)) for name, (config, model, _) in trained.items()},
        seed,
    )
    write_parquet(table, run_dir / PREDICTIONS_FILE)
    if attention_arrays:
        attention_arrays["frame_hop_s"] = np.float64(first_config.hop_seconds)
        attention_arrays["frame_s"] = np.float64(first_config.frame_samples / first_config.sample_rate)
        write_npz(attention_arrays, run_dir / ATTENTION_FILE)
    else:
        (run_dir / ATTENTION_FILE).unlink(missing_ok=True)
    write_json(run_dir / HISTORY_FILE, history_records({n: s["history"] for n, (_, _, s) in trained.items()}))

    metrics = _seed_metrics(setup, seed=seed, trained=trained, table=table, fingerprint=fingerprint)
    write_json(run_dir / RUN_METRICS_FILE, metrics)
    return metrics


def _score_test_session(
    setup: FoldSetup, trained: Trained
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Utterance probabilities {dimension: [N, 3]} on the test session, and the kept attention weights
    {"<utterance_id>__<dimension>": weights} (attention systems only)."""
    params, device, test_set = setup.params, setup.device, setup.sets[2]
    max_frames = params.features.max_frames
    frame_budget = params.train.batch_size * max_frames * EVAL_BATCH_FACTOR
    bf16 = device.type == "cuda" and params.train.bf16
    attention_items = (
        list(range(min(ATTENTION_UTTERANCES, len(test_set)))) if setup.system.pooling == "attention" else []
    )
    probabilities: dict[str, np.ndarray] = {}
    attention_arrays: dict[str, np.ndarray] = {}
    for config, model, _ in trained.values():
        probs, attention = predict_utterances(
            model, _subset(test_set, config.tasks), max_frames, device, frame_budget, bf16, attention_items
        )
        probabilities.update(probs)
        for task, by_item in attention.items():
            for item, weights in by_item.items():
                attention_arrays[f"{test_set.ids[item]}__{task}"] = weights
    return probabilities, attention_arrays


def _prediction_table(
    data: UtteranceSet,
    probabilities: dict[str, np.ndarray],
    dimensions: list[str],
    system_name: str,
    fold: Fold,
) -> pd.DataFrame:
    rows = []
    for column, dimension in enumerate(dimensions):
        probs = probabilities[dimension]
        frame = pd.DataFrame(
            {
                "utterance_id": data.ids,
                "system": system_name,
                "fold": fold.index,
                "test_session": fold.test_session,
                "dimension": dimension,
                "improvised": data.improvised,
                "label": data.labels[:, column],
                "prediction": probs.argmax(axis=1),
                "prob_low": probs[:, 0].astype(np.float64),
                "prob_medium": probs[:, 1].astype(np.float64),
                "prob_high": probs[:, 2].astype(np.float64),
            }
        )
        rows.append(frame)
    table = pd.concat(rows, ignore_index=True)
    table["_order"] = table["dimension"].map({d: i for i, d in enumerate(dimensions)})
    table = table.sort_values(["utterance_id", "_order"], kind="stable").drop(columns="_order")
    table = table.reset_index(drop=True)[list(PREDICTION_COLUMNS)].astype(PREDICTION_COLUMNS)
    return validate_predictions(table, PREDICTIONS_FILE)


def _per_network(values: dict[str, int]) -> int | dict[str, int]:
    """The single network's value (multi-task), or {dimension: value} (single-task)."""
    return next(iter(values.values())) if list(values) == [MTL_NETWORK] else values


def history_records(histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """history.json: one record per epoch. Multi-task: epoch, train_loss, val_loss, val_uar_<dim>,
    val_uar_mean, seconds, audio_seconds_per_second. Single-task: the networks' records of an epoch
    merged, their keys prefixed by the dimension (arousal_train_loss, ...), val_uar_<dim> kept as is;
    a network that stopped early has no keys in later epochs."""
    if list(histories) == [MTL_NETWORK]:
        return [{k: v for k, v in r.items() if k != "network"} for r in histories[MTL_NETWORK]]
    by_epoch: dict[int, dict[str, Any]] = {}
    for name, records in histories.items():
        for record in records:
            merged = by_epoch.setdefault(int(record["epoch"]), {"epoch": int(record["epoch"])})
            for key, value in record.items():
                if key in ("network", "epoch", "val_uar_mean"):
                    continue
                merged[key if key.startswith("val_uar_") else f"{name}_{key}"] = value
    return [by_epoch[e] for e in sorted(by_epoch)]


def _seed_metrics(
    setup: FoldSetup, *, seed: int, trained: Trained, table: pd.DataFrame, fingerprint: str
) -> dict[str, Any]:
    """The sub-run's metrics.json."""
    fold, system = setup.fold, setup.system
    summaries = {name: summary for name, (_, _, summary) in trained.items()}
    train_seconds = sum(s["train_seconds"] for s in summaries.values())
    train_audio = sum(s["train_audio_seconds"] for s in summaries.values())
    validation: dict[str, float] = {}
    for summary in summaries.values():
        validation.update(summary["validation"])
    return {
        "system": setup.system_name,
        "kind": system.kind,
        "fold": fold.index,
        "test_session": fold.test_session,
        "validation_speaker": fold.validation_speaker,
        "seed": seed,
        "evaluation": evaluate_predictions(table),
        "validation": validation,
        "best_epoch": _per_network({name: s["best_epoch"] for name, s in summaries.items()}),
        "epochs_run": _per_network({name: s["epochs_run"] for name, s in summaries.items()}),
        "networks": {
            name: {k: s[k] for k in ("best_epoch", "epochs_run", "validation", "train_seconds")}
            for name, s in summaries.items()
        },
        "train_seconds": train_seconds,
        "train_audio_seconds": train_audio,
        "audio_seconds_per_second": train_audio / train_seconds if train_seconds > 0 else float("nan"),
        "device": str(setup.device),
        "parameters": {name: s["parameters"] for name, s in summaries.items()},
        "utterances": {
            "train": len(fold.train_ids),
            "validation": len(fold.validation_ids),
            "test": len(setup.sets[2]),
        },
        "fingerprint": fingerprint,
        "params": params_record(setup.params, system, seed),
    }
