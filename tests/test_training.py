"""train_fold on a miniature corpus: outputs and their contract, no leakage, determinism, a real
kill -9 followed by resumption (identical predictions), the CLI, and the predictor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.data.ingest import ingest
from sermtl.data.synth import synthesize
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, validate_predictions
from sermtl.params import params_from_dict
from sermtl.schema import (
    ATTENTION_FILE,
    CHECKPOINT_FILE,
    HISTORY_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
)
from sermtl.train.training import TrainingError, load_predictor, train_fold

DIMS = ["arousal", "valence", "dominance"]
# A tiny network and short segments (0.8 s utterances span several 10-frame segments).
TINY_PARAMS = {
    "profile": "paper",
    "features": {"frame_ms": 20, "hop_ms": 20, "max_frames": 10},
    "model": {"conv_channels": 4, "conv_kernel": 8, "conv_pool": 4, "rnn_hidden": 8, "rnn_layers": 1},
    "train": {
        "learning_rate": 0.01,
        "batch_size": 16,
        "max_epochs": 3,
        "early_stopping_patience": 3,
        "device": "cpu",
        "seeds": [0],
    },
}


def tiny_params(**train):
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["train"].update(train)
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_corpus")
    synthesize(root / "IEMOCAP_full_release", utterances=60, mean_duration_s=0.8)
    out = root / "store"
    ingest(str(root / "IEMOCAP_full_release"), out, params_from_dict({}), progress=False)
    return out


@pytest.fixture(scope="module")
def mtl_run(store, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "mtl_attention"
    metrics = train_fold(store, "mtl_attention", 1, out, tiny_params(), progress=False)
    return out, metrics


def test_outputs_and_their_contract(store, mtl_run):
    out, metrics = mtl_run
    manifest = pd.read_parquet(store / MANIFEST_FILE)
    for name in (PREDICTIONS_FILE, RUN_METRICS_FILE, HISTORY_FILE, ATTENTION_FILE):
        assert (out / name).is_file(), name
    assert (out / MODEL_DIR / "config.json").is_file() and (out / MODEL_DIR / "seed0_mtl.pt").is_file()
    assert not (out / CHECKPOINT_FILE).exists() and not (out / "seed0" / CHECKPOINT_FILE).exists()

    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    assert list(predictions.columns) == list(PREDICTION_COLUMNS)
    pd.testing.assert_frame_equal(predictions, validate_predictions(predictions, "predictions"))
    test_session = metrics["test_session"]
    test_ids = set(manifest.loc[manifest["session"] == test_session, "utterance_id"])
    assert set(predictions["utterance_id"]) == test_ids
    assert len(predictions) == 3 * len(test_ids)
    assert not predictions.duplicated(["utterance_id", "dimension"]).any()
    assert set(predictions["dimension"]) == set(DIMS)
    assert (predictions["system"] == "mtl_attention").all() and (predictions["fold"] == 1).all()
    assert (predictions["test_session"] == test_session).all()
    np.testing.assert_allclose(
        predictions[["prob_low", "prob_medium", "prob_high"]].sum(axis=1), 1.0, atol=1e-5
    )
    labels = manifest.set_index("utterance_id")
    for _, row in predictions.head(9).iterrows():
        assert row["label"] == labels.loc[row["utterance_id"], f"{row['dimension']}_class"]
        assert row["improvised"] == labels.loc[row["utterance_id"], "improvised"]

    # No speaker leakage: the validation speaker is from a training session, the test session unseen.
    validation_speaker = metrics["validation_speaker"]
    assert manifest.loc[manifest["speaker"] == validation_speaker, "session"].iloc[0] != test_session
    assert metrics["utterances"]["test"] == len(test_ids)
    assert sum(metrics["utterances"].values()) == len(manifest)

    for key in (
        "system",
        "kind",
        "fold",
        "test_session",
        "validation_speaker",
        "evaluation",
        "validation",
        "best_epoch",
        "epochs_run",
        "train_seconds",
        "audio_seconds_per_second",
        "device",
        "params",
    ):
        assert key in metrics, key
    assert set(metrics["validation"]) == set(DIMS)
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3
    assert metrics["device"] == "cpu" and metrics["audio_seconds_per_second"] > 0
    assert set(metrics["evaluation"]["all"]) == set(DIMS)
    assert json.loads((out / RUN_METRICS_FILE).read_text())["fingerprint"] == metrics["fingerprint"]

    history = json.loads((out / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for record in history:
        for key in ("train_loss", "val_loss", "val_uar_mean", "seconds", "audio_seconds_per_second"):
            assert key in record
        assert all(f"val_uar_{d}" in record for d in DIMS)

    with np.load(out / ATTENTION_FILE) as attention:
        keys = [k for k in attention.files if "__" in k]
        assert len(keys) == 4 * 3
        assert float(attention["frame_hop_s"]) == pytest.approx(0.02)
        for key in keys:
            assert key.split("__")[0] in test_ids and key.split("__")[1] in DIMS
            assert attention[key].sum() == pytest.approx(1.0, abs=1e-5)


def test_finished_run_is_skipped_and_no_resume_retrains(store, mtl_run, tmp_path):
    out, metrics = mtl_run
    stamp = (out / PREDICTIONS_FILE).stat().st_mtime_ns
    again = train_fold(store, "mtl_attention", 1, out, tiny_params(), progress=False)
    assert again == json.loads((out / RUN_METRICS_FILE).read_text())
    assert (out / PREDICTIONS_FILE).stat().st_mtime_ns == stamp
    # Other parameters: a new fingerprint, so the stale result is replaced.
    changed = train_fold(store, "mtl_attention", 1, out, tiny_params(max_epochs=1), progress=False)
    assert changed["fingerprint"] != metrics["fingerprint"] and changed["epochs_run"] == 1
    # Determinism: back to the original parameters, retrained from scratch, the same predictions.
    retrained = train_fold(store, "mtl_attention", 1, out, tiny_params(), resume=False, progress=False)
    assert retrained["evaluation"] == metrics["evaluation"]


def test_determinism_two_runs_same_predictions(store, mtl_run, tmp_path):
    out, _ = mtl_run
    train_fold(store, "mtl_attention", 1, tmp_path / "again", tiny_params(), progress=False)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / PREDICTIONS_FILE), pd.read_parquet(tmp_path / "again" / PREDICTIONS_FILE)
    )


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_norm_is_clipped_at_train_grad_clip_norm(store, tmp_path, monkeypatch, clip):
    norms_seen = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, **kwargs)  # the norm before clipping
        after = torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms_seen.append((float(max_norm), float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    train_fold(
        store,
        "mtl_attention",
        0,
        tmp_path / "run",
        tiny_params(max_epochs=1, grad_clip_norm=clip),
        progress=False,
    )
    if clip == 0.0:
        assert norms_seen == []  # 0 switches clipping off
    else:
        assert norms_seen and all(limit == clip for limit, _, _ in norms_seen)
        assert all(after <= clip * 1.001 for _, _, after in norms_seen)
        assert any(total > clip for _, total, _ in norms_seen), "the test should see a norm to clip"


def test_cpu_threads_fix_the_result_whatever_the_callers_thread_count(store, tmp_path):
    """train.cpu_threads, not the process's thread setting, decides how many threads train (and so the
    float sums): a DAG task started with OMP_NUM_THREADS=1 and a hand run on all cores agree."""
    before = torch.get_num_threads()
    try:
        outputs = []
        for caller_threads in (1, 2):
            torch.set_num_threads(caller_threads)
            out = tmp_path / f"caller{caller_threads}"
            train_fold(
                store, "mtl_attention", 0, out, tiny_params(max_epochs=1, cpu_threads=1), progress=False
            )
            assert torch.get_num_threads() == caller_threads  # restored afterwards
            outputs.append(pd.read_parquet(out / PREDICTIONS_FILE))
    finally:
        torch.set_num_threads(before)
    pd.testing.assert_frame_equal(outputs[0], outputs[1])


def test_single_task_mean_system(store, tmp_path):
    out = tmp_path / "stl_mean"
    metrics = train_fold(store, "stl_mean", 0, out, tiny_params(max_epochs=2), progress=False)
    config = json.loads((out / MODEL_DIR / "config.json").read_text())
    assert sorted(config["networks"]) == sorted(f"seed0_{dim}" for dim in DIMS)
    for dim in DIMS:
        assert (out / MODEL_DIR / f"seed0_{dim}.pt").is_file()
        assert config["networks"][f"seed0_{dim}"]["config"]["tasks"] == [dim]
    assert not (out / ATTENTION_FILE).exists()
    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    assert len(predictions) == 3 * metrics["utterances"]["test"]
    history = json.loads((out / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for dim in DIMS:
        assert {f"{dim}_train_loss", f"{dim}_val_loss", f"val_uar_{dim}", f"{dim}_seconds"} <= set(history[1])
    assert "train_loss" not in history[0]
    assert metrics["epochs_run"] == {d: 2 for d in DIMS}


def test_predictor_matches_predictions(store, mtl_run):
    out, _ = mtl_run
    from sermtl.data.audio import AudioStore

    predictor = load_predictor(out / MODEL_DIR)
    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    audio = AudioStore(store)
    for utterance_id in predictions["utterance_id"].unique()[:3]:
        result = predictor.predict(audio.waveform(utterance_id))
        assert list(result) == DIMS
        for dim in DIMS:
            row = predictions[
                (predictions["utterance_id"] == utterance_id) & (predictions["dimension"] == dim)
            ]
            assert result[dim]["class"] == int(row["prediction"].iloc[0])
            np.testing.assert_allclose(
                result[dim]["probabilities"],
                row[["prob_low", "prob_medium", "prob_high"]].to_numpy()[0],
                rtol=1e-4,
                atol=1e-5,
            )
            assert result[dim]["attention"].sum() == pytest.approx(1.0, abs=1e-5)
    with np.load(out / ATTENTION_FILE) as stored:
        key = next(k for k in stored.files if "__" in k)
        uid, dim = key.split("__")
        np.testing.assert_allclose(
            predictor.predict(audio.waveform(uid))[dim]["attention"], stored[key], rtol=1e-4, atol=1e-6
        )


def test_kill_and_resume_gives_identical_predictions(store, mtl_run, tmp_path):
    """SIGKILL a real training process after its first checkpoint; the resumed run (through the CLI)
    ends with exactly the predictions of the uninterrupted run."""
    reference, _ = mtl_run
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(TINY_PARAMS))
    out = tmp_path / "killed"
    # Each checkpoint write is followed by a pause, so the kill lands between epochs 1 and 3.
    script = textwrap.dedent(
        f"""
        import time
        import sermtl.train.seed_run as seed_run
        import sermtl.train.training as training
        from sermtl.params import load_params
        save = seed_run._atomic_torch_save
        def slow_save(payload, path):
            save(payload, path)
            time.sleep(30)
        seed_run._atomic_torch_save = slow_save
        training.train_fold({str(store)!r}, "mtl_attention", 1, {str(out)!r},
                            load_params({str(params_file)!r}), progress=False)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        checkpoint = None
        while time.monotonic() < deadline:
            path = out / "seed0" / CHECKPOINT_FILE  # the checkpoint of the seed being trained
            if path.is_file():
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)
                if checkpoint["epoch"] >= 1:
                    break
            assert process.poll() is None, "training process ended before it could be killed"
            time.sleep(0.2)
        assert checkpoint is not None and checkpoint["epoch"] >= 1
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / RUN_METRICS_FILE).exists() and checkpoint["epoch"] < 3

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sermtl.cli",
            "train",
            "--system",
            "mtl_attention",
            "--fold",
            "1",
            "--store",
            str(store),
            "--out",
            str(out),
            "--params",
            str(params_file),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "test UAR" in result.stdout and "arousal=" in result.stdout
    history = json.loads((out / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / PREDICTIONS_FILE), pd.read_parquet(out / PREDICTIONS_FILE)
    )


