"""Hand-crafted baseline `egemaps_linear`: eGeMAPSv02 functionals with one linear classifier per dimension,
on the same store, folds and prediction contract as the neural systems (docs/design/egemaps.md)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from sermtl.data.audio import AudioStore
from sermtl.data.folds import Fold, leave_one_session_out
from sermtl.evaluate.metrics import PREDICTION_COLUMNS, PROBABILITY_COLUMNS, evaluate_predictions, uar
from sermtl.fsutil import atomic_directory, atomic_write, check_output_dir, write_json
from sermtl.parallel import worker_count
from sermtl.params import Params
from sermtl.schema import (
    AUDIO_FILE,
    CLASS_NAMES,
    DIMENSIONS,
    MANIFEST_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    STORE_META_FILE,
    TRAIN_RUN_OUTPUT,
)

FEATURE_SET = "eGeMAPSv02"
FEATURE_LEVEL = "Functionals"
NUM_FEATURES = 88
# Bump when the extraction code changes in a way that changes feature values (invalidates caches).
EXTRACTOR_REVISION = 1
CACHE_SUBDIR = Path("features") / "egemaps"
MODEL_FILE = "egemaps_linear.joblib"

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_ITER = 5000
# Below this many utterances extraction runs in-process (the 400-utterance demo: ~30 s CPU). Workers cost
# ~1.5 s CPU each to start; on a shared 2-core box (other jobs running) 2 workers were no faster than one,
# on idle cores they divide the ~0.03 s CPU per second of audio (IEMOCAP: ~23 CPU-minutes).
PARALLEL_MIN_UTTERANCES = 1000
MAX_WORKERS = 8
_CHUNK = 64  # utterances per worker task


# ---------------------------------------------------------------------------------------------------------
# Feature extraction


def _opensmile_version() -> str:
    import opensmile

    return str(opensmile.__version__)


def _make_smile() -> Any:
    import opensmile

    return opensmile.Smile(
        feature_set=getattr(opensmile.FeatureSet, FEATURE_SET),
        feature_level=getattr(opensmile.FeatureLevel, FEATURE_LEVEL),
    )


def feature_cache_key(store_dir: Path) -> str:
    """Hex key of everything the features depend on: the store's bytes and the extractor.

    Hashes store.json, the manifest's utterance ids, offsets, lengths and source sha256 (so re-ingesting
    another corpus, or the same one at another rate, changes the key), the audio's sha256 (the one ingest
    recorded in store.json, which extraction verifies; an older store without it is read and hashed here),
    and the openSMILE version, feature set and level.
    """
    store_dir = Path(store_dir)
    digest = hashlib.sha256()
    header = {
        "extractor_revision": EXTRACTOR_REVISION,
        "opensmile": _opensmile_version(),
        "feature_set": FEATURE_SET,
        "feature_level": FEATURE_LEVEL,
        "store_meta": (store_meta := json.loads((store_dir / STORE_META_FILE).read_text())),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    manifest = pd.read_parquet(
        store_dir / MANIFEST_FILE, columns=["utterance_id", "offset", "num_samples", "sha256"]
    )
    for column in manifest.columns:
        digest.update(column.encode())
        digest.update("\x1f".join(manifest[column].astype(str)).encode())
    if not store_meta.get("sha256"):  # in store_meta, hashed above: no second read of the audio
        with open(store_dir / AUDIO_FILE, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def default_cache_dir(store_dir: Path) -> Path:
    """`<store_dir>/../features/egemaps`: beside the store, outside it (the store is a DVC output)."""
    return Path(store_dir).resolve().parent / CACHE_SUBDIR


def feature_cache_path(store_dir: Path, cache_dir: Path | None = None, key: str | None = None) -> Path:
    """Where `extract_features` keeps (or will keep) the features of this store's current content."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(store_dir)
    key = key if key is not None else feature_cache_key(store_dir)
    return directory / f"egemaps_{key[:24]}.parquet"


def _worker_count(utterances: int) -> int:
    return worker_count(utterances, PARALLEL_MIN_UTTERANCES, MAX_WORKERS)


