"""`train.class_balanced_loss` is one switch for every system: the neural cross-entropy gets inverse-frequency
class weights iff it is on (this file), the eGeMAPS logistic regressions class_weight="balanced" iff it is
on (tests/test_egemaps.py). UAR is the metric, so it is on in the paper profile and the demo alike."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from sermtl.data.folds import leave_one_session_out
from sermtl.data.ingest import ingest
from sermtl.data.synth import synthesize
from sermtl.params import load_params, params_from_dict, params_from_yaml
from sermtl.schema import MANIFEST_FILE
from sermtl.train import trainer, training

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "profile": "paper",
    "features": {"frame_ms": 20, "hop_ms": 20, "max_frames": 10},
    "model": {"conv_channels": 4, "conv_kernel": 8, "conv_pool": 4, "rnn_hidden": 8, "rnn_layers": 1},
    "train": {"batch_size": 16, "max_epochs": 1, "device": "cpu"},
}


class _FirstStep(Exception):
    """Raised by the stand-in loss: the class weights of the first training step are all this test needs."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("class_weighting")
    synthesize(root / "IEMOCAP_full_release", utterances=60, mean_duration_s=0.8)
    ingest(str(root / "IEMOCAP_full_release"), root / "store", params_from_dict({}), progress=False)
    return root / "store"


def _first_step_class_weights(store: Path, out: Path, system: str, monkeypatch, **train) -> list:
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train)
    seen = []

    def first_step(logits, labels, tasks, loss_weights, class_weights=None):
        seen.append((list(tasks), class_weights))
        raise _FirstStep

    monkeypatch.setattr(trainer, "multitask_loss", first_step)
    with pytest.raises(_FirstStep):
        training.train_fold(store, system, 0, out, params_from_dict(raw), progress=False)
    return seen


@pytest.mark.parametrize("system", ["mtl_attention", "stl_mean"])
def test_neural_loss_is_class_weighted_iff_the_switch_is_on(store, tmp_path, monkeypatch, system):
    ((tasks, weights),) = _first_step_class_weights(
        store, tmp_path / "on", system, monkeypatch, class_balanced_loss=True
    )
    assert tasks == (["arousal", "valence", "dominance"] if system == "mtl_attention" else ["arousal"])
    assert set(weights) == set(tasks)
    # inverse class frequency in the fold's training split, N / (3 * count): what sklearn calls "balanced"
    manifest = pd.read_parquet(store / MANIFEST_FILE).set_index("utterance_id")
    fold = leave_one_session_out(manifest.reset_index(), [1, 2, 3, 4, 5])[0]
    labels = manifest.loc[fold.train_ids, [f"{task}_class" for task in tasks]].to_numpy()
    for task, expected in training.class_balanced_weights(labels, tasks).items():
        torch.testing.assert_close(weights[task], expected)
    assert any(bool(w.max() > w.min()) for w in weights.values())  # the synthetic classes are imbalanced

    ((_, unweighted),) = _first_step_class_weights(
        store, tmp_path / "off", system, monkeypatch, class_balanced_loss=False
    )
    assert unweighted is None


def test_switch_is_on_in_every_profile_and_by_default():
    text = (ROOT / "params.yaml").read_text()
    assert load_params(ROOT / "params.yaml").train.class_balanced_loss  # demo
    assert params_from_yaml(text.replace("profile: demo", "profile: paper", 1)).train.class_balanced_loss
    assert params_from_dict({}).train.class_balanced_loss
