"""The end-to-end network: raw waveform -> per-frame CNN -> recurrent layers -> per-task pooling -> heads
(Zhang, Wu & Schuller, ICASSP 2019). One readable file; the shapes and the masking: docs/design/network.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

NUM_CLASSES = 3
POOLINGS = ("attention", "mean")
RNNS = ("gru", "lstm")
LOG_FLOOR = 1e-4  # added before the log of the (non-negative) frame vector; -80 dBFS-ish


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network; saved as JSON next to its state dict."""

    tasks: list[str] = field(default_factory=lambda: ["arousal", "valence", "dominance"])
    sample_rate: int = 16000
    frame_samples: int = 640  # 40 ms at 16 kHz
    hop_samples: int = 160  # 10 ms
    conv_channels: int = 40
    conv_kernel: int = 40
    conv_pool: int = 2
    rnn: str = "gru"
    rnn_hidden: int = 128
    rnn_layers: int = 2
    dropout: float = 0.0
    pooling: str = "attention"
    num_classes: int = NUM_CLASSES
    # Not in the reference: log-compress the per-frame vector (level ratios such as spectral tilt become
    # differences) and batch-normalise it (raw 16-bit audio is tiny; without it the recurrent layers
    # learn slowly). Both measurably help on small data; set false for the plain Trigeorgis front end.
    frame_log: bool = True
    frame_norm: bool = True

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("a model needs at least one task")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.rnn not in RNNS:
            raise ValueError(f"rnn {self.rnn!r} is not one of {', '.join(RNNS)}")
        if self.hop_samples <= 0 or self.frame_samples <= 0:
            raise ValueError("frame and hop must be positive")
        after_first = (self.frame_samples - self.conv_kernel + 1) // self.conv_pool
        if after_first - self.conv_kernel + 1 < 1:
            raise ValueError(
                f"a frame of {self.frame_samples} samples is too short for two convolutions of kernel "
                f"{self.conv_kernel} with pooling {self.conv_pool}"
            )

    @classmethod
    def from_params(cls, params: Any, tasks: list[str], pooling: str) -> ModelConfig:
        """Build from the typed params (features + model sections) for the given tasks and pooling."""
        rate = params.data.sample_rate
        return cls(
            tasks=list(tasks),
            sample_rate=rate,
            frame_samples=round(params.features.frame_ms * rate / 1000),
            hop_samples=round(params.features.hop_ms * rate / 1000),
            conv_channels=params.model.conv_channels,
            conv_kernel=params.model.conv_kernel,
            conv_pool=params.model.conv_pool,
            rnn=params.model.rnn,
            rnn_hidden=params.model.rnn_hidden,
            rnn_layers=params.model.rnn_layers,
            dropout=params.model.dropout,
            pooling=pooling,
            frame_log=params.model.frame_log,
            frame_norm=params.model.frame_norm,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**raw)

    @property
    def hop_seconds(self) -> float:
        return self.hop_samples / self.sample_rate

    def frames_to_samples(self, frames: int) -> int:
        """Samples spanned by `frames` consecutive frames (the extent of a segment)."""
        return (frames - 1) * self.hop_samples + self.frame_samples if frames > 0 else 0


def frame_count(lengths: Tensor | int, frame_samples: int = 640, hop_samples: int = 160) -> Tensor | int:
    """Frames covering `lengths` samples: the last frame may run past the end (it is zero-padded).

    Every sample is covered; any utterance, however short, gets at least one frame.
    """
    if isinstance(lengths, Tensor):
        excess = (lengths - frame_samples).clamp(min=0)
        return 1 + torch.div(excess + hop_samples - 1, hop_samples, rounding_mode="floor")
    excess = max(int(lengths) - frame_samples, 0)
    return 1 + (excess + hop_samples - 1) // hop_samples