def _extract_rows(store: AudioStore, smile: Any, indices: list[int]) -> tuple[np.ndarray, list[str]]:
    """Features of manifest rows `indices` (n x 88, float64) and the feature names."""
    rows = np.empty((len(indices), NUM_FEATURES), dtype=np.float64)
    names: list[str] = list(smile.feature_names)
    for position, index in enumerate(indices):
        # openSMILE needs float input: int16 arrays fail inside its normalisation.
        signal = store.pcm(index).astype(np.float32) / 32768.0
        with warnings.catch_warnings():
            # "Segment too short, filling with NaN.": counted later as non-finite values.
            warnings.simplefilter("ignore", UserWarning)
            frame = smile.process_signal(signal, store.sample_rate)
        rows[position] = frame.to_numpy(dtype=np.float64)[0]
    return rows, names


_WORKER: dict[str, Any] = {}


def _init_worker(store_dir: str) -> None:
    _WORKER["store"] = AudioStore(store_dir)
    _WORKER["smile"] = _make_smile()


def _worker_chunk(indices: list[int]) -> tuple[list[int], np.ndarray]:
    rows, _ = _extract_rows(_WORKER["store"], _WORKER["smile"], indices)
    return indices, rows


def _extract_all(store: AudioStore, workers: int, progress: bool) -> pd.DataFrame:
    smile = _make_smile()
    names = list(smile.feature_names)
    if len(names) != NUM_FEATURES:
        raise RuntimeError(f"openSMILE {FEATURE_SET} gave {len(names)} features, expected {NUM_FEATURES}")
    n = len(store)
    values = np.empty((n, NUM_FEATURES), dtype=np.float64)
    bar = tqdm(total=n, disable=not progress, file=sys.stderr, unit="utt", desc="egemaps")
    with bar:
        if workers <= 1:
            for start in range(0, n, _CHUNK):
                indices = list(range(start, min(n, start + _CHUNK)))
                values[indices], _ = _extract_rows(store, smile, indices)
                bar.update(len(indices))
        else:
            import multiprocessing

            # Longest utterances first, interleaved across chunks, keeps the workers evenly loaded.
            order = np.argsort(-store.manifest["num_samples"].to_numpy(), kind="stable")
            chunks = [order[i :: max(1, n // _CHUNK)].tolist() for i in range(max(1, n // _CHUNK))]
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(str(store.directory),),
            ) as pool:
                for indices, rows in pool.map(_worker_chunk, chunks):
                    values[indices] = rows
                    bar.update(len(indices))
    index = pd.Index(store.manifest["utterance_id"].astype(str).to_numpy(), name="utterance_id")
    return pd.DataFrame(values, index=index, columns=names)


def extract_features(
    store_dir: Path, cache_dir: Path | None = None, progress: bool = False, workers: int | None = None
) -> pd.DataFrame:
    """eGeMAPSv02 functionals (88 columns, float64) per utterance, indexed by utterance_id in manifest order.

    Read from the cache when one matches the store's content (see `feature_cache_key`); otherwise
    extracted from the memory-mapped store and written to the cache atomically (concurrent fold jobs
    may race; each writes complete identical bytes under a temporary name and renames). Non-finite
    values are kept as NaN/inf (the classifier imputes them); their count is in the `.json` sidecar.
    `workers`: processes for extraction (default: one below 1000 utterances, else one per CPU).
    """
    return _cached_features(Path(store_dir), cache_dir, progress, workers)[0]


def _cached_features(
    store_dir: Path, cache_dir: Path | None, progress: bool, workers: int | None
) -> tuple[pd.DataFrame, Path]:
    key = feature_cache_key(store_dir)
    path = feature_cache_path(store_dir, cache_dir, key)
    if path.is_file():
        return pd.read_parquet(path), path
    store = AudioStore(store_dir)
    store.verify_checksum()
    started = time.perf_counter()
    workers = _worker_count(len(store)) if workers is None else max(1, int(workers))
    features = _extract_all(store, workers, progress)
    seconds = time.perf_counter() - started
    nonfinite = ~np.isfinite(features.to_numpy())
    sidecar = {
        "store_dir": str(store_dir.resolve()),
        "key": key,
        "opensmile": _opensmile_version(),
        "feature_set": FEATURE_SET,
        "feature_level": FEATURE_LEVEL,
        "utterances": len(features),
        "audio_seconds": float(store.manifest["num_samples"].sum()) / store.sample_rate,
        "extraction_seconds": round(seconds, 3),
        "workers": workers,
        "nonfinite_values": int(nonfinite.sum()),
        "utterances_with_nonfinite": int(nonfinite.any(axis=1).sum()),
        "nonfinite_by_feature": {
            name: int(count)
            for name, count in zip(features.columns, nonfinite.sum(axis=0), strict=True)
            if count
        },
    }
    atomic_write(path, features.to_parquet)
    write_json(path.with_suffix(".json"), sidecar)
    return features, path


# ---------------------------------------------------------------------------------------------------------
# Classifier


def _nonfinite_to_nan(values: np.ndarray) -> np.ndarray:
    """SimpleImputer treats NaN as missing but rejects inf; both mean "no value" here."""
    values = np.array(values, dtype=np.float64, copy=True)
    values[~np.isfinite(values)] = np.nan
    return values


def make_pipeline(C: float, seed: int = 0, class_balanced: bool = True) -> Any:
    """inf->NaN, training-mean imputation, standardisation, multinomial logistic regression; its classes
    are weighted by inverse frequency (class_weight="balanced") when `class_balanced`
    (train.class_balanced_loss), else all weigh the same."""
    # Imported here: extraction workers import this module, and scikit-learn takes seconds to import.
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return Pipeline(
        [
            ("nonfinite", FunctionTransformer(_nonfinite_to_nan, feature_names_out="one-to-one")),
            ("impute", SimpleImputer(strategy="mean", keep_empty_features=True)),
            ("scale", StandardScaler()),
            (
                "classify",
                LogisticRegression(
                    C=C,
                    class_weight="balanced" if class_balanced else None,
                    solver="lbfgs",
                    max_iter=MAX_ITER,
                    random_state=seed,
                ),
            ),
        ]
    )


def _probabilities(pipeline: Any, features: np.ndarray) -> np.ndarray:
    """n x 3 class probabilities; a class absent from training gets probability 0."""
    proba = pipeline.predict_proba(features)
    full = np.zeros((features.shape[0], len(CLASS_NAMES)), dtype=np.float64)
    full[:, pipeline.classes_.astype(int)] = proba
    return full


def _fit(C: float, X: np.ndarray, y: np.ndarray, seed: int, class_balanced: bool) -> tuple[Any, int]:
    """Fitted pipeline and the number of convergence warnings (0 or 1)."""
    from sklearn.exceptions import ConvergenceWarning

    pipeline = make_pipeline(C, seed, class_balanced)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipeline.fit(X, y)
    return pipeline, sum(issubclass(w.category, ConvergenceWarning) for w in caught)


def _select_and_predict(
    X: dict[str, np.ndarray],
    manifest: pd.DataFrame,
    split: dict[str, list[str]],
    dimensions: list[str],
    seed: int,
    class_balanced: bool,
) -> tuple[Any, ...]:
    """Per dimension: fit every C on train, keep the best by validation UAR, predict test probabilities."""
    pipelines: dict[str, Any] = {}
    chosen: dict[str, float] = {}
    validation_uar: dict[str, float] = {}
    grid_uar: dict[str, dict[str, float]] = {}
    test_proba: dict[str, np.ndarray] = {}
    test_labels: dict[str, np.ndarray] = {}
    convergence_warnings = 0
    for dimension in dimensions:
        column = f"{dimension}_class"
        y = {name: manifest.loc[ids, column].to_numpy(dtype=np.int64) for name, ids in split.items()}
        best: tuple[float, float, Any] | None = None
        grid_uar[dimension] = {}
        for C in C_GRID:
            pipeline, warned = _fit(C, X["train"], y["train"], seed, class_balanced)
            convergence_warnings += warned
            score = uar(y["validation"], pipeline.predict(X["validation"]))
            grid_uar[dimension][repr(C)] = score
            if best is None or score > best[0]:  # strict: ties keep the smaller C
                best = (score, C, pipeline)
        assert best is not None
        validation_uar[dimension], chosen[dimension], pipelines[dimension] = best
        test_proba[dimension] = _probabilities(pipelines[dimension], X["test"])
        test_labels[dimension] = y["test"]
    return pipelines, chosen, validation_uar, grid_uar, convergence_warnings, test_proba, test_labels


def _checked_dimensions(params: Params, system_name: str) -> list[str]:
    system = params.systems.get(system_name)
    if system is None:
        raise ValueError(f"unknown system {system_name!r}; known: {', '.join(params.systems)}")
    if system.kind != "egemaps":
        raise ValueError(f"system {system_name!r} has kind {system.kind!r}, not 'egemaps'")
    dimensions = list(params.eval.dimensions)
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"eval.dimensions: unknown dimension(s) {', '.join(unknown)}")
    return dimensions


def _test_predictions(
    fold: Fold,
    system_name: str,
    fold_index: int,
    improvised: np.ndarray,
    test_proba: dict[str, np.ndarray],
    test_labels: dict[str, np.ndarray],
) -> pd.DataFrame:
    """The fold's test predictions in the contract of metrics.PREDICTION_COLUMNS."""
    frames = []
    for dimension, proba in test_proba.items():
        frame = pd.DataFrame(
            {
                "utterance_id": fold.test_ids,
                "system": system_name,
                "fold": fold_index,
                "test_session": fold.test_session,
                "dimension": dimension,
                "improvised": improvised,
                "label": test_labels[dimension],
                "prediction": proba.argmax(axis=1),
            }
        )
        for i, name in enumerate(PROBABILITY_COLUMNS):
            frame[name] = proba[:, i]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)].astype(PREDICTION_COLUMNS)


