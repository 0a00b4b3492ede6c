"""Fabricated but contract-valid training run directories, for tests of what reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sermtl.evaluate.metrics import PREDICTION_COLUMNS, evaluate_predictions
from sermtl.params import Params
from sermtl.schema import DIMENSIONS, PREDICTIONS_FILE, RUN_METRICS_FILE


def write_run(
    path: Path, system: str, fold: int, labels: np.ndarray, predictions: np.ndarray, ids: list[str]
) -> None:
    rows = []
    for dim_index, dimension in enumerate(DIMENSIONS):
        for i, uid in enumerate(ids):
            probabilities = np.full(3, 0.1)
            probabilities[predictions[dim_index, i]] = 0.8
            rows.append(
                {
                    "utterance_id": uid,
                    "system": system,
                    "fold": fold,
                    "test_session": fold + 1,
                    "dimension": dimension,
                    "improvised": i % 2 == 0,
                    "label": int(labels[dim_index, i]),
                    "prediction": int(predictions[dim_index, i]),
                    "prob_low": probabilities[0],
                    "prob_medium": probabilities[1],
                    "prob_high": probabilities[2],
                }
            )
    frame = pd.DataFrame(rows).astype(PREDICTION_COLUMNS)
    path.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path / PREDICTIONS_FILE, index=False)
    metrics = {
        "system": system,
        "kind": "neural",
        "fold": fold,
        "test_session": fold + 1,
        "validation_speaker": f"Ses0{(fold + 1) % 5 + 1}_F",
        "evaluation": evaluate_predictions(frame),
        "validation": dict.fromkeys(DIMENSIONS, 0.5),
        "train_seconds": 1.0,
    }
    (path / RUN_METRICS_FILE).write_text(json.dumps(metrics))


def write_study(
    train_dir: Path, params: Params, accuracy: dict[str, float], per_fold: int = 40, seed: int = 0
) -> None:
    """Each system predicts the true class with probability `accuracy[system]`, else a random class."""
    rng = np.random.default_rng(seed)
    for fold in range(len(params.data.sessions)):
        # both speakers of the session (F, M, by pairs: each has improvised and scripted rows)
        ids = [f"Ses0{fold + 1}F_impro01_{'FM'[i // 2 % 2]}{i:03d}" for i in range(per_fold)]
        labels = rng.integers(0, 3, size=(3, per_fold))
        for system in params.systems:
            correct = rng.random((3, per_fold)) < accuracy[system]
            predictions = np.where(correct, labels, rng.integers(0, 3, size=(3, per_fold)))
            write_run(train_dir / system / f"fold{fold}", system, fold, labels, predictions, ids)