class FrameEncoder(nn.Module):
    """The per-frame convolutional front end (Trigeorgis et al. 2016): one vector per 40 ms frame."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, k = config.conv_channels, config.conv_kernel
        self.conv1 = nn.Conv1d(1, c, k)
        self.pool = nn.MaxPool1d(config.conv_pool)
        self.conv2 = nn.Conv1d(c, c, k)
        self.log = config.frame_log
        # Statistics over the valid frames only: padded frames never reach the encoder.
        self.norm = nn.BatchNorm1d(c) if config.frame_norm else None

    def forward(self, frames: Tensor) -> Tensor:  # [N, frame] -> [N, C]
        x = self.pool(torch.relu(self.conv1(frames.unsqueeze(1))))
        x = torch.relu(self.conv2(x))
        x = x.amax(dim=-1).float()  # the rest of the network runs in float32 (it is cheap)
        if self.log:
            x = torch.log(x + LOG_FLOOR)
        if self.norm is not None:
            x = self.norm(x)
        return x


class SerModel(nn.Module):
    """Shared front end and recurrent layers; one pooling and one 3-class head per task."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = FrameEncoder(config)
        rnn_class = nn.GRU if config.rnn == "gru" else nn.LSTM
        self.rnn = rnn_class(
            input_size=config.conv_channels,
            hidden_size=config.rnn_hidden,
            num_layers=config.rnn_layers,
            batch_first=True,
            dropout=config.dropout if config.rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        # e_t = w . h_t: one w per task (no bias: a constant shift would not change the softmax).
        self.attention = (
            nn.ModuleDict({t: nn.Linear(config.rnn_hidden, 1, bias=False) for t in config.tasks})
            if config.pooling == "attention"
            else None
        )
        self.heads = nn.ModuleDict(
            {t: nn.Linear(config.rnn_hidden, config.num_classes) for t in config.tasks}
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def frame_mask(self, lengths: Tensor, frames: int) -> Tensor:
        """[B, F] True on the frames that belong to each utterance."""
        counts = frame_count(lengths, self.config.frame_samples, self.config.hop_samples)
        return torch.arange(frames, device=lengths.device)[None, :] < counts[:, None]

    def forward(self, waveform: Tensor, lengths: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """waveform [B, T] float, lengths [B] samples -> (logits {task: [B, 3]}, attention {task: [B, F]})."""
        cfg = self.config
        lengths = lengths.to(waveform.device)
        batch, total = waveform.shape
        frames = int(frame_count(int(lengths.max()), cfg.frame_samples, cfg.hop_samples))
        needed = cfg.frames_to_samples(frames)
        # Zero everything past each utterance's end, so padding content can never leak in.
        valid_samples = torch.arange(total, device=waveform.device)[None, :] < lengths[:, None]
        waveform = waveform * valid_samples
        if needed > total:
            waveform = nn.functional.pad(waveform, (0, needed - total))
        framed = waveform[:, :needed].unfold(1, cfg.frame_samples, cfg.hop_samples)  # [B, F, frame]
        mask = self.frame_mask(lengths, frames)  # [B, F]

        # All valid frames of the batch as one conv batch; padded frames are skipped altogether.
        encoded = self.encoder(framed[mask])  # [N, C]
        features = encoded.new_zeros(batch, frames, encoded.shape[-1])
        features[mask] = encoded
        # The recurrent layers stay in float32 under autocast (cheap; bf16 RNN kernels are not universal).
        # Unidirectional: padded frames come after the valid ones and cannot change their states.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            hidden, _ = self.rnn(features.float())  # [B, F, H]
        hidden = self.dropout(hidden)

        logits: dict[str, Tensor] = {}
        attention: dict[str, Tensor] = {}
        for task in cfg.tasks:
            if self.attention is not None:
                scores = self.attention[task](hidden).squeeze(-1).float()
                weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            else:
                weights = mask.float() / mask.sum(dim=1, keepdim=True).float()
            pooled = torch.bmm(weights.unsqueeze(1).to(hidden.dtype), hidden).squeeze(1)  # [B, H]
            logits[task] = self.heads[task](pooled)
            attention[task] = weights
        return logits, attention


def build_model(config: ModelConfig) -> SerModel:
    """A freshly initialised network for `config` (seed torch beforehand for reproducible weights)."""
    return SerModel(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
