"""The results table pools the study's runs and refuses an incomplete study."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from study_builder import write_study

from sermtl.evaluate.metrics import uar
from sermtl.evaluate.results import (
    POOLED_PREDICTIONS,
    RESULTS_HTML,
    RESULTS_JSON,
    RESULTS_MARKDOWN,
    collect_results,
)
from sermtl.params import Params

ACCURACY = {
    "mtl_attention": 0.9,
    "mtl_mean": 0.6,
    "stl_attention": 0.5,
    "stl_mean": 0.4,
    "egemaps_linear": 0.3,
}


def test_collect_results_pools_folds(tmp_path):
    params = Params()
    write_study(tmp_path / "train", params, ACCURACY)
    table = collect_results(tmp_path / "train", tmp_path / "results", params)
    pooled = pd.read_parquet(tmp_path / "results" / POOLED_PREDICTIONS)
    assert len(pooled) == 5 * 5 * 3 * 40
    row = table[
        (table.system == "mtl_attention") & (table.subset == "all") & (table.dimension == "valence")
    ].iloc[0]
    subset = pooled[(pooled.system == "mtl_attention") & (pooled.dimension == "valence")]
    assert row["pooled_uar"] == pytest.approx(
        uar(subset["label"].to_numpy(), subset["prediction"].to_numpy())
    )
    assert row["folds"] == 5 and row["proposed"]
    best = table[table.subset == "all"].groupby("system")["pooled_uar"].mean().idxmax()
    assert best == "mtl_attention"
    markdown = (tmp_path / "results" / RESULTS_MARKDOWN).read_text()
    assert "**mtl_attention** *" in markdown and "improvised" in markdown
    assert "data:image/png;base64," in (tmp_path / "results" / RESULTS_HTML).read_text()
    assert len(json.loads((tmp_path / "results" / RESULTS_JSON).read_text())) == 5 * 2 * 3


def test_incomplete_study_names_missing_runs(tmp_path):
    params = Params()
    write_study(tmp_path / "train", params, ACCURACY)
    shutil.rmtree(tmp_path / "train" / "stl_mean" / "fold3")
    with pytest.raises(FileNotFoundError, match="no finished run for stl_mean/fold3"):
        collect_results(tmp_path / "train", tmp_path / "results", params)
    assert not (tmp_path / "results").exists()


def test_folds_trained_with_other_seeds_are_refused(tmp_path):
    params = Params()
    write_study(tmp_path / "train", params, ACCURACY)
    for fold in range(5):
        run = tmp_path / "train" / "mtl_attention" / f"fold{fold}"
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["seeds"] = [0, 1] if fold else [0]
        (run / "metrics.json").write_text(json.dumps(metrics))
        for seed in metrics["seeds"]:
            (run / f"seed{seed}").mkdir()
            shutil.copy(run / "predictions.parquet", run / f"seed{seed}" / "predictions.parquet")
    with pytest.raises(
        ValueError, match=r"mtl_attention/fold1: trained with seeds \[0, 1\], fold 0 with seeds \[0\]"
    ):
        collect_results(tmp_path / "train", tmp_path / "results", params)
    assert not (tmp_path / "results").exists()
