"""Segments of utterances and padded batches, read straight from the memory-mapped audio store: the network
sees at most `features.max_frames` frames at once, yet every utterance is scored whole
(docs/design/batching.md)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sermtl.data.audio import AudioStore
from sermtl.model.network import frame_count

PCM_SCALE = np.float32(1.0 / 32768.0)  # exact for int16: every value is representable


@dataclass(frozen=True)
class Segment:
    item: int  # index of the utterance in its UtteranceSet (or 0 for a single waveform)
    start: int  # first sample, relative to the utterance
    length: int  # samples
    frames: int  # frames of the segment: its weight when pooling


def evaluation_segments(
    num_samples: int, frame_samples: int, hop_samples: int, max_frames: int, item: int = 0
) -> list[Segment]:
    """Consecutive segments of at most `max_frames` frames that together hold every frame exactly once."""
    total = int(frame_count(int(num_samples), frame_samples, hop_samples))
    segments = []
    for first in range(0, total, max_frames):
        frames = min(max_frames, total - first)
        start = first * hop_samples
        length = min(num_samples - start, (frames - 1) * hop_samples + frame_samples)
        segments.append(Segment(item, start, length, frames))
    return segments


def training_segment(
    num_samples: int,
    frame_samples: int,
    hop_samples: int,
    max_frames: int,
    rng: np.random.Generator,
    item: int = 0,
) -> Segment:
    """The whole utterance, or a random crop of `max_frames` frames when it is longer."""
    total = int(frame_count(int(num_samples), frame_samples, hop_samples))
    if total <= max_frames:
        return Segment(item, 0, int(num_samples), total)
    first = int(rng.integers(0, total - max_frames + 1))
    start = first * hop_samples
    length = min(num_samples - start, (max_frames - 1) * hop_samples + frame_samples)
    return Segment(item, start, length, max_frames)


class UtteranceSet:
    """The utterances of one split (train, validation or test): where their samples are, their labels."""

    def __init__(self, store: AudioStore, utterance_ids: Sequence[str], tasks: Sequence[str]) -> None:
        manifest = store.manifest.set_index("utterance_id", drop=False)
        rows = manifest.loc[list(utterance_ids)]
        self.store = store
        self.ids = [str(u) for u in rows["utterance_id"]]
        self.tasks = list(tasks)
        self.offsets = rows["offset"].to_numpy(np.int64)
        self.num_samples = rows["num_samples"].to_numpy(np.int64)
        self.improvised = rows["improvised"].to_numpy(bool)
        self.labels = np.stack([rows[f"{t}_class"].to_numpy(np.int64) for t in self.tasks], axis=1)

    def __len__(self) -> int:
        return len(self.ids)

    def samples(self, segment: Segment) -> np.ndarray:
        """int16 view of a segment's samples (zero-copy from the memmap)."""
        begin = int(self.offsets[segment.item]) + segment.start
        return self.store.samples[begin : begin + segment.length]

    def audio_seconds(self) -> float:
        return float(self.num_samples.sum()) / self.store.sample_rate


class WaveformSource:
    """A single in-memory waveform presented like an UtteranceSet (for prediction on new audio)."""

    def __init__(self, waveform: np.ndarray) -> None:
        self.waveform = waveform

    def samples(self, segment: Segment) -> np.ndarray:
        return self.waveform[segment.start : segment.start + segment.length]


@dataclass
class Batch:
    waveform: torch.Tensor  # [B, T] float32 in [-1, 1], zero-padded
    lengths: torch.Tensor  # [B] int64 samples
    segments: list[Segment]

    @property
    def items(self) -> np.ndarray:
        return np.fromiter((s.item for s in self.segments), dtype=np.int64, count=len(self.segments))

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(
            self.waveform.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            self.segments,
        )


def collate(source: UtteranceSet | WaveformSource, segments: Sequence[Segment], pin: bool = False) -> Batch:
    """Zero-padded float32 batch of segments; pinned host memory makes the copy to the GPU asynchronous."""
    longest = max(s.length for s in segments)
    waveform = torch.zeros(len(segments), longest, dtype=torch.float32, pin_memory=pin)
    view = waveform.numpy()
    for row, segment in enumerate(segments):
        pcm = source.samples(segment)
        if pcm.dtype == np.int16:
            np.multiply(pcm, PCM_SCALE, out=view[row, : segment.length], casting="unsafe")
        else:
            view[row, : segment.length] = pcm
    lengths = torch.tensor([s.length for s in segments], dtype=torch.int64)
    if pin:
        lengths = lengths.pin_memory()
    return Batch(waveform, lengths, list(segments))


def training_batches(
    data: UtteranceSet,
    frame_samples: int,
    hop_samples: int,
    max_frames: int,
    batch_size: int,
    rng: np.random.Generator,
) -> list[list[Segment]]:
    """One epoch: one (cropped) segment per utterance, shuffled, cut into batches of `batch_size`
    (a lone last segment joins the previous batch)."""
    segments = [
        training_segment(int(n), frame_samples, hop_samples, max_frames, rng, item=i)
        for i, n in enumerate(data.num_samples)
    ]
    order = rng.permutation(len(segments))
    shuffled = [segments[i] for i in order]
    batches = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())  # batch statistics need more than one row
    return batches


def evaluation_batches(segments: Sequence[Segment], frame_budget: int) -> list[list[int]]:
    """Indices into `segments`, longest first (little padding), packed so rows x frames <= frame_budget."""
    order = sorted(
        range(len(segments)), key=lambda i: (-segments[i].length, segments[i].item, segments[i].start)
    )
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = segments[current[0]].frames if current else segments[index].frames
        if current and (len(current) + 1) * longest > frame_budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def iterate(
    source: UtteranceSet | WaveformSource,
    batches: Sequence[Sequence[Segment]],
    pin: bool = False,
    workers: int = 0,
) -> Iterator[Batch]:
    """Collated batches in order; with `workers` > 0, the next ones are collated in background threads
    (numpy copies release the GIL) while the current one trains. Order never depends on timing."""
    if workers <= 0:
        for segments in batches:
            yield collate(source, segments, pin=pin)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Batch]] = deque()
        upcoming = iter(batches)
        for segments in upcoming:
            pending.append(pool.submit(collate, source, segments, pin))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pool_segments(items: np.ndarray, frames: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Utterance probabilities [count, classes]: frame-weighted mean of their segments' probabilities."""
    weights = frames.astype(np.float64)
    total = np.zeros((count, probabilities.shape[1]), dtype=np.float64)
    np.add.at(total, items, probabilities.astype(np.float64) * weights[:, None])
    norm = np.zeros(count, dtype=np.float64)
    np.add.at(norm, items, weights)
    if (norm == 0).any():
        raise ValueError("an utterance has no segment")
    return total / norm[:, None]
