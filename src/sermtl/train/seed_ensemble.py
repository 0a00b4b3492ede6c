"""The fold's outputs for its seed ensemble, built from the finished seed sub-runs' files (never from memory),
so that seeds trained in one go and seeds resumed one by one give identical bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sermtl.evaluate.metrics import PROBABILITY_COLUMNS, evaluate_predictions, validate_predictions
from sermtl.fsutil import atomic_directory, write_json
from sermtl.schema import ATTENTION_FILE, HISTORY_FILE, MODEL_DIR, PREDICTIONS_FILE, RUN_METRICS_FILE
from sermtl.train.inference import mean_over_seeds
from sermtl.train.run_files import (
    MODEL_FORMAT,
    SEED_DIR_PREFIX,
    params_record,
    read_metrics,
    seed_dir,
    write_npz,
    write_parquet,
)

# A finished seed sub-run: its seed, folder, metrics.json and predictions.parquet.
SeedRun = tuple[int, Path, dict[str, Any], pd.DataFrame]


def combine_seeds(
    out_dir: Path | str, seeds: list[int], params: Any, system_name: str, fingerprint: str
) -> dict[str, Any]:
    """Write the fold's outputs for the seed ensemble from its finished seed sub-runs' files, metrics.json
    last; returns the fold's metrics. What each file holds: docs/design/training.md."""
    out_dir = Path(out_dir)
    system = params.systems[system_name]
    runs = _load_seed_runs(out_dir, seeds)
    combined = _ensemble_predictions(out_dir, runs)
    _write_ensemble_model(out_dir, runs, seeds)
    write_parquet(combined, out_dir / PREDICTIONS_FILE)
    _write_ensemble_attention(out_dir, runs)
    write_json(out_dir / HISTORY_FILE, _ensemble_history(runs))
    metrics = _ensemble_metrics(
        runs,
        out_dir=out_dir,
        seeds=seeds,
        params=params,
        system_name=system_name,
        system=system,
        combined=combined,
        fingerprint=fingerprint,
    )
    write_json(out_dir / RUN_METRICS_FILE, metrics)
    return metrics


def _load_seed_runs(out_dir: Path, seeds: list[int]) -> list[SeedRun]:
    """Every seed's finished sub-run; an unfinished one, or one with other test rows, is an error."""
    runs = []
    for seed in seeds:
        path = seed_dir(out_dir, seed)
        metrics = read_metrics(path / RUN_METRICS_FILE)
        if not metrics:
            raise RuntimeError(
                f"{path / RUN_METRICS_FILE}: missing or unreadable; seed {seed} is not finished"
            )
        table = validate_predictions(pd.read_parquet(path / PREDICTIONS_FILE), str(path / PREDICTIONS_FILE))
        runs.append((seed, path, metrics, table))
    first_path, _, first_table = runs[0][1:]
    rows = ["utterance_id", "dimension", "label"]
    for _, path, _, table in runs[1:]:
        if not table[rows].equals(first_table[rows]):
            raise RuntimeError(
                f"{path / PREDICTIONS_FILE}: other test rows than {first_path / PREDICTIONS_FILE}"
            )
    return runs


def _ensemble_predictions(out_dir: Path, runs: list[SeedRun]) -> pd.DataFrame:
    """Per utterance and dimension the mean of the seeds' probabilities, the class its argmax."""
    columns = list(PROBABILITY_COLUMNS)
    probabilities = mean_over_seeds([table[columns].to_numpy() for *_, table in runs])
    combined = runs[0][3].copy()
    combined[columns] = probabilities
    combined["prediction"] = probabilities.argmax(axis=1)
    return validate_predictions(combined, str(out_dir / PREDICTIONS_FILE))


def _write_ensemble_model(out_dir: Path, runs: list[SeedRun], seeds: list[int]) -> None:
    """Every seed's networks (the state dicts copied byte for byte) in one model/ folder."""
    with atomic_directory(out_dir / MODEL_DIR) as tmp:
        networks: dict[str, dict[str, Any]] = {}
        for seed, path, _, _ in runs:
            description = json.loads((path / MODEL_DIR / "config.json").read_text())
            for name, entry in description["networks"].items():
                key = f"{SEED_DIR_PREFIX}{seed}_{name}"
                shutil.copyfile(path / MODEL_DIR / entry["file"], tmp / f"{key}.pt")
                networks[key] = {
                    "file": f"{key}.pt",
                    "config": entry["config"],
                    "network": name,
                    "seed": seed,
                }
        write_json(
            tmp / "config.json",
            {
                "format": MODEL_FORMAT,
                "system": description["system"],
                "dimensions": description["dimensions"],
                "max_frames": description["max_frames"],
                "seeds": list(seeds),
                "networks": networks,
            },
        )