def test_cli_errors_name_the_valid_choices(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(TINY_PARAMS))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--system", "nope", "--fold", "0", "--params", str(params_file)])
    assert result.exit_code == 2
    assert "unknown system 'nope'" in result.output and "mtl_attention" in result.output
    result = runner.invoke(
        app, ["train", "--system", "mtl_mean", "--fold", "5", "--params", str(params_file)]
    )
    assert result.exit_code == 2 and "0..4" in result.output
    result = runner.invoke(
        app,
        ["train", "--system", "mtl_mean", "--fold", "0", "--store", str(tmp_path / "none"), "--params",
         str(params_file)],
    )  # fmt: skip
    assert result.exit_code == 2 and "ingest" in result.output
    with pytest.raises(TrainingError, match="valid"):
        train_fold(tmp_path, "bogus", 0, tmp_path / "out", tiny_params())


def test_egemaps_systems_are_dispatched(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("sermtl.model.egemaps")
    fake.train_fold = lambda *args: calls.append(args) or {"system": args[1]}
    monkeypatch.setitem(sys.modules, "sermtl.model.egemaps", fake)
    import sermtl.model

    monkeypatch.setattr(sermtl.model, "egemaps", fake, raising=False)
    params = tiny_params()
    store = tmp_path / "store"  # beside the run folder: an output may not lie inside an input
    assert train_fold(store, "egemaps_linear", 2, tmp_path / "out", params) == {"system": "egemaps_linear"}
    assert calls == [(store, "egemaps_linear", 2, tmp_path / "out", params)]


# --- seeds: every neural (system, fold) trains once per seed of train.seeds -------------------------------

SEEDS = [0, 1]


def seeded_params(**train):
    """Two sessions (two folds), the proposed system and the eGeMAPS baseline, two seeds, two epochs."""
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["data"] = {"sessions": [1, 2]}
    raw["systems"] = {
        "mtl_attention": {"kind": "neural", "multitask": True, "pooling": "attention"},
        "egemaps_linear": {"kind": "egemaps"},
    }
    raw["train"].update({"max_epochs": 2, "early_stopping_patience": 2, "seeds": SEEDS, **train})
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def seeded_study(store, tmp_path_factory) -> Path:
    train_dir = tmp_path_factory.mktemp("seeded") / "train"
    params = seeded_params()
    for system in params.systems:
        for fold in range(len(params.data.sessions)):
            train_fold(store, system, fold, train_dir / system / f"fold{fold}", params, progress=False)
    return train_dir


PROBABILITIES = ["prob_low", "prob_medium", "prob_high"]


def test_each_seed_is_a_sub_run_and_the_fold_predicts_with_their_mean(seeded_study):
    for fold in (0, 1):
        out = seeded_study / "mtl_attention" / f"fold{fold}"
        metrics = json.loads((out / RUN_METRICS_FILE).read_text())
        assert metrics["seeds"] == SEEDS and sorted(metrics["seed_runs"]) == ["0", "1"]
        assert sorted(p.name for p in out.glob("seed*")) == ["seed0", "seed1"]
        tables = []
        for seed in SEEDS:
            run = out / f"seed{seed}"
            seed_metrics = json.loads((run / RUN_METRICS_FILE).read_text())
            assert seed_metrics["seed"] == seed and seed_metrics["params"]["train"]["seed"] == seed
            assert metrics["seed_runs"][str(seed)]["evaluation"] == seed_metrics["evaluation"]
            for name in (PREDICTIONS_FILE, HISTORY_FILE, ATTENTION_FILE, f"{MODEL_DIR}/mtl.pt"):
                assert (run / name).is_file(), name
            assert not (run / CHECKPOINT_FILE).exists()
            tables.append(pd.read_parquet(run / PREDICTIONS_FILE))
        # Two initialisations, two networks: their probabilities differ.
        assert not np.allclose(tables[0][PROBABILITIES], tables[1][PROBABILITIES])
        combined = pd.read_parquet(out / PREDICTIONS_FILE)
        pd.testing.assert_frame_equal(combined, validate_predictions(combined, "fold"))
        for column in ("utterance_id", "dimension", "label", "improvised"):
            assert combined[column].equals(tables[0][column])
        mean = np.mean([t[PROBABILITIES].to_numpy() for t in tables], axis=0)
        np.testing.assert_array_equal(combined[PROBABILITIES].to_numpy(), mean)
        np.testing.assert_array_equal(combined["prediction"].to_numpy(), mean.argmax(axis=1))

        config = json.loads((out / MODEL_DIR / "config.json").read_text())
        assert config["seeds"] == SEEDS and sorted(config["networks"]) == ["seed0_mtl", "seed1_mtl"]
        with np.load(out / ATTENTION_FILE) as fold_attention:
            key = next(k for k in fold_attention.files if "__" in k)
            per_seed = [np.load(out / f"seed{s}" / ATTENTION_FILE)[key] for s in SEEDS]
            np.testing.assert_allclose(fold_attention[key], np.mean(per_seed, axis=0), rtol=1e-6)
        history = json.loads((out / HISTORY_FILE).read_text())
        assert [h["epoch"] for h in history] == [1, 2]
        assert {"seed0_train_loss", "seed1_train_loss", "seed0_val_uar_arousal"} <= set(history[0])
        assert set(metrics["best_epoch"]) == {"seed0", "seed1"}


def test_egemaps_is_one_run_whatever_the_seeds(seeded_study):
    out = seeded_study / "egemaps_linear" / "fold0"
    assert not list(out.glob("seed*"))
    assert "seeds" not in json.loads((out / RUN_METRICS_FILE).read_text())


def test_results_report_the_spread_over_seeds(seeded_study, tmp_path):
    from sermtl.evaluate.metrics import evaluate_predictions
    from sermtl.evaluate.results import RESULTS_JSON, RESULTS_MARKDOWN, collect_results

    params = seeded_params()
    table = collect_results(seeded_study, tmp_path / "results", params)
    for _, row in table[table["system"] == "mtl_attention"].iterrows():
        own = [
            evaluate_predictions(
                pd.concat(
                    pd.read_parquet(
                        seeded_study / "mtl_attention" / f"fold{k}" / f"seed{s}" / PREDICTIONS_FILE
                    )
                    for k in (0, 1)
                )
            )[row["subset"]][row["dimension"]]["uar"]
            for s in SEEDS
        ]
        assert row["seeds"] == 2 and row["seed_uars"] == pytest.approx(own)
        assert row["seed_uar_mean"] == pytest.approx(np.mean(own))
        assert row["seed_uar_std"] == pytest.approx(np.std(own, ddof=1))
    baseline = table[table["system"] == "egemaps_linear"]
    assert (baseline["seeds"] == 1).all() and (baseline["seed_uar_std"] == 0.0).all()
    assert (baseline["seed_uar_mean"] == baseline["pooled_uar"]).all()
    records = json.loads((tmp_path / "results" / RESULTS_JSON).read_text())
    assert {"seeds", "seed_uars", "seed_uar_mean", "seed_uar_std"} <= set(records[0])
    markdown = (tmp_path / "results" / RESULTS_MARKDOWN).read_text()
    assert (
        "Spread over training seeds (all utterances)" in markdown
        and "| **mtl_attention** * | 2 |" in markdown
    )


def test_the_ensemble_holds_every_fold_and_seed_network(seeded_study, store):
    from sermtl.data.audio import AudioStore
    from sermtl.mlops import serving

    params = seeded_params()
    members, config = serving.ensemble_members(seeded_study, "mtl_attention", 2, params)
    assert config["seeds"] == SEEDS and config["networks"] == 2 * len(SEEDS)
    ensemble = serving.SerEnsemblePyfunc()
    ensemble.configure([load_predictor(path) for path in members.values()], config)
    assert sum(len(member.networks) for member in ensemble.predictors) == 2 * len(SEEDS)
    waveform = AudioStore(store).waveform(pd.read_parquet(store / MANIFEST_FILE)["utterance_id"].iloc[0])
    row = ensemble.predict(None, waveform).iloc[0]
    networks = [
        load_predictor(seeded_study / "mtl_attention" / f"fold{k}" / f"seed{s}" / MODEL_DIR).predict(waveform)
        for k in (0, 1)
        for s in SEEDS
    ]
    for dim in DIMS:
        mean = np.mean([n[dim]["probabilities"] for n in networks], axis=0)
        assert [row[f"{dim}_{c}"] for c in PROBABILITIES] == pytest.approx(list(mean), abs=1e-6)
        assert row[f"{dim}_class"] == int(np.argmax(mean))


def test_two_seeded_runs_of_a_fold_are_identical(store, seeded_study, tmp_path):
    train_fold(store, "mtl_attention", 1, tmp_path / "again", seeded_params(), progress=False)
    reference = seeded_study / "mtl_attention" / "fold1"
    for run in ("", "seed0", "seed1"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(reference / run / PREDICTIONS_FILE),
            pd.read_parquet(tmp_path / "again" / run / PREDICTIONS_FILE),
        )


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (the real kill is tested above, for one seed)."""


def test_a_killed_seed_resumes_and_the_finished_seed_is_kept(store, seeded_study, monkeypatch, tmp_path):
    import sermtl.train.seed_run as seed_run
    import sermtl.train.trainer as trainer

    out = tmp_path / "fold0"
    save = seed_run._atomic_torch_save

    def dies_in_seed1(payload, path):
        save(payload, path)
        if path.parent.name == "seed1" and payload.get("epoch", 0) >= 1:
            raise _Killed

    monkeypatch.setattr(seed_run, "_atomic_torch_save", dies_in_seed1)
    with pytest.raises(_Killed):
        train_fold(store, "mtl_attention", 0, out, seeded_params(), progress=False)
    assert (out / "seed0" / RUN_METRICS_FILE).is_file() and (out / "seed1" / CHECKPOINT_FILE).is_file()
    assert not (out / "seed1" / RUN_METRICS_FILE).exists() and not (out / RUN_METRICS_FILE).exists()
    finished = (out / "seed0" / PREDICTIONS_FILE).stat().st_mtime_ns

    monkeypatch.setattr(seed_run, "_atomic_torch_save", save)
    epochs = []
    train_epoch = trainer.NetworkTrainer._train_epoch
    monkeypatch.setattr(
        trainer.NetworkTrainer,
        "_train_epoch",
        lambda self, bar: epochs.append(self.seed) or train_epoch(self, bar),
    )
    train_fold(store, "mtl_attention", 0, out, seeded_params(), progress=False)
    assert epochs == [1]  # seed 0 kept, seed 1 continued from its checkpoint after epoch 1
    assert (out / "seed0" / PREDICTIONS_FILE).stat().st_mtime_ns == finished
    reference = seeded_study / "mtl_attention" / "fold0"
    for run in ("", "seed0", "seed1"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(reference / run / PREDICTIONS_FILE), pd.read_parquet(out / run / PREDICTIONS_FILE)
        )
    assert not (out / "seed1" / CHECKPOINT_FILE).exists()


def test_changing_the_seeds_trains_only_new_seeds_and_drops_old_ones(store, tmp_path):
    out = tmp_path / "fold1"
    one = train_fold(store, "mtl_attention", 1, out, seeded_params(seeds=[0]), progress=False)
    assert one["seeds"] == [0] and sorted(p.name for p in out.glob("seed*")) == ["seed0"]
    stamp = (out / "seed0" / PREDICTIONS_FILE).stat().st_mtime_ns
    # The fold's fingerprint includes the seeds: [0, 1] is a new result, but seed 0's sub-run is kept.
    two = train_fold(store, "mtl_attention", 1, out, seeded_params(seeds=[0, 1]), progress=False)
    assert two["fingerprint"] != one["fingerprint"] and two["seeds"] == [0, 1]
    assert (out / "seed0" / PREDICTIONS_FILE).stat().st_mtime_ns == stamp
    # Seed 0 no longer wanted: its sub-run is removed, seed 1's kept, and the fold is seed 1 alone.
    only = train_fold(store, "mtl_attention", 1, out, seeded_params(seeds=[1]), progress=False)
    assert sorted(p.name for p in out.glob("seed*")) == ["seed1"] and only["seeds"] == [1]
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / PREDICTIONS_FILE), pd.read_parquet(out / "seed1" / PREDICTIONS_FILE)
    )
    # Training it again skips it: the finished fold with the same fingerprint is returned.
    assert train_fold(store, "mtl_attention", 1, out, seeded_params(seeds=[1]), progress=False) == only


def test_a_fold_restored_without_markers_is_rebuilt_from_its_seed_runs(
    store, seeded_study, monkeypatch, tmp_path
):
    """As DVC restores a stage output (.dvcignore leaves the output markers out): the seed sub-runs are
    recognised as train's, reused, and the fold's outputs rebuilt from their files, identical."""
    import shutil

    import sermtl.train.trainer as trainer
    from sermtl.fsutil import OUTPUT_MARKER

    reference = seeded_study / "mtl_attention" / "fold0"
    out = tmp_path / "fold0"
    shutil.copytree(reference, out)
    for marker in out.rglob(OUTPUT_MARKER):
        marker.unlink()
    assert train_fold(store, "mtl_attention", 0, out, seeded_params(), progress=False) == json.loads(
        (reference / RUN_METRICS_FILE).read_text()
    )
    # A fold result that is stale (here: of other parameters) is rebuilt, its seeds' sub-runs reused.
    (out / RUN_METRICS_FILE).write_text(json.dumps({"system": "mtl_attention", "fingerprint": "stale"}))
    (out / PREDICTIONS_FILE).unlink()

    def no_training(self, save):
        raise AssertionError("a finished seed was retrained")

    monkeypatch.setattr(trainer.NetworkTrainer, "run", no_training)
    metrics = train_fold(store, "mtl_attention", 0, out, seeded_params(), progress=False)
    assert metrics == json.loads((reference / RUN_METRICS_FILE).read_text())
    pd.testing.assert_frame_equal(
        pd.read_parquet(reference / PREDICTIONS_FILE), pd.read_parquet(out / PREDICTIONS_FILE)
    )
