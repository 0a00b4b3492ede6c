"""Classification metrics for the 3-level dimensions, shared by every system so results compare.

UAR (unweighted average recall = macro recall) is the primary metric of this literature; weighted
accuracy is plain accuracy; per-utterance predictions are kept so significance tests can pair them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sermtl.schema import CLASS_NAMES

NUM_CLASSES = len(CLASS_NAMES)

# One row per (utterance, dimension): the contract between training, evaluation, comparison and significance.
PREDICTION_COLUMNS: dict[str, str] = {
    "utterance_id": "string",
    "system": "string",
    "fold": "int64",  # index of the leave-one-session-out fold
    "test_session": "int64",
    "dimension": "string",  # arousal, valence, dominance
    "improvised": "bool",
    "label": "int64",  # 0 low, 1 medium, 2 high
    "prediction": "int64",
    "prob_low": "float64",
    "prob_medium": "float64",
    "prob_high": "float64",
}
PROBABILITY_COLUMNS = ("prob_low", "prob_medium", "prob_high")
SUBSETS = ("all", "improvised")


def confusion(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def uar(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (absent classes have no defined recall)."""
    matrix = confusion(labels, predictions)
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    matrix = confusion(labels, predictions)
    true_positive = np.diag(matrix).astype(np.float64)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    present = (support + predicted) > 0
    denominator = support + predicted
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return float(f1[present].mean()) if present.any() else float("nan")


def scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return {
        "uar": uar(labels, predictions),
        "weighted_accuracy": float(np.mean(labels == predictions)) if labels.size else float("nan"),
        "macro_f1": macro_f1(labels, predictions),
        "confusion": confusion(labels, predictions).tolist(),
        "n": int(labels.size),
    }


def evaluate_predictions(predictions: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """{subset: {dimension: scores}} for one prediction table (one fold, or folds pooled)."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for subset in SUBSETS:
        frame = predictions if subset == "all" else predictions[predictions["improvised"]]
        result[subset] = {
            str(dimension): scores(group["label"].to_numpy(), group["prediction"].to_numpy())
            for dimension, group in frame.groupby("dimension", sort=True)
        }
    return result


def flat_metrics(evaluation: dict[str, dict[str, dict[str, Any]]], prefix: str = "") -> dict[str, float]:
    """Scalar metrics named like `test_all_arousal_uar`, for MLflow and KFP Metrics."""
    flat: dict[str, float] = {}
    for subset, by_dimension in evaluation.items():
        for dimension, values in by_dimension.items():
            for name in ("uar", "weighted_accuracy", "macro_f1"):
                flat[f"{prefix}{subset}_{dimension}_{name}"] = float(values[name])
    return flat


def validate_predictions(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check a prediction table against the contract; the error names the file and the column."""
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: prediction table lacks column(s) {', '.join(missing)}")
    frame = frame[list(PREDICTION_COLUMNS)].astype(PREDICTION_COLUMNS)
    for column in ("label", "prediction"):
        bad = frame[~frame[column].between(0, NUM_CLASSES - 1)]
        if len(bad):
            raise ValueError(f"{where}: column {column} has values outside 0..2, e.g. row {bad.index[0]}")
    return frame
