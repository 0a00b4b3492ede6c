"""Training health of a study: did every fold network learn, or did it stop at once or collapse?

Two symptoms a UAR table hides: a network whose best validation epoch is its first (early stopping kept
an almost untrained network), and a fold that predicts one class for a dimension on its whole test
session (UAR exactly chance, whatever the audio). Both are listed per (system, fold) by `sermtl results`
(`health.json`, a section of results.md), so a reader of the table sees them.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

HEALTH_JSON = "health.json"


def best_epochs(metrics: dict[str, Any]) -> dict[str, int]:
    """{network: best epoch} of a fold's metrics.json (an int, per dimension, or per seed[_dimension])."""
    value = metrics.get("best_epoch")
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float)}
    if isinstance(value, int | float):
        return {"network": int(value)}
    return {}


def training_health(predictions: pd.DataFrame, fold_metrics: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (system, fold): first-epoch networks and single-class dimensions; `healthy` if neither."""
    classes = predictions.groupby(["system", "fold", "dimension"], observed=True)["prediction"].nunique()
    rows = []
    for metrics in fold_metrics:
        system, fold = str(metrics["system"]), int(metrics["fold"])
        epochs = best_epochs(metrics) if metrics.get("kind") != "egemaps" else {}
        first = sorted(name for name, epoch in epochs.items() if epoch <= 1)
        per_dimension = classes.get(system, pd.Series(dtype=int))
        single = sorted(
            str(dimension) for (f, dimension), n in per_dimension.items() if int(f) == fold and n == 1
        )
        rows.append(
            {
                "system": system,
                "fold": fold,
                "best_epochs": epochs,
                "first_epoch_best": first,
                "single_class_dimensions": single,
                "healthy": not first and not single,
            }
        )
    return pd.DataFrame(
        rows,
        columns=["system", "fold", "best_epochs", "first_epoch_best", "single_class_dimensions", "healthy"],
    )


def to_markdown(health: pd.DataFrame) -> str:
    """The unhealthy folds, or one line saying there are none."""
    bad = health[~health["healthy"]]
    if bad.empty:
        return (
            f"Training health: all {len(health)} (system, fold) runs learned "
            "(no first-epoch best, no single class).\n"
        )
    lines = [
        f"Training health: {len(bad)} of {len(health)} (system, fold) runs need a look",
        "",
        "| system | fold | best at epoch 1 | one class predicted for |",
        "|---|---|---|---|",
    ]
    for row in bad.itertuples():
        lines.append(
            f"| {row.system} | {row.fold} | {', '.join(row.first_epoch_best) or '-'} | "
            f"{', '.join(row.single_class_dimensions) or '-'} |"
        )
    return "\n".join(lines) + "\n"
