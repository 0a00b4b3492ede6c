"""Training and evaluation of one (system, fold) of the leave-one-session-out protocol.

Design notes (why it is built this way): docs/design/training.md.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sermtl.data.audio import AudioStore
from sermtl.data.folds import Fold, leave_one_session_out
from sermtl.evaluate.metrics import (
    PREDICTION_COLUMNS,
    PROBABILITY_COLUMNS,
    evaluate_predictions,
    uar,
    validate_predictions,
)
from sermtl.fsutil import (
    atomic_directory,
    atomic_write,
    check_output_dir,
    read_marker,
    write_json,
    write_marker,
)
from sermtl.model.batching import (
    Segment,
    UtteranceSet,
    WaveformSource,
    collate,
    evaluation_batches,
    evaluation_segments,
    iterate,
    pool_segments,
    training_batches,
)
from sermtl.model.network import ModelConfig, SerModel, build_model, count_parameters
from sermtl.schema import (
    ATTENTION_FILE,
    CHECKPOINT_FILE,
    HISTORY_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RUN_METRICS_FILE,
    SEED_RUN_PATTERN,
    SEED_RUN_PREFIX,
    STORE_META_FILE,
    TRAIN_RUN_OUTPUT,
)

CHECKPOINT_VERSION = 1
MODEL_FORMAT = 2  # 2: a model/ may hold several seeds' networks per dimension, averaged
MODEL_FORMATS = (1, 2)  # what load_predictor reads
MTL_NETWORK = "mtl"
ATTENTION_UTTERANCES = 4  # test utterances whose attention weights are kept
EVAL_BATCH_FACTOR = 2  # evaluation batches hold this many times the training batch's frames
SEED_DIR_PREFIX = SEED_RUN_PREFIX  # a fold's sub-run of seed s is <fold>/seed<s>
_SEED_DIR_RE = re.compile(SEED_RUN_PATTERN)


class TrainingError(ValueError):
    """A request that cannot be trained: unknown system, fold out of range, unavailable device."""


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # "mtl" or the dimension of a single-task network
    tasks: list[str]
    index: int  # position in the system, part of the seed


def network_specs(system: Any, dimensions: list[str]) -> list[NetworkSpec]:
    """One network with all dimensions (multi-task) or one per dimension (single-task)."""
    if system.multitask:
        return [NetworkSpec(MTL_NETWORK, list(dimensions), 0)]
    return [NetworkSpec(d, [d], i) for i, d in enumerate(dimensions)]


def resolve_device(requested: str | None, params: Any) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    name = (requested or params.train.device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise TrainingError(f"device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (seed, fold, network, epoch), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def multitask_loss(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    tasks: list[str],
    loss_weights: dict[str, float],
    class_weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over tasks of weight * cross-entropy; `labels` is [B, len(tasks)] in the order of `tasks`."""
    total = logits[tasks[0]].new_zeros((), dtype=torch.float32)
    for column, task in enumerate(tasks):
        weight = None if class_weights is None else class_weights.get(task)
        ce = F.cross_entropy(logits[task].float(), labels[:, column], weight=weight)
        total = total + float(loss_weights.get(task, 1.0)) * ce
    return total


def class_balanced_weights(labels: np.ndarray, tasks: list[str], classes: int = 3) -> dict[str, torch.Tensor]:
    """Inverse class frequency per task (N / (classes * count)); an absent class counts as one."""
    weights = {}
    for column, task in enumerate(tasks):
        counts = np.bincount(labels[:, column], minlength=classes).astype(np.float64)
        weights[task] = torch.tensor(len(labels) / (classes * np.maximum(counts, 1.0)), dtype=torch.float32)
    return weights


# ----------------------------------------------------------------------------------------------------
# Prediction over segments (shared by validation, test and the Predictor, so they pool identically)


