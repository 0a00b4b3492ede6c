"""A short study on the committed demo settings: every neural fold network learns.

Before the demo settings were fixed, a third of the demo's fold networks kept their first epoch (early
stopping on an almost untrained network) or predicted one class for a dimension on their whole test
session. This trains with params.yaml exactly as committed (demo profile, the generated corpus of data.synth,
fewer utterances to stay short) the multi-task systems on every fold and the single-task systems on
fold 0 (their three networks each; all 25 runs of a study take ~8 min on 2 cores, too long for the
suite), and checks both symptoms. Every study reports them for all its runs (`health.json`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from sermtl.data.ingest import ingest
from sermtl.data.synth import synthesize
from sermtl.evaluate.health import to_markdown, training_health
from sermtl.params import load_params
from sermtl.schema import PREDICTIONS_FILE, RUN_METRICS_FILE
from sermtl.train.training import train_fold

REPO = Path(__file__).resolve().parents[1]
UTTERANCES = 240  # of the committed 400: shorter, and fewer optimiser steps per epoch, so no easier


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~2 min on 2 idle cores, two runs at a time
def test_committed_demo_networks_learn(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    assert params.profile == "demo"
    synth = {**dataclasses.asdict(params.data.synth), "utterances": UTTERANCES}
    synthesize(tmp_path / "IEMOCAP_full_release", **synth)
    store = tmp_path / "store"
    ingest(str(tmp_path / "IEMOCAP_full_release"), store, params, progress=False)

    neural = [name for name, system in params.systems.items() if system.kind == "neural"]
    assert len(neural) == 4
    runs = [
        (system, fold)
        for system in neural
        for fold in (range(len(params.data.sessions)) if params.systems[system].multitask else [0])
    ]
    # Two runs at a time, as the DAG runs them: train.cpu_threads fixes each run's threads, so a run's
    # weights are the same alone or beside another.
    outs = [tmp_path / "train" / system / f"fold{fold}" for system, fold in runs]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [
            pool.submit(train_fold, store, system, fold, out, params, device="cpu", progress=False)
            for (system, fold), out in zip(runs, outs, strict=True)
        ]
        for future in done:
            future.result()
    predictions = [pd.read_parquet(out / PREDICTIONS_FILE) for out in outs]
    metrics = [json.loads((out / RUN_METRICS_FILE).read_text()) for out in outs]
    health = training_health(pd.concat(predictions, ignore_index=True), metrics)
    assert len(health) == 2 * 5 + 2
    assert health["healthy"].all(), to_markdown(health)