def _model_file(
    pipelines: dict[str, Any],
    feature_names: list[str],
    dimensions: list[str],
    chosen: dict[str, float],
    class_weight: str,
    sample_rate: int,
) -> dict[str, Any]:
    """What model/egemaps_linear.joblib holds: all EgemapsPredictor needs to score a waveform."""
    return {
        "pipelines": pipelines,
        "feature_names": feature_names,
        "dimensions": dimensions,
        "class_names": list(CLASS_NAMES),
        "feature_set": FEATURE_SET,
        "feature_level": FEATURE_LEVEL,
        "opensmile": _opensmile_version(),
        "chosen_C": chosen,
        "class_weight": class_weight,
        "sample_rate": int(sample_rate),
    }


def train_fold(store_dir: Path, system_name: str, fold_index: int, out_dir: Path, params: Params) -> dict:
    """Fit, select and evaluate the baseline on one leave-one-session-out fold; write the run directory.

    `out_dir` receives predictions.parquet (metrics.PREDICTION_COLUMNS), metrics.json and
    model/egemaps_linear.joblib, all at once (atomic directory swap). Returns the metrics dict.
    Deterministic: same store and params give identical predictions. `train.seeds` is not read: lbfgs
    draws nothing at random (random_state is fixed at 0), so a fold is one run, and the results count it
    as one seed.
    """
    dimensions = _checked_dimensions(params, system_name)
    store_dir = Path(store_dir)
    check_output_dir(out_dir, TRAIN_RUN_OUTPUT, [("store", store_dir)])
    store = AudioStore(store_dir)
    folds = leave_one_session_out(store.manifest, params.data.sessions)
    if not 0 <= fold_index < len(folds):
        raise ValueError(f"fold {fold_index} does not exist; there are {len(folds)} folds")
    fold = folds[fold_index]

    started = time.perf_counter()
    features, cache_path = _cached_features(store_dir, None, False, None)
    feature_seconds = time.perf_counter() - started
    if not features.index.equals(pd.Index(store.manifest["utterance_id"].astype(str))):
        raise RuntimeError(f"{cache_path}: feature rows do not match the store's manifest")

    manifest = store.manifest.set_index(store.manifest["utterance_id"].astype(str))
    split = {"train": fold.train_ids, "validation": fold.validation_ids, "test": fold.test_ids}
    X = {name: features.loc[ids].to_numpy(dtype=np.float64) for name, ids in split.items()}
    nonfinite = {name: int((~np.isfinite(values)).sum()) for name, values in X.items()}

    make_pipeline(1.0)  # imports scikit-learn outside the timed part
    started = time.perf_counter()
    # 88 features: one thread is fastest, and OpenMP/BLAS thread pools oversubscribed by concurrent
    # jobs (other folds, a neural run) made fitting 3-5x slower in measurements on 2 cores.
    with threadpool_limits(limits=1):
        fitted = _select_and_predict(X, manifest, split, dimensions, 0, params.train.class_balanced_loss)
    pipelines, chosen, validation_uar, grid_uar, convergence_warnings, test_proba, test_labels = fitted
    class_weight = "balanced" if params.train.class_balanced_loss else "none"  # train.class_balanced_loss
    improvised = manifest.loc[fold.test_ids, "improvised"].to_numpy(dtype=bool)
    predictions = _test_predictions(fold, system_name, fold_index, improvised, test_proba, test_labels)
    train_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "system": system_name,
        "kind": "egemaps",
        "fold": fold_index,
        "test_session": fold.test_session,
        "validation_speaker": fold.validation_speaker,
        "evaluation": evaluate_predictions(predictions),
        "validation": validation_uar,
        "validation_grid": grid_uar,
        "chosen_C": chosen,
        "C_grid": list(C_GRID),
        "class_weight": class_weight,
        "refit": "train speakers only (validation speaker used for choosing C)",
        "train_seconds": round(train_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "feature_cache": str(cache_path),
        "feature_set": f"{FEATURE_SET} {FEATURE_LEVEL}",
        "opensmile": _opensmile_version(),
        "nonfinite_feature_values": nonfinite,
        "convergence_warnings": convergence_warnings,
        "n_train": len(fold.train_ids),
        "n_validation": len(fold.validation_ids),
        "n_test": len(fold.test_ids),
    }
    model = _model_file(
        pipelines, list(features.columns), dimensions, chosen, class_weight, store.sample_rate
    )
    with atomic_directory(Path(out_dir), TRAIN_RUN_OUTPUT) as tmp:
        predictions.to_parquet(tmp / PREDICTIONS_FILE, index=False)
        write_json(tmp / RUN_METRICS_FILE, metrics)
        (tmp / MODEL_DIR).mkdir()
        joblib.dump(model, tmp / MODEL_DIR / MODEL_FILE)
    return metrics


class EgemapsPredictor:
    """A trained eGeMAPS fold as a function of one waveform, like train.training.Predictor (no attention)."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.pipelines = model["pipelines"]
        self.dimensions = list(model["dimensions"])
        self.sample_rate = int(model.get("sample_rate", 16000))
        self.smile = _make_smile()

    def predict(self, waveform: np.ndarray) -> dict[str, dict[str, Any]]:
        """{dimension: {"class", "probabilities" [low, medium, high]}} for mono audio at `sample_rate`."""
        samples = np.asarray(waveform)
        samples = (
            samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Segment too short": NaN features, imputed
            features = self.smile.process_signal(samples.reshape(-1), self.sample_rate).to_numpy(np.float64)
        result = {}
        for dimension in self.dimensions:
            probabilities = _probabilities(self.pipelines[dimension], features)[0]
            result[dimension] = {"class": int(np.argmax(probabilities)), "probabilities": probabilities}
        return result


def load_predictor(model_dir: Path) -> EgemapsPredictor:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eGeMAPS model")
    return EgemapsPredictor(joblib.load(path))