def _write_ensemble_attention(out_dir: Path, runs: list[SeedRun]) -> None:
    """The mean of the seeds' weights (frame i is the same audio for every seed's network)."""
    if not (runs[0][1] / ATTENTION_FILE).is_file():
        (out_dir / ATTENTION_FILE).unlink(missing_ok=True)
        return
    loaded = []
    for _, path, _, _ in runs:
        with np.load(path / ATTENTION_FILE) as archive:
            loaded.append({key: np.asarray(archive[key]) for key in archive.files})
    attention = dict(loaded[0])
    for key in attention:
        if "__" in key:
            attention[key] = mean_over_seeds([arrays[key] for arrays in loaded]).astype(np.float32)
    write_npz(attention, out_dir / ATTENTION_FILE)


def _ensemble_history(runs: list[SeedRun]) -> list[dict[str, Any]]:
    """One seed: its history; several: their records merged by epoch, keys prefixed `seed<s>_`."""
    histories = {seed: json.loads((path / HISTORY_FILE).read_text()) for seed, path, _, _ in runs}
    if len(histories) == 1:
        return next(iter(histories.values()))
    by_epoch: dict[int, dict[str, Any]] = {}
    for seed, records in histories.items():
        for record in records:
            merged = by_epoch.setdefault(int(record["epoch"]), {"epoch": int(record["epoch"])})
            merged.update({f"{SEED_DIR_PREFIX}{seed}_{k}": v for k, v in record.items() if k != "epoch"})
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _seed_keyed(values: dict[int, Any]) -> Any:
    """One seed: its value as is; several: {"seed<s>": int} or {"seed<s>_<dimension>": int}, flat."""
    if len(values) == 1:
        return next(iter(values.values()))
    flat: dict[str, Any] = {}
    for seed, value in values.items():
        prefix = f"{SEED_DIR_PREFIX}{seed}"
        if isinstance(value, dict):
            flat.update({f"{prefix}_{key}": item for key, item in value.items()})
        else:
            flat[prefix] = value
    return flat


def _ensemble_metrics(
    runs: list[SeedRun],
    *,
    out_dir: Path,
    seeds: list[int],
    params: Any,
    system_name: str,
    system: Any,
    combined: pd.DataFrame,
    fingerprint: str,
) -> dict[str, Any]:
    """The fold's metrics.json: the ensemble's scores, the seeds' means and each seed's own."""
    first = runs[0][2]
    per_seed = {seed: metrics for seed, _, metrics, _ in runs}
    train_seconds = sum(float(m["train_seconds"]) for m in per_seed.values())
    train_audio = sum(float(m["train_audio_seconds"]) for m in per_seed.values())
    devices = sorted({str(m["device"]) for m in per_seed.values()})
    return {
        "system": system_name,
        "kind": system.kind,
        "fold": first["fold"],
        "test_session": first["test_session"],
        "validation_speaker": first["validation_speaker"],
        "seeds": list(seeds),
        "evaluation": evaluate_predictions(combined),
        "validation": {
            dimension: float(mean_over_seeds([m["validation"][dimension] for m in per_seed.values()]))
            for dimension in first["validation"]
        },
        "best_epoch": _seed_keyed({seed: m["best_epoch"] for seed, m in per_seed.items()}),
        "epochs_run": _seed_keyed({seed: m["epochs_run"] for seed, m in per_seed.items()}),
        "networks": {
            f"{SEED_DIR_PREFIX}{seed}_{name}": {**entry, "seed": seed}
            for seed, m in per_seed.items()
            for name, entry in m["networks"].items()
        },
        "seed_runs": {
            str(seed): {
                "dir": seed_dir(out_dir, seed).name,
                "fingerprint": m["fingerprint"],
                **{
                    k: m[k] for k in ("evaluation", "validation", "best_epoch", "epochs_run", "train_seconds")
                },
            }
            for seed, m in per_seed.items()
        },
        "train_seconds": train_seconds,
        "audio_seconds_per_second": train_audio / train_seconds if train_seconds > 0 else float("nan"),
        "device": ",".join(devices),
        "parameters": first["parameters"],
        "utterances": first["utterances"],
        "fingerprint": fingerprint,
        "params": params_record(params, system),
    }
