"""Training one network with early stopping on the validation speaker. Every epoch reseeds from (seed,
fold, network, epoch) and the trainer's whole state is checkpointable, so a resumed run is identical."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sermtl.model.batching import UtteranceSet, iterate, training_batches
from sermtl.model.network import ModelConfig, build_model, count_parameters
from sermtl.train.inference import predict_utterances, validation_scores

MTL_NETWORK = "mtl"
EVAL_BATCH_FACTOR = 2  # evaluation batches hold this many times the training batch's frames


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


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


class NetworkTrainer:
    """Trains one network of a fold with early stopping; `state` is what the checkpoint holds."""

    def __init__(
        self,
        spec: NetworkSpec,
        config: ModelConfig,
        *,
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
            "model": cpu_state(self.model),
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
                    self.best_state = cpu_state(self.model)
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