@torch.no_grad()
def predict_segments(
    model: SerModel,
    source: UtteranceSet | WaveformSource,
    segments: list[Segment],
    device: torch.device,
    frame_budget: int,
    bf16: bool = False,
    keep_attention: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Class probabilities [S, 3] per task for every segment (in the given order), and optionally the
    attention weights over each segment's frames."""
    model.eval()
    tasks = model.tasks
    probabilities = {t: np.zeros((len(segments), model.config.num_classes), np.float32) for t in tasks}
    attention: dict[str, list[np.ndarray]] = {t: [np.empty(0)] * len(segments) for t in tasks}
    pin = device.type == "cuda"
    for indices in evaluation_batches(segments, frame_budget):
        batch = collate(source, [segments[i] for i in indices], pin=pin).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, weights = model(batch.waveform, batch.lengths)
        for task in tasks:
            probabilities[task][indices] = torch.softmax(logits[task].float(), dim=-1).cpu().numpy()
            if keep_attention:
                rows = weights[task].float().cpu().numpy()
                for row, i in enumerate(indices):
                    attention[task][i] = rows[row, : segments[i].frames]
    return probabilities, attention


def utterance_attention(segments: list[Segment], weights: list[np.ndarray]) -> np.ndarray:
    """One utterance's attention: its segments' weights in time order, each scaled by its pooling weight."""
    order = sorted(range(len(segments)), key=lambda i: segments[i].start)
    total = sum(s.frames for s in segments)
    return np.concatenate([weights[i] * (segments[i].frames / total) for i in order]).astype(np.float32)


def predict_utterances(
    model: SerModel,
    data: UtteranceSet,
    max_frames: int,
    device: torch.device,
    frame_budget: int,
    bf16: bool = False,
    attention_items: list[int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[int, np.ndarray]]]:
    """Utterance-level probabilities {task: [N, 3]} (frame-weighted mean over the segments), and the
    attention of the utterances in `attention_items`."""
    cfg = model.config
    segments = [
        segment
        for item, n in enumerate(data.num_samples)
        for segment in evaluation_segments(int(n), cfg.frame_samples, cfg.hop_samples, max_frames, item)
    ]
    probabilities, _ = predict_segments(model, data, segments, device, frame_budget, bf16)
    items = np.array([s.item for s in segments], dtype=np.int64)
    frames = np.array([s.frames for s in segments], dtype=np.int64)
    pooled = {t: pool_segments(items, frames, p, len(data)) for t, p in probabilities.items()}
    attention: dict[str, dict[int, np.ndarray]] = {t: {} for t in model.tasks}
    if attention_items:
        chosen = [s for s in segments if s.item in set(attention_items)]
        _, weights = predict_segments(model, data, chosen, device, frame_budget, bf16, keep_attention=True)
        for task in model.tasks:
            for item in attention_items:
                picks = [i for i, s in enumerate(chosen) if s.item == item]
                attention[task][item] = utterance_attention(
                    [chosen[i] for i in picks], [weights[task][i] for i in picks]
                )
    return pooled, attention


def validation_scores(
    probabilities: dict[str, np.ndarray], data: UtteranceSet, loss_weights: dict[str, float]
) -> tuple[dict[str, float], float]:
    """UAR per task of the pooled predictions, and the weighted negative log-likelihood per utterance."""
    uars, loss = {}, 0.0
    for column, task in enumerate(data.tasks):
        labels = data.labels[:, column]
        probs = probabilities[task]
        uars[task] = uar(labels, probs.argmax(axis=1))
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
        loss += float(loss_weights.get(task, 1.0)) * float(-np.log(picked).mean())
    return uars, loss


# ----------------------------------------------------------------------------------------------------
# One network


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _rng_states(device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def _better(score: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Higher mean UAR wins; equal UAR (common on one small validation speaker) goes to lower loss."""
    if best is None:
        return True
    uar_mean, loss = score
    best_uar, best_loss = best
    if math.isnan(uar_mean):
        return False
    return uar_mean > best_uar or (uar_mean == best_uar and loss < best_loss)


class _NetworkTrainer:
    """Trains one network of a fold with early stopping; `state` is what the checkpoint holds."""

    def __init__(
        self,
        spec: NetworkSpec,
        config: ModelConfig,
        train_set: UtteranceSet,
        val_set: UtteranceSet,
        params: Any,
        fold_index: int,
        seed: int,
        device: torch.device,
        describe: str,
        progress: bool,
    ) -> None:
        self.spec, self.config, self.params, self.fold_index = spec, config, params, fold_index
        self.seed = int(seed)
        self.train_set, self.val_set, self.device = train_set, val_set, device
        self.describe, self.progress = describe, progress
        tp = params.train
        self.max_frames = params.features.max_frames
        self.frame_budget = tp.batch_size * self.max_frames * EVAL_BATCH_FACTOR
        self.bf16 = device.type == "cuda" and tp.bf16
        self.loss_weights = {t: float(params.model.loss_weights.get(t, 1.0)) for t in spec.tasks}
        torch.manual_seed(derive_seed(self.seed, fold_index, spec.index))
        self.model = build_model(config).to(device)
        optimizer_class = torch.optim.AdamW if tp.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(self.model.parameters(), lr=tp.learning_rate)
        self.step_model = torch.compile(self.model, dynamic=True) if tp.compile else self.model
        self.class_weights = (
            {t: w.to(device) for t, w in class_balanced_weights(train_set.labels, spec.tasks).items()}
            if tp.class_balanced_loss
            else None
        )
        self.epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_score: tuple[float, float] | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.train_audio_seconds = 0.0

    # -- checkpoint state
    def state(self) -> dict[str, Any]:
        return {
            "network": self.spec.name,
            "epoch": self.epoch,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "train_audio_seconds": self.train_audio_seconds,
            "rng": _rng_states(self.device),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best_state = state["best_state"]
        self.best_score = tuple(state["best_score"]) if state["best_score"] is not None else None
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        self.train_audio_seconds = float(state["train_audio_seconds"])
        _restore_rng_states(state["rng"], self.device)

    @property
    def finished(self) -> bool:
        tp = self.params.train
        return self.epoch >= tp.max_epochs or self.bad_epochs >= tp.early_stopping_patience

    # -- training
    def _train_epoch(self, bar: tqdm | None) -> tuple[float, float, float]:
        tp, cfg = self.params.train, self.config
        torch.manual_seed(derive_seed(self.seed, self.fold_index, self.spec.index, self.epoch))
        rng = np.random.default_rng([self.seed, self.fold_index, self.spec.index, self.epoch])
        batches = training_batches(
            self.train_set, cfg.frame_samples, cfg.hop_samples, self.max_frames, tp.batch_size, rng
        )
        pin = self.device.type == "cuda"
        labels_all = torch.from_numpy(self.train_set.labels)
        self.model.train()
        started = time.perf_counter()
        total_loss, total_rows, audio_samples = 0.0, 0, 0
        for batch in iterate(self.train_set, batches, pin=pin, workers=tp.num_workers):
            segments = batch.segments
            labels = labels_all[batch.items]
            if pin:
                labels = labels.pin_memory()
            batch = batch.to(self.device)
            labels = labels.to(self.device, non_blocking=pin)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits, _ = self.step_model(batch.waveform, batch.lengths)
            loss = multitask_loss(logits, labels, self.spec.tasks, self.loss_weights, self.class_weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tp.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tp.grad_clip_norm)
            self.optimizer.step()
            total_loss += float(loss.detach()) * len(segments)
            total_rows += len(segments)
            audio_samples += sum(s.length for s in segments)
            if bar is not None:
                bar.set_postfix_str(f"loss {float(loss.detach()):.3f}", refresh=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        return total_loss / max(total_rows, 1), seconds, audio_samples / cfg.sample_rate

    def run(self, save: Any) -> None:
        """Epochs until max_epochs or patience runs out; `save(state)` is called after every epoch."""
        tp = self.params.train
        bar = tqdm(
            total=tp.max_epochs,
            initial=self.epoch,
            desc=self.describe,
            disable=not self.progress,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            while not self.finished:
                self.epoch += 1
                epoch_started = time.perf_counter()
                train_loss, train_seconds, audio_seconds = self._train_epoch(bar)
                probabilities, _ = predict_utterances(
                    self.model, self.val_set, self.max_frames, self.device, self.frame_budget, self.bf16
                )
                uars, val_loss = validation_scores(probabilities, self.val_set, self.loss_weights)
                uar_mean = float(np.mean([uars[t] for t in self.spec.tasks]))
                self.train_seconds += train_seconds
                self.train_audio_seconds += audio_seconds
                self.history.append(
                    {
                        "network": self.spec.name,
                        "epoch": self.epoch,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        **{f"val_uar_{t}": uars[t] for t in self.spec.tasks},
                        "val_uar_mean": uar_mean,
                        "seconds": time.perf_counter() - epoch_started,
                        "audio_seconds_per_second": audio_seconds / max(train_seconds, 1e-9),
                    }
                )
                if _better((uar_mean, val_loss), self.best_score):
                    self.best_score = (uar_mean, val_loss)
                    self.best_state = _cpu_state(self.model)
                    self.best_epoch = self.epoch
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
                save(self.state())
                bar.update(1)
                bar.set_postfix_str(f"loss {train_loss:.3f} val UAR {uar_mean:.3f} best@{self.best_epoch}")
        finally:
            bar.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def summary(self) -> dict[str, Any]:
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epoch,
            "validation": {t: best.get(f"val_uar_{t}", float("nan")) for t in self.spec.tasks},
            "train_seconds": self.train_seconds,
            "train_audio_seconds": self.train_audio_seconds,
            "parameters": count_parameters(self.model),
        }


# ----------------------------------------------------------------------------------------------------
# A fold


def _fingerprint(
    params: Any, system_name: str, system: Any, fold_index: int, store_dir: Path, seed: int | None = None
) -> str:
    """What a result depends on; a checkpoint or result with another fingerprint is stale. The fold's
    (`seed` None) includes train.seeds; a seed sub-run's its own seed instead, not the other seeds."""
    train = dataclasses.asdict(params.train)
    for volatile in ("device", "num_workers", "compile"):
        train.pop(volatile, None)
    if seed is not None:
        train.pop("seeds")
        train["seed"] = int(seed)
    digest = hashlib.sha256()
    for name in (MANIFEST_FILE, STORE_META_FILE):
        digest.update((store_dir / name).read_bytes())
    payload = {
        "version": CHECKPOINT_VERSION,
        "system_name": system_name,
        "system": dataclasses.asdict(system),
        "fold": fold_index,
        "sessions": list(params.data.sessions),
        "sample_rate": params.data.sample_rate,
        "dimensions": list(params.eval.dimensions),
        "features": dataclasses.asdict(params.features),
        "model": dataclasses.asdict(params.model),
        "train": train,
        "store": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _check_request(params: Any, system_name: str, fold_index: int) -> Any:
    if system_name not in params.systems:
        raise TrainingError(f"unknown system {system_name!r}; valid: {', '.join(sorted(params.systems))}")
    folds = len(params.data.sessions)
    if not 0 <= fold_index < folds:
        raise TrainingError(f"fold {fold_index} is out of range; valid: 0..{folds - 1} (one per session)")
    return params.systems[system_name]


def _atomic_torch_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a corrupt checkpoint is not worth failing for: train afresh
        return None
    if checkpoint.get("version") != CHECKPOINT_VERSION or checkpoint.get("fingerprint") != fingerprint:
        return None
    return checkpoint


def _prediction_table(
    data: UtteranceSet,
    probabilities: dict[str, np.ndarray],
    dimensions: list[str],
    system_name: str,
    fold: Fold,
) -> pd.DataFrame:
    rows = []
    for column, dimension in enumerate(dimensions):
        probs = probabilities[dimension]
        frame = pd.DataFrame(
            {
                "utterance_id": data.ids,
                "system": system_name,
                "fold": fold.index,
                "test_session": fold.test_session,
                "dimension": dimension,
                "improvised": data.improvised,
                "label": data.labels[:, column],
                "prediction": probs.argmax(axis=1),
                "prob_low": probs[:, 0].astype(np.float64),
                "prob_medium": probs[:, 1].astype(np.float64),
                "prob_high": probs[:, 2].astype(np.float64),
            }
        )
        rows.append(frame)
    table = pd.concat(rows, ignore_index=True)
    table["_order"] = table["dimension"].map({d: i for i, d in enumerate(dimensions)})
    table = table.sort_values(["utterance_id", "_order"], kind="stable").drop(columns="_order")
    table = table.reset_index(drop=True)[list(PREDICTION_COLUMNS)].astype(PREDICTION_COLUMNS)
    return validate_predictions(table, PREDICTIONS_FILE)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def _write_model_dir(
    out_dir: Path,
    system_name: str,
    max_frames: int,
    dimensions: list[str],
    networks: dict[str, tuple[ModelConfig, dict[str, torch.Tensor]]],
    seed: int,
) -> None:
    with atomic_directory(out_dir / MODEL_DIR) as tmp:
        description = {
            "format": MODEL_FORMAT,
            "system": system_name,
            "dimensions": list(dimensions),
            "max_frames": max_frames,
            "seeds": [seed],
            "networks": {
                name: {"file": f"{name}.pt", "config": config.to_dict(), "network": name, "seed": seed}
                for name, (config, _) in networks.items()
            },
        }
        write_json(tmp / "config.json", description)
        for name, (_, state) in networks.items():
            torch.save(state, tmp / f"{name}.pt")


def seed_dir(out_dir: Path | str, seed: int) -> Path:
    """The sub-run of one seed inside a fold's run directory: `<out_dir>/seed<s>`."""
    return Path(out_dir) / f"{SEED_DIR_PREFIX}{int(seed)}"


def train_fold(
    store_dir: Path | str,
    system_name: str,
    fold_index: int,
    out_dir: Path | str,
    params: Any,
    *,
    device: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `system_name` on fold `fold_index` once per seed of train.seeds (the eGeMAPS baseline, which
    is deterministic, once), write the run directory and return its metrics."""
    system = _check_request(params, system_name, fold_index)
    check_output_dir(out_dir, TRAIN_RUN_OUTPUT, [("store", store_dir)])
    if system.kind == "egemaps":
        from sermtl.model import egemaps

        return egemaps.train_fold(store_dir, system_name, fold_index, out_dir, params)  # no seeds

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    torch_device = resolve_device(device, params)
    store = AudioStore(store_dir)
    if store.sample_rate != params.data.sample_rate:
        raise TrainingError(
            f"{store_dir}: store holds {store.sample_rate} Hz audio but data.sample_rate is "
            f"{params.data.sample_rate}; re-run ingestion"
        )
    fold = leave_one_session_out(store.manifest, params.data.sessions)[fold_index]
    seeds = [int(seed) for seed in params.train.seeds]
    fingerprint = _fingerprint(params, system_name, system, fold_index, store_dir)
    metrics_path = out_dir / RUN_METRICS_FILE
    if resume and metrics_path.is_file():
        existing = _read_metrics(metrics_path)
        if existing.get("fingerprint") == fingerprint:
            return existing
    _claim_seed_dirs(out_dir, seeds)
    # Remove outputs of an earlier run, so a half-replaced directory can never look finished. A checkpoint
    # beside them is an earlier sermtl's: checkpoints are kept per seed sub-run.
    metrics_path.unlink(missing_ok=True)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    store.verify_checksum()  # same-size corruption; one sequential read, cheap next to an epoch
    dimensions = list(params.eval.dimensions)
    specs = network_specs(system, dimensions)
    train_set = UtteranceSet(store, fold.train_ids, dimensions)
    val_set = UtteranceSet(store, fold.validation_ids, dimensions)
    test_set = UtteranceSet(store, fold.test_ids, dimensions)
    if not len(train_set) or not len(val_set) or not len(test_set):
        raise TrainingError(
            f"fold {fold_index}: empty split (train/validation/test must all hold utterances)"
        )

    deterministic_before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    threads_before = torch.get_num_threads()
    if torch_device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        if params.train.cpu_threads > 0:
            torch.set_num_threads(params.train.cpu_threads)
    try:
        for seed in seeds:
            _train_seed(
                seed_dir(out_dir, seed),
                seed,
                store_dir,
                system_name,
                system,
                params,
                fold,
                specs,
                (train_set, val_set, test_set),
                dimensions,
                torch_device,
                resume,
                progress,
            )
        metrics = combine_seeds(out_dir, seeds, params, system_name, fingerprint)
    finally:
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
        torch.set_num_threads(threads_before)
    return metrics


def _read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json, or {} when it cannot be read (then the run is not finished)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _claim_seed_dirs(out_dir: Path, seeds: list[int]) -> None:
    """Mark the fold's folder as a training run's (schema.TRAIN_RUN_OUTPUT knows its seed sub-runs by
    name) and remove the sub-runs of seeds no longer in train.seeds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(out_dir) is None:
        write_marker(out_dir, TRAIN_RUN_OUTPUT)  # written in place: the run folder is ours from here on
    wanted = {seed_dir(out_dir, seed).name for seed in seeds}
    for name in sorted(os.listdir(out_dir)):
        path = out_dir / name
        if _SEED_DIR_RE.fullmatch(name) and name not in wanted:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _train_seed(
    run_dir: Path,
    seed: int,
    store_dir: Path,
    system_name: str,
    system: Any,
    params: Any,
    fold: Fold,
    specs: list[NetworkSpec],
    sets: tuple[UtteranceSet, UtteranceSet, UtteranceSet],
    dimensions: list[str],
    device: torch.device,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    """One seed's sub-run: the system's network(s) trained with `seed` (a finished sub-run with the same
    fingerprint is kept, a checkpoint continued) and scored on the test session."""
    check_output_dir(run_dir, TRAIN_RUN_OUTPUT, [("store", store_dir)])
    fingerprint = _fingerprint(params, system_name, system, fold.index, store_dir, seed)
    metrics_path, checkpoint_path = run_dir / RUN_METRICS_FILE, run_dir / CHECKPOINT_FILE
    if resume and metrics_path.is_file():
        existing = _read_metrics(metrics_path)
        if existing.get("fingerprint") == fingerprint:
            return existing
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(run_dir) is None:
        write_marker(run_dir, TRAIN_RUN_OUTPUT)  # written in place: the run folder is ours from here on
    if not resume:
        checkpoint_path.unlink(missing_ok=True)
    checkpoint = _load_checkpoint(checkpoint_path, fingerprint) if resume else None
    if checkpoint is None:
        checkpoint = {"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "finished": {}}
    elif progress:
        tqdm.write(
            f"{run_dir}: resuming from checkpoint (epoch {checkpoint.get('epoch', 0)})", file=sys.stderr
        )
    # Remove outputs of an earlier run, so a half-replaced directory can never look finished.
    metrics_path.unlink(missing_ok=True)

    train_set, val_set, test_set = sets
    trained: dict[str, tuple[ModelConfig, SerModel, dict[str, Any]]] = {}
    for spec in specs:
        trained[spec.name] = _train_one(
            spec,
            system_name,
            system,
            params,
            fold,
            seed,
            train_set,
            val_set,
            device,
            checkpoint,
            checkpoint_path,
            progress,
        )
    metrics = _finish(
        run_dir, system_name, system, params, fold, seed, test_set, trained, dimensions, device, fingerprint
    )
    checkpoint_path.unlink(missing_ok=True)
    return metrics


def _subset(data: UtteranceSet, tasks: list[str]) -> UtteranceSet:
    """The same utterances with only the label columns of `tasks` (a single-task network's view)."""
    view = copy.copy(data)
    columns = [data.tasks.index(t) for t in tasks]
    view.tasks = list(tasks)
    view.labels = data.labels[:, columns]
    return view


def _train_one(
    spec: NetworkSpec,
    system_name: str,
    system: Any,
    params: Any,
    fold: Fold,
    seed: int,
    train_set: UtteranceSet,
    val_set: UtteranceSet,
    device: torch.device,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    progress: bool,
) -> tuple[ModelConfig, SerModel, dict[str, Any]]:
    config = ModelConfig.from_params(params, spec.tasks, system.pooling)
    trainer = _NetworkTrainer(
        spec,
        config,
        _subset(train_set, spec.tasks),
        _subset(val_set, spec.tasks),
        params,
        fold.index,
        seed,
        device,
        describe=f"{system_name} fold{fold.index} seed{seed} {spec.name}",
        progress=progress,
    )
    finished = checkpoint["finished"].get(spec.name)
    if finished is not None:
        trainer.model.load_state_dict(finished["state"])
        return config, trainer.model, finished["summary"]
    current = checkpoint.get("current")
    if current is not None and current.get("network") == spec.name:
        trainer.load_state(current)

    def save(state: dict[str, Any]) -> None:
        checkpoint["current"] = state
        checkpoint["epoch"] = state["epoch"]
        checkpoint["network"] = spec.name
        _atomic_torch_save(checkpoint, checkpoint_path)

    trainer.run(save)
    summary = trainer.summary()
    summary["history"] = trainer.history
    checkpoint["finished"][spec.name] = {"state": _cpu_state(trainer.model), "summary": summary}
    checkpoint.pop("current", None)
    _atomic_torch_save(checkpoint, checkpoint_path)
    return config, trainer.model, summary


def _per_network(values: dict[str, int]) -> int | dict[str, int]:
    """The single network's value (multi-task), or {dimension: value} (single-task)."""
    return next(iter(values.values())) if list(values) == [MTL_NETWORK] else values


def history_records(histories: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """history.json: one record per epoch. Multi-task: epoch, train_loss, val_loss, val_uar_<dim>,
    val_uar_mean, seconds, audio_seconds_per_second. Single-task: the networks' records of an epoch
    merged, their keys prefixed by the dimension (arousal_train_loss, ...), val_uar_<dim> kept as is;
    a network that stopped early has no keys in later epochs."""
    if list(histories) == [MTL_NETWORK]:
        return [{k: v for k, v in r.items() if k != "network"} for r in histories[MTL_NETWORK]]
    by_epoch: dict[int, dict[str, Any]] = {}
    for name, records in histories.items():
        for record in records:
            merged = by_epoch.setdefault(int(record["epoch"]), {"epoch": int(record["epoch"])})
            for key, value in record.items():
                if key in ("network", "epoch", "val_uar_mean"):
                    continue
                merged[key if key.startswith("val_uar_") else f"{name}_{key}"] = value
    return [by_epoch[e] for e in sorted(by_epoch)]


def _params_record(params: Any, system: Any, seed: int | None = None) -> dict[str, Any]:
    """The parameters metrics.json records; a seed sub-run's train section has its seed, not train.seeds."""
    train = dataclasses.asdict(params.train)
    if seed is not None:
        train.pop("seeds")
        train["seed"] = int(seed)
    return {
        "model": dataclasses.asdict(params.model),
        "train": train,
        "features": dataclasses.asdict(params.features),
        "system": dataclasses.asdict(system),
    }


def _finish(
    out_dir: Path,
    system_name: str,
    system: Any,
    params: Any,
    fold: Fold,
    seed: int,
    test_set: UtteranceSet,
    trained: dict[str, tuple[ModelConfig, SerModel, dict[str, Any]]],
    dimensions: list[str],
    device: torch.device,
    fingerprint: str,
) -> dict[str, Any]:
    """Score the test session with one seed's networks, write every output of its sub-run (metrics.json
    last) and return the metrics."""
    max_frames = params.features.max_frames
    frame_budget = params.train.batch_size * max_frames * EVAL_BATCH_FACTOR
    bf16 = device.type == "cuda" and params.train.bf16
    attention_items = (
        list(range(min(ATTENTION_UTTERANCES, len(test_set)))) if system.pooling == "attention" else []
    )
    probabilities: dict[str, np.ndarray] = {}
    attention_arrays: dict[str, np.ndarray] = {}
    for config, model, _ in trained.values():
        probs, attention = predict_utterances(
            model, _subset(test_set, config.tasks), max_frames, device, frame_budget, bf16, attention_items
        )
        probabilities.update(probs)
        for task, by_item in attention.items():
            for item, weights in by_item.items():
                attention_arrays[f"{test_set.ids[item]}__{task}"] = weights
    table = _prediction_table(test_set, probabilities, dimensions, system_name, fold)

    first_config = next(iter(trained.values()))[0]
    _write_model_dir(
        out_dir,
        system_name,
        max_frames,
        dimensions,
        {name: (config, _cpu_state(model)) for name, (config, model, _) in trained.items()},
        seed,
    )
    _write_parquet(table, out_dir / PREDICTIONS_FILE)
    if attention_arrays:
        attention_arrays["frame_hop_s"] = np.float64(first_config.hop_seconds)
        attention_arrays["frame_s"] = np.float64(first_config.frame_samples / first_config.sample_rate)
        _write_npz(attention_arrays, out_dir / ATTENTION_FILE)
    else:
        (out_dir / ATTENTION_FILE).unlink(missing_ok=True)
    write_json(out_dir / HISTORY_FILE, history_records({n: s["history"] for n, (_, _, s) in trained.items()}))

    train_seconds = sum(s["train_seconds"] for _, _, s in trained.values())
    train_audio = sum(s["train_audio_seconds"] for _, _, s in trained.values())
    validation: dict[str, float] = {}
    for _, _, summary in trained.values():
        validation.update(summary["validation"])
    metrics = {
        "system": system_name,
        "kind": system.kind,
        "fold": fold.index,
        "test_session": fold.test_session,
        "validation_speaker": fold.validation_speaker,
        "seed": seed,
        "evaluation": evaluate_predictions(table),
        "validation": validation,
        "best_epoch": _per_network({name: s["best_epoch"] for name, (_, _, s) in trained.items()}),
        "epochs_run": _per_network({name: s["epochs_run"] for name, (_, _, s) in trained.items()}),
        "networks": {
            name: {k: s[k] for k in ("best_epoch", "epochs_run", "validation", "train_seconds")}
            for name, (_, _, s) in trained.items()
        },
        "train_seconds": train_seconds,
        "train_audio_seconds": train_audio,
        "audio_seconds_per_second": train_audio / train_seconds if train_seconds > 0 else float("nan"),
        "device": str(device),
        "parameters": {name: s["parameters"] for name, (_, _, s) in trained.items()},
        "utterances": {
            "train": len(fold.train_ids),
            "validation": len(fold.validation_ids),
            "test": len(test_set),
        },
        "fingerprint": fingerprint,
        "params": _params_record(params, system, seed),
    }
    write_json(out_dir / RUN_METRICS_FILE, metrics)
    return metrics


def _mean_over_seeds(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean in float64, the seeds in train.seeds order (one seed: that seed's values)."""
    return np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)


def _seed_keyed(values: dict[int, Any]) -> Any:
    """One seed: its value as is; several: {"seed<s>": int} or {"seed<s>_<dimension>": int}, flat."""
    if len(values) == 1:
        return next(iter(values.values()))
    flat: dict[str, Any] = {}
    for seed, value in values.items():
        prefix = f"{SEED_DIR_PREFIX}{seed}"
        if isinstance(value, dict):
            flat.update({f"{prefix}_{key}": item for key, item in value.items()})
        else:
            flat[prefix] = value
    return flat


def combine_seeds(
    out_dir: Path | str, seeds: list[int], params: Any, system_name: str, fingerprint: str
) -> dict[str, Any]:
    """Write the fold's outputs for the seed ensemble from its finished seed sub-runs' files (never from
    memory, so that seeds trained in one go and seeds resumed one by one give identical bytes), metrics.json
    last; returns the fold's metrics. See the module docstring for what each file holds."""
    out_dir = Path(out_dir)
    system = params.systems[system_name]
    runs = []
    for seed in seeds:
        path = seed_dir(out_dir, seed)
        metrics = _read_metrics(path / RUN_METRICS_FILE)
        if not metrics:
            raise RuntimeError(
                f"{path / RUN_METRICS_FILE}: missing or unreadable; seed {seed} is not finished"
            )
        table = validate_predictions(pd.read_parquet(path / PREDICTIONS_FILE), str(path / PREDICTIONS_FILE))
        runs.append((seed, path, metrics, table))
    first_path, first, first_table = runs[0][1:]
    rows = ["utterance_id", "dimension", "label"]
    for _, path, _, table in runs[1:]:
        if not table[rows].equals(first_table[rows]):
            raise RuntimeError(
                f"{path / PREDICTIONS_FILE}: other test rows than {first_path / PREDICTIONS_FILE}"
            )

    # Predictions: per utterance and dimension the mean of the seeds' probabilities, the class its argmax.
    columns = list(PROBABILITY_COLUMNS)
    probabilities = _mean_over_seeds([table[columns].to_numpy() for *_, table in runs])
    combined = first_table.copy()
    combined[columns] = probabilities
    combined["prediction"] = probabilities.argmax(axis=1)
    combined = validate_predictions(combined, str(out_dir / PREDICTIONS_FILE))

    # Model: every seed's networks (the state dicts copied byte for byte).
    with atomic_directory(out_dir / MODEL_DIR) as tmp:
        networks: dict[str, dict[str, Any]] = {}
        for seed, path, _, _ in runs:
            description = json.loads((path / MODEL_DIR / "config.json").read_text())
            for name, entry in description["networks"].items():
                key = f"{SEED_DIR_PREFIX}{seed}_{name}"
                shutil.copyfile(path / MODEL_DIR / entry["file"], tmp / f"{key}.pt")
                networks[key] = {
                    "file": f"{key}.pt",
                    "config": entry["config"],
                    "network": name,
                    "seed": seed,
                }
        write_json(
            tmp / "config.json",
            {
                "format": MODEL_FORMAT,
                "system": description["system"],
                "dimensions": description["dimensions"],
                "max_frames": description["max_frames"],
                "seeds": list(seeds),
                "networks": networks,
            },
        )
    _write_parquet(combined, out_dir / PREDICTIONS_FILE)

    # Attention: the mean of the seeds' weights (frame i is the same audio for every seed's network).
    if (first_path / ATTENTION_FILE).is_file():
        loaded = []
        for _, path, _, _ in runs:
            with np.load(path / ATTENTION_FILE) as archive:
                loaded.append({key: np.asarray(archive[key]) for key in archive.files})
        attention = dict(loaded[0])
        for key in attention:
            if "__" in key:
                attention[key] = _mean_over_seeds([arrays[key] for arrays in loaded]).astype(np.float32)
        _write_npz(attention, out_dir / ATTENTION_FILE)
    else:
        (out_dir / ATTENTION_FILE).unlink(missing_ok=True)

    histories = {seed: json.loads((path / HISTORY_FILE).read_text()) for seed, path, _, _ in runs}
    if len(histories) == 1:
        history = next(iter(histories.values()))
    else:
        by_epoch: dict[int, dict[str, Any]] = {}
        for seed, records in histories.items():
            for record in records:
                merged = by_epoch.setdefault(int(record["epoch"]), {"epoch": int(record["epoch"])})
                merged.update({f"{SEED_DIR_PREFIX}{seed}_{k}": v for k, v in record.items() if k != "epoch"})
        history = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    write_json(out_dir / HISTORY_FILE, history)

    per_seed = {seed: metrics for seed, _, metrics, _ in runs}
    train_seconds = sum(float(m["train_seconds"]) for m in per_seed.values())
    train_audio = sum(float(m["train_audio_seconds"]) for m in per_seed.values())
    devices = sorted({str(m["device"]) for m in per_seed.values()})
    metrics = {
        "system": system_name,
        "kind": system.kind,
        "fold": first["fold"],
        "test_session": first["test_session"],
        "validation_speaker": first["validation_speaker"],
        "seeds": list(seeds),
        "evaluation": evaluate_predictions(combined),
        "validation": {
            dimension: float(_mean_over_seeds([m["validation"][dimension] for m in per_seed.values()]))
            for dimension in first["validation"]
        },
        "best_epoch": _seed_keyed({seed: m["best_epoch"] for seed, m in per_seed.items()}),
        "epochs_run": _seed_keyed({seed: m["epochs_run"] for seed, m in per_seed.items()}),
        "networks": {
            f"{SEED_DIR_PREFIX}{seed}_{name}": {**entry, "seed": seed}
            for seed, m in per_seed.items()
            for name, entry in m["networks"].items()
        },
        "seed_runs": {
            str(seed): {
                "dir": seed_dir(out_dir, seed).name,
                "fingerprint": m["fingerprint"],
                **{
                    k: m[k] for k in ("evaluation", "validation", "best_epoch", "epochs_run", "train_seconds")
                },
            }
            for seed, m in per_seed.items()
        },
        "train_seconds": train_seconds,
        "audio_seconds_per_second": train_audio / train_seconds if train_seconds > 0 else float("nan"),
        "device": ",".join(devices),
        "parameters": first["parameters"],
        "utterances": first["utterances"],
        "fingerprint": fingerprint,
        "params": _params_record(params, system),
    }
    write_json(out_dir / RUN_METRICS_FILE, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------
# Prediction on new audio


class Predictor:
    """A trained system as a function of one waveform; pools segments exactly as evaluation does. Where
    several networks predict a dimension (a fold's seeds), their probabilities and attention weights are
    averaged, as the fold's predictions.parquet and attention.npz are (see `combine_seeds`)."""

    def __init__(
        self,
        networks: dict[str, SerModel],
        dimensions: list[str],
        max_frames: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.networks = {name: model.to(self.device).eval() for name, model in networks.items()}
        self.dimensions = list(dimensions)
        self.max_frames = max_frames
        first = next(iter(self.networks.values())).config
        self.sample_rate = first.sample_rate
        self.frame_hop_s = first.hop_seconds

    def predict(self, waveform: np.ndarray) -> dict[str, dict[str, Any]]:
        """{dimension: {"class", "probabilities" [low, medium, high], "attention" over frames}} for mono
        float32 audio in [-1, 1] at `sample_rate` (int16 PCM is accepted too)."""
        samples = np.asarray(waveform)
        if samples.ndim == 2 and 1 in samples.shape:
            samples = samples.reshape(-1)
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"expected a non-empty mono waveform, got shape {samples.shape}")
        if samples.dtype != np.int16:
            samples = samples.astype(np.float32, copy=False)
        source = WaveformSource(samples)
        pooled_by_task: dict[str, list[np.ndarray]] = {}
        attention_by_task: dict[str, list[np.ndarray]] = {}
        for model in self.networks.values():
            cfg = model.config
            segments = evaluation_segments(samples.size, cfg.frame_samples, cfg.hop_samples, self.max_frames)
            budget = max(s.frames for s in segments) * len(segments)
            probs, weights = predict_segments(
                model, source, segments, self.device, budget, keep_attention=True
            )
            items = np.zeros(len(segments), dtype=np.int64)
            frames = np.array([s.frames for s in segments], dtype=np.int64)
            for task in model.tasks:
                pooled_by_task.setdefault(task, []).append(pool_segments(items, frames, probs[task], 1)[0])
                attention_by_task.setdefault(task, []).append(utterance_attention(segments, weights[task]))
        result: dict[str, dict[str, Any]] = {}
        for task, pooled in pooled_by_task.items():
            mean = _mean_over_seeds(pooled)
            result[task] = {
                "class": int(mean.argmax()),
                "probabilities": [float(p) for p in mean],
                "attention": _mean_over_seeds(attention_by_task[task]).astype(np.float32),
            }
        return {d: result[d] for d in self.dimensions if d in result}


def load_predictor(model_dir: Path | str, device: str = "cpu") -> Any:
    """Rebuild the trained network(s) of a run directory's model/ folder (a fold's: every seed's)."""
    model_dir = Path(model_dir)
    from sermtl.model import egemaps

    if (model_dir / egemaps.MODEL_FILE).is_file():
        return egemaps.load_predictor(model_dir)  # the hand-crafted baseline
    description = json.loads((model_dir / "config.json").read_text())
    if description.get("format") not in MODEL_FORMATS:
        raise ValueError(f"{model_dir}: unsupported model format {description.get('format')!r}")
    networks = {}
    for name, entry in description["networks"].items():
        model = build_model(ModelConfig.from_dict(entry["config"]))
        state = torch.load(model_dir / entry["file"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        networks[name] = model
    return Predictor(networks, description["dimensions"], int(description["max_frames"]), device)
