"""Metrics checked against scikit-learn on random and hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from sermtl.evaluate.metrics import (
    PREDICTION_COLUMNS,
    evaluate_predictions,
    flat_metrics,
    scores,
    uar,
    validate_predictions,
)


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels, predictions = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    result = scores(labels, predictions)
    assert result["uar"] == pytest.approx(recall_score(labels, predictions, average="macro"))
    assert result["weighted_accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert result["confusion"] == confusion_matrix(labels, predictions, labels=[0, 1, 2]).tolist()


def test_uar_is_chance_for_majority_guessing():
    labels = np.array([1] * 80 + [0] * 10 + [2] * 10)
    assert uar(labels, np.ones_like(labels)) == pytest.approx(1 / 3)
    assert scores(labels, np.ones_like(labels))["weighted_accuracy"] == pytest.approx(0.8)


def test_evaluate_predictions_subsets_and_flat_names():
    rows = []
    for i in range(12):
        for dimension in ("arousal", "valence"):
            rows.append(
                {
                    "utterance_id": f"u{i}",
                    "system": "s",
                    "fold": 0,
                    "test_session": 1,
                    "dimension": dimension,
                    "improvised": i < 6,
                    "label": i % 3,
                    "prediction": i % 3 if i < 6 else 0,
                    "prob_low": 1.0,
                    "prob_medium": 0.0,
                    "prob_high": 0.0,
                }
            )
    frame = validate_predictions(pd.DataFrame(rows), "test")
    evaluation = evaluate_predictions(frame)
    assert evaluation["improvised"]["arousal"]["uar"] == 1.0
    assert evaluation["all"]["arousal"]["n"] == 12
    flat = flat_metrics(evaluation, prefix="test_")
    assert flat["test_improvised_valence_uar"] == 1.0 and "test_all_arousal_macro_f1" in flat


def test_prediction_contract_errors_name_the_column():
    frame = pd.DataFrame({c: [0] for c in PREDICTION_COLUMNS}).drop(columns=["prob_high"])
    with pytest.raises(ValueError, match=r"preds.parquet: prediction table lacks column\(s\) prob_high"):
        validate_predictions(frame, "preds.parquet")
