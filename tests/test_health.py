"""Training health: first-epoch networks and single-class folds are found in every metrics.json shape."""

from __future__ import annotations

import pandas as pd

from sermtl.evaluate.health import best_epochs, to_markdown, training_health


def predictions(system: str, fold: int, per_dimension: dict[str, list[int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"system": system, "fold": fold, "dimension": d, "prediction": p, "label": p}
            for d, values in per_dimension.items()
            for p in values
        ]
    )


def test_best_epochs_read_every_shape():
    assert best_epochs({"best_epoch": 4}) == {"network": 4}
    assert best_epochs({"best_epoch": {"arousal": 3, "valence": 1}}) == {"arousal": 3, "valence": 1}
    assert best_epochs({"best_epoch": {"seed0": 2, "seed1": 5}}) == {"seed0": 2, "seed1": 5}
    assert best_epochs({}) == {}


def test_first_epoch_and_single_class_are_flagged_and_healthy_folds_are_not():
    table = pd.concat(
        [
            predictions("mtl_attention", 0, {"arousal": [0, 1, 2], "valence": [0, 1, 1]}),
            predictions("stl_attention", 0, {"arousal": [0, 1, 2], "valence": [1, 1, 1]}),
            predictions("egemaps_linear", 0, {"arousal": [0, 1, 2], "valence": [0, 2, 1]}),
        ]
    )
    metrics = [
        {"system": "mtl_attention", "fold": 0, "kind": "neural", "best_epoch": 6},
        {"system": "stl_attention", "fold": 0, "kind": "neural", "best_epoch": {"arousal": 1, "valence": 4}},
        {"system": "egemaps_linear", "fold": 0, "kind": "egemaps"},
    ]
    health = training_health(table, metrics).set_index("system")
    assert bool(health.loc["mtl_attention", "healthy"]) and bool(health.loc["egemaps_linear", "healthy"])
    assert health.loc["stl_attention", "first_epoch_best"] == ["arousal"]
    assert health.loc["stl_attention", "single_class_dimensions"] == ["valence"]
    text = to_markdown(health.reset_index())
    assert (
        "1 of 3 (system, fold) runs need a look" in text
        and "| stl_attention | 0 | arousal | valence |" in text
    )
    assert "all 1 (system, fold) runs learned" in to_markdown(health.reset_index().iloc[:1])
