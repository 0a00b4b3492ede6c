"""The eGeMAPS + linear baseline: cached extraction from the audio store, and fold outputs that honour the
prediction contract and the speaker-independent folds of the neural systems."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from sermtl.data.audio import AudioStore, audio_checksum
from sermtl.data.folds import leave_one_session_out
from sermtl.data.ingest import ingest
from sermtl.data.synth import synthesize
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, evaluate_predictions
from sermtl.model import egemaps
from sermtl.params import Params, SystemParams
from sermtl.schema import (
    AUDIO_FILE,
    DIMENSIONS,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    STORE_META_FILE,
)

PARAMS = Params()


def _store(root: Path, utterances: int, mean_duration_s: float) -> Path:
    synthesize(root / "IEMOCAP_full_release", utterances=utterances, mean_duration_s=mean_duration_s)
    ingest(str(root / "IEMOCAP_full_release"), root / "store", PARAMS, progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("egemaps_tiny"), 60, 0.8)


@pytest.fixture(scope="module")
def tiny_features(tiny_store) -> pd.DataFrame:
    return egemaps.extract_features(tiny_store)


@pytest.fixture(scope="module")
def fold0(tiny_store, tiny_features, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("egemaps_run") / "egemaps_linear" / "fold0"
    return out, egemaps.train_fold(tiny_store, "egemaps_linear", 0, out, PARAMS)


def _no_opensmile(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("openSMILE was called although the features are cached")

    monkeypatch.setattr(egemaps, "_make_smile", refuse)


def test_features_are_88_functionals_per_utterance_in_manifest_order(tiny_store, tiny_features):
    manifest = AudioStore(tiny_store).manifest
    assert tiny_features.shape == (len(manifest), egemaps.NUM_FEATURES) == (60, 88)
    assert list(tiny_features.index) == list(manifest["utterance_id"])
    assert tiny_features.index.name == "utterance_id"
    assert "F0semitoneFrom27.5Hz_sma3nz_amean" in tiny_features.columns
    assert np.isfinite(tiny_features.to_numpy()).all()  # 0.3 s and longer is enough for every feature
    # The default cache sits beside the store: <store>/../features/egemaps/, with a sidecar.
    (cached,) = (tiny_store.parent / "features" / "egemaps").glob("egemaps_*.parquet")
    sidecar = json.loads(cached.with_suffix(".json").read_text())
    assert sidecar["utterances"] == 60 and sidecar["nonfinite_values"] == 0
    assert sidecar["key"] == egemaps.feature_cache_key(tiny_store)


def test_second_call_reads_the_cache_without_opensmile(tiny_store, tiny_features, monkeypatch):
    _no_opensmile(monkeypatch)
    again = egemaps.extract_features(tiny_store)
    pd.testing.assert_frame_equal(again, tiny_features)


def test_cache_is_invalidated_when_the_store_changes(tiny_store, tiny_features, tmp_path, monkeypatch):
    changed = tmp_path / "store"
    shutil.copytree(tiny_store, changed)
    cache = tmp_path / "cache"
    key = egemaps.feature_cache_key(changed)
    assert key == egemaps.feature_cache_key(tiny_store)  # content, not location

    audio = np.fromfile(changed / AUDIO_FILE, dtype=np.int16)
    audio[1000] ^= 1  # one sample, one bit, as a re-ingestion would write it (checksum updated)
    audio.tofile(changed / AUDIO_FILE)
    meta = json.loads((changed / STORE_META_FILE).read_text())
    meta["sha256"] = audio_checksum(changed / AUDIO_FILE)
    (changed / STORE_META_FILE).write_text(json.dumps(meta))
    assert egemaps.feature_cache_key(changed) != key

    calls = []
    real = egemaps._extract_all

    def counting(store, workers, progress):
        calls.append(len(store))
        return real(store, workers, progress)

    monkeypatch.setattr(egemaps, "_extract_all", counting)
    features = egemaps.extract_features(changed, cache)
    assert calls == [60]
    assert features.shape == (60, 88)
    egemaps.extract_features(changed, cache)
    assert calls == [60]  # cached now
    # A different manifest (e.g. another corpus) is another key as well.
    manifest = pd.read_parquet(changed / "manifest.parquet")
    manifest.loc[0, "sha256"] = "0" * 64
    manifest.to_parquet(changed / "manifest.parquet")
    assert egemaps.feature_cache_key(changed) not in (key, egemaps.feature_cache_key(tiny_store))


def test_too_short_audio_gives_nan_features_and_no_warning():
    class ShortStore:
        sample_rate = 16000

        def pcm(self, index):
            return np.zeros(100, dtype=np.int16)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, names = egemaps._extract_rows(ShortStore(), egemaps._make_smile(), [0])
    assert rows.shape == (1, 88) and len(names) == 88
    assert np.isnan(rows).all()


def test_pipeline_imputes_nan_and_inf_with_training_means():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 5))
    y = np.repeat([0, 1, 2], 30)
    X[:, 0] += y  # learnable
    X[3, 1], X[4, 2], X[:, 4] = np.nan, np.inf, np.nan  # a missing value, an inf, an all-missing column
    pipeline = egemaps.make_pipeline(1.0).fit(X, y)
    test = np.array([[np.nan, -np.inf, np.nan, 0.0, np.nan], [2.0, 0.0, 0.0, 0.0, 0.0]])
    proba = pipeline.predict_proba(test)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1.0)
    imputer = pipeline.named_steps["impute"]
    assert imputer.statistics_[2] == pytest.approx(np.mean(np.delete(X[:, 2], 4)))
    assert pipeline.predict(test)[1] == 2


def test_fold_predictions_follow_the_contract_and_the_fold(tiny_store, fold0):
    out, metrics = fold0
    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    assert list(predictions.columns) == list(PREDICTION_COLUMNS)
    pd.testing.assert_frame_equal(predictions, predictions.astype(PREDICTION_COLUMNS))
    manifest = AudioStore(tiny_store).manifest
    fold = leave_one_session_out(manifest, PARAMS.data.sessions)[0]
    counts = predictions.groupby(["utterance_id", "dimension"]).size()
    assert (counts == 1).all() and len(counts) == len(fold.test_ids) * 3
    assert set(predictions["dimension"]) == set(DIMENSIONS)
    assert set(predictions["utterance_id"]) == set(fold.test_ids)
    assert set(fold.test_ids) == set(manifest.loc[manifest["session"] == fold.test_session, "utterance_id"])
    assert not set(predictions["utterance_id"]) & (set(fold.train_ids) | set(fold.validation_ids))
    assert (predictions["system"] == "egemaps_linear").all() and (predictions["fold"] == 0).all()
    assert (predictions["test_session"] == fold.test_session).all()
    by_id = manifest.set_index("utterance_id")
    for dimension, group in predictions.groupby("dimension"):
        expected = by_id.loc[group["utterance_id"], f"{dimension}_class"].to_numpy()
        assert (group["label"].to_numpy() == expected).all()
        assert (group["improvised"].to_numpy() == by_id.loc[group["utterance_id"], "improvised"]).all()
    proba = predictions[["prob_low", "prob_medium", "prob_high"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert (predictions["prediction"].to_numpy() == proba.argmax(axis=1)).all()

    on_disk = json.loads((out / RUN_METRICS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert metrics["kind"] == "egemaps" and metrics["system"] == "egemaps_linear"
    assert metrics["validation_speaker"] == fold.validation_speaker
    assert (metrics["n_train"], metrics["n_validation"], metrics["n_test"]) == (
        len(fold.train_ids),
        len(fold.validation_ids),
        len(fold.test_ids),
    )
    assert set(metrics["chosen_C"]) == set(metrics["validation"]) == set(DIMENSIONS)
    assert all(c in egemaps.C_GRID for c in metrics["chosen_C"].values())
    assert metrics["evaluation"] == json.loads(json.dumps(evaluate_predictions(predictions)))
    assert Path(metrics["feature_cache"]).parent == tiny_store.parent / "features" / "egemaps"


def test_saved_model_reproduces_the_predictions(tiny_store, tiny_features, fold0):
    out, _ = fold0
    model = joblib.load(out / MODEL_DIR / egemaps.MODEL_FILE)
    assert model["feature_names"] == list(tiny_features.columns)
    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    for dimension, group in predictions.groupby("dimension"):
        X = tiny_features.loc[group["utterance_id"]].to_numpy()
        assert np.allclose(
            model["pipelines"][dimension].predict_proba(X), group[["prob_low", "prob_medium", "prob_high"]]
        )


def test_predictor_from_the_model_dir_matches_the_predictions(tiny_store, fold0):
    """What the logged pyfunc loads (training.load_predictor dispatches on the model file)."""
    from sermtl.train.training import load_predictor

    out, _ = fold0
    predictor = load_predictor(out / MODEL_DIR)
    assert isinstance(predictor, egemaps.EgemapsPredictor) and predictor.sample_rate == 16000
    store = AudioStore(tiny_store)
    predictions = pd.read_parquet(out / PREDICTIONS_FILE)
    for uid in predictions["utterance_id"].unique()[:3]:
        result = predictor.predict(store.waveform(uid))
        for row in predictions[predictions["utterance_id"] == uid].itertuples():
            expected = [row.prob_low, row.prob_medium, row.prob_high]
            assert np.allclose(result[row.dimension]["probabilities"], expected, atol=1e-6)
            assert result[row.dimension]["class"] == row.prediction


def test_training_is_deterministic(tiny_store, fold0, tmp_path, monkeypatch):
    out, metrics = fold0
    _no_opensmile(monkeypatch)
    again = egemaps.train_fold(tiny_store, "egemaps_linear", 0, tmp_path / "fold0", PARAMS)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / PREDICTIONS_FILE), pd.read_parquet(tmp_path / "fold0" / PREDICTIONS_FILE)
    )
    timing = {"train_seconds", "feature_seconds"}
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in metrics.items() if k not in timing
    }


def test_only_egemaps_systems_and_existing_folds(tiny_store, tmp_path):
    with pytest.raises(ValueError, match="not 'egemaps'"):
        egemaps.train_fold(tiny_store, "mtl_attention", 0, tmp_path / "x", PARAMS)
    with pytest.raises(ValueError, match="unknown system"):
        egemaps.train_fold(tiny_store, "nope", 0, tmp_path / "x", PARAMS)
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        egemaps.train_fold(tiny_store, "egemaps_linear", 5, tmp_path / "x", PARAMS)
    assert not (tmp_path / "x").exists()
    renamed = Params(systems={"hand_crafted": SystemParams("egemaps")})
    assert egemaps.train_fold(tiny_store, "hand_crafted", 1, tmp_path / "y", renamed)["fold"] == 1


def test_arousal_is_learnable_pooled_over_five_folds(tmp_path_factory):
    """The synthetic audio carries arousal in energy, pitch range and rate: eGeMAPS must pick it up."""
    root = tmp_path_factory.mktemp("egemaps_200")
    store = _store(root, 200, 1.0)
    frames = []
    for k in range(5):
        egemaps.train_fold(store, "egemaps_linear", k, root / f"fold{k}", PARAMS)
        frames.append(pd.read_parquet(root / f"fold{k}" / PREDICTIONS_FILE))
    pooled = pd.concat(frames, ignore_index=True)
    assert pooled.groupby("dimension").size().to_dict() == {d: 200 for d in DIMENSIONS}
    scores = evaluate_predictions(pooled)["all"]
    assert scores["arousal"]["uar"] > 0.45  # chance is 1/3; measured 0.54


def test_worker_processes_give_the_same_features(tiny_store, tiny_features, tmp_path):
    """The multi-process path (used from 1000 utterances on) matches the in-process one exactly."""
    parallel = egemaps.extract_features(tiny_store, tmp_path / "cache", workers=2)
    pd.testing.assert_frame_equal(parallel, tiny_features)
    sidecar = json.loads(next((tmp_path / "cache").glob("*.json")).read_text())
    assert sidecar["workers"] == 2


def test_classifier_is_class_balanced_iff_the_switch_is_on():
    """train.class_balanced_loss is one switch for every system: here class_weight="balanced"."""
    assert egemaps.make_pipeline(1.0, class_balanced=True).named_steps["classify"].class_weight == "balanced"
    assert egemaps.make_pipeline(1.0, class_balanced=False).named_steps["classify"].class_weight is None
    X = np.random.default_rng(0).normal(size=(40, 3))
    y = np.array([0] * 30 + [1] * 6 + [2] * 4)  # imbalanced: weighting moves the fitted model
    fitted = {
        balanced: egemaps.make_pipeline(1.0, class_balanced=balanced).fit(X, y).predict_proba(X).mean(axis=0)
        for balanced in (True, False)
    }
    assert fitted[True][0] < fitted[False][0]  # less mass on the majority class when balanced


def test_train_fold_follows_the_switch_and_refits_when_it_changes(tiny_store, tiny_features, tmp_path):
    from sermtl.train.training import train_fold

    out = tmp_path / "egemaps_linear" / "fold0"
    for balanced, expected in ((True, "balanced"), (False, None), (True, "balanced")):
        params = dataclasses.replace(
            PARAMS, train=dataclasses.replace(PARAMS.train, class_balanced_loss=balanced)
        )
        # the CLI's and the pipeline's entry point, resume=True: a finished run is not skipped
        metrics = train_fold(tiny_store, "egemaps_linear", 0, out, params, progress=False)
        model = joblib.load(out / MODEL_DIR / egemaps.MODEL_FILE)
        weights = {d: p.named_steps["classify"].class_weight for d, p in model["pipelines"].items()}
        assert weights == dict.fromkeys(PARAMS.eval.dimensions, expected)
        assert metrics["class_weight"] == model["class_weight"] == (expected or "none")
