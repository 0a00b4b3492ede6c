"""Prediction over segments pooled to utterances: one path for validation, test scoring and the Predictor,
so that all three pool identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sermtl.evaluate.metrics import uar
from sermtl.model.batching import (
    Segment,
    UtteranceSet,
    WaveformSource,
    collate,
    evaluation_batches,
    evaluation_segments,
    pool_segments,
)
from sermtl.model.network import ModelConfig, SerModel, build_model
from sermtl.train.run_files import MODEL_FORMATS


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


def mean_over_seeds(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise mean in float64, the seeds in train.seeds order (one seed: that seed's values)."""
    return np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0)


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
            mean = mean_over_seeds(pooled)
            result[task] = {
                "class": int(mean.argmax()),
                "probabilities": [float(p) for p in mean],
                "attention": mean_over_seeds(attention_by_task[task]).astype(np.float32),
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
