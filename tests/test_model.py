"""The network, segmentation and loss: shapes, exact masking, pooling weights, loss weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sermtl.model.batching import (
    Segment,
    WaveformSource,
    collate,
    evaluation_batches,
    evaluation_segments,
    iterate,
    pool_segments,
    training_segment,
)
from sermtl.model.network import ModelConfig, build_model, count_parameters, frame_count
from sermtl.params import params_from_dict
from sermtl.train.training import class_balanced_weights, multitask_loss, network_specs

DIMS = ["arousal", "valence", "dominance"]
TINY = {
    "frame_samples": 160,
    "hop_samples": 80,
    "conv_channels": 4,
    "conv_kernel": 8,
    "conv_pool": 2,
    "rnn_hidden": 8,
    "rnn_layers": 2,
}


def tiny(tasks=DIMS, pooling="attention", **overrides) -> ModelConfig:
    return ModelConfig(tasks=list(tasks), pooling=pooling, **{**TINY, **overrides})


def model_for(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config)
    model.eval()
    return model


def test_frame_count_covers_every_sample():
    assert frame_count(1, 640, 160) == 1
    assert frame_count(640, 640, 160) == 1
    assert frame_count(641, 640, 160) == 2
    assert frame_count(800, 640, 160) == 2
    assert frame_count(801, 640, 160) == 3
    lengths = torch.tensor([1, 640, 641, 800, 801])
    assert frame_count(lengths, 640, 160).tolist() == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("tasks", [DIMS, ["valence"]])
def test_shapes_and_heads(pooling, tasks):
    model = model_for(tiny(tasks, pooling))
    lengths = torch.tensor([1000, 400, 81])
    logits, attention = model(torch.randn(3, 1000) * 0.1, lengths)
    frames = int(frame_count(1000, 160, 80))
    assert sorted(logits) == sorted(tasks) and sorted(attention) == sorted(tasks)
    assert len(model.heads) == len(tasks)
    for task in tasks:
        assert logits[task].shape == (3, 3)
        assert attention[task].shape == (3, frames)
    if pooling == "attention":
        assert model.attention is not None and len(model.attention) == len(tasks)
    else:
        assert model.attention is None


def test_stl_and_mtl_network_specs():
    mtl = params_from_dict({"profile": "paper"}).systems["mtl_attention"]
    stl = params_from_dict({"profile": "paper"}).systems["stl_mean"]
    assert [(s.name, s.tasks) for s in network_specs(mtl, DIMS)] == [("mtl", DIMS)]
    assert [(s.name, s.tasks) for s in network_specs(stl, DIMS)] == [(d, [d]) for d in DIMS]
    shared = count_parameters(model_for(tiny(DIMS)))
    single = count_parameters(model_for(tiny(["arousal"])))
    assert shared < 3 * single  # one shared trunk, three small heads


@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_masking_invariance(pooling, rnn):
    """An utterance's logits and attention are the same alone and padded in a batch with longer ones."""
    model = model_for(tiny(pooling=pooling, rnn=rnn))
    generator = torch.Generator().manual_seed(1)
    short = torch.randn(450, generator=generator) * 0.2
    longer = torch.randn(1300, generator=generator) * 0.2
    alone_logits, alone_attention = model(short[None], torch.tensor([450]))
    batch = torch.zeros(2, 1300)
    batch[0] = longer
    batch[1, :450] = short
    batch[1, 450:] = 5.0  # garbage in the padding must not matter
    logits, attention = model(batch, torch.tensor([1300, 450]))
    frames = int(frame_count(450, 160, 80))
    for task in DIMS:
        torch.testing.assert_close(logits[task][1], alone_logits[task][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            attention[task][1, :frames], alone_attention[task][0], rtol=1e-5, atol=1e-6
        )
        assert torch.all(attention[task][1, frames:] == 0)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_attention_sums_to_one_over_valid_frames(pooling):
    model = model_for(tiny(pooling=pooling))
    lengths = torch.tensor([2000, 700, 100])
    _, attention = model(torch.randn(3, 2000) * 0.1, lengths)
    counts = frame_count(lengths, 160, 80)
    for weights in attention.values():
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
        for row, count in enumerate(counts.tolist()):
            assert torch.all(weights[row, :count] > 0)
            assert torch.all(weights[row, count:] == 0)
        if pooling == "mean":
            torch.testing.assert_close(weights[1, : counts[1]], torch.full((int(counts[1]),), 1 / counts[1]))


def test_config_round_trip_and_from_params():
    config = tiny(["arousal"], "mean", rnn="lstm")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="too short"):
        ModelConfig(frame_samples=40, conv_kernel=40)
    params = params_from_dict({"profile": "paper", "features": {"frame_ms": 40, "hop_ms": 20}})
    built = ModelConfig.from_params(params, DIMS, "attention")
    assert (built.frame_samples, built.hop_samples, built.conv_channels) == (640, 320, 40)
    assert built.hop_seconds == pytest.approx(0.02)


def test_loss_weights_are_applied():
    torch.manual_seed(0)
    logits = {t: torch.randn(5, 3) for t in DIMS}
    labels = torch.randint(0, 3, (5, 3))
    ce = {t: F.cross_entropy(logits[t], labels[:, i]) for i, t in enumerate(DIMS)}
    weights = {"arousal": 2.0, "valence": 0.0, "dominance": 0.5}
    loss = multitask_loss(logits, labels, DIMS, weights)
    torch.testing.assert_close(loss, 2.0 * ce["arousal"] + 0.5 * ce["dominance"])
    equal = multitask_loss(logits, labels, DIMS, {t: 1.0 for t in DIMS})
    torch.testing.assert_close(equal, sum(ce.values()))


def test_class_balanced_weights_are_inverse_frequency():
    labels = np.array([[0], [1], [1], [1], [2], [2]])
    weights = class_balanced_weights(labels, ["arousal"])["arousal"]
    torch.testing.assert_close(weights, torch.tensor([6 / 3, 6 / 9, 6 / 6]))


def test_evaluation_segments_hold_every_frame_once():
    frame, hop = 640, 160
    for n in (1, 639, 640, 641, 5000, 80_000, 80_160, 81_000):
        total = int(frame_count(n, frame, hop))
        segments = evaluation_segments(n, frame, hop, max_frames=100)
        assert sum(s.frames for s in segments) == total
        assert all(s.frames <= 100 for s in segments)
        for s in segments:
            assert s.start + s.length <= n
            assert frame_count(s.length, frame, hop) == s.frames
        starts = [s.start // hop for s in segments]
        assert starts == list(range(0, total, 100))


def test_training_segment_is_a_grid_aligned_crop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40_000))
        s = training_segment(n, 640, 160, 50, rng)
        assert s.start % 160 == 0 and s.start + s.length <= n
        assert s.frames == min(50, int(frame_count(n, 640, 160)))
        assert frame_count(s.length, 640, 160) == s.frames


def test_pool_segments_weights_by_frames():
    items = np.array([0, 0, 1])
    frames = np.array([3, 1, 2])
    probs = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    pooled = pool_segments(items, frames, probs, 2)
    np.testing.assert_allclose(pooled, [[0.75, 0.25, 0], [0, 0, 1]])


def test_collate_pads_with_zeros_and_scales_int16():
    pcm = (np.arange(100, dtype=np.int16) - 50) * 100
    source = WaveformSource(pcm)
    batch = collate(source, [Segment(0, 10, 30, 1), Segment(0, 0, 100, 1)])
    assert batch.waveform.shape == (2, 100) and batch.lengths.tolist() == [30, 100]
    np.testing.assert_allclose(batch.waveform[0, :30].numpy(), pcm[10:40] / 32768.0)
    assert torch.all(batch.waveform[0, 30:] == 0)


def test_evaluation_batches_respect_the_frame_budget():
    segments = [Segment(i, 0, 160 * f, f) for i, f in enumerate([10, 3, 7, 10, 1, 5])]
    batches = evaluation_batches(segments, frame_budget=20)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) * max(segments[i].frames for i in batch) <= 20 or len(batch) == 1


def test_background_collation_gives_the_same_batches():
    pcm = np.arange(5000, dtype=np.int16)
    source = WaveformSource(pcm)
    batches = [[Segment(0, 160 * i, 300 + i, 1) for i in range(j, j + 3)] for j in range(0, 15, 3)]
    plain = list(iterate(source, batches))
    threaded = list(iterate(source, batches, workers=2))
    assert len(plain) == len(threaded) == 5
    for a, b in zip(plain, threaded, strict=True):
        assert torch.equal(a.waveform, b.waveform) and a.segments == b.segments


def test_frame_log_and_frame_norm_are_set_from_params():
    """model.frame_log / frame_norm in params.yaml reach the network: false/false is the plain front end."""
    plain = ModelConfig.from_params(
        params_from_dict({"model": {"frame_log": False, "frame_norm": False}}), ["arousal"], "attention"
    )
    assert (plain.frame_log, plain.frame_norm) == (False, False)
    encoder = build_model(plain).encoder
    assert encoder.log is False and encoder.norm is None
    default = ModelConfig.from_params(params_from_dict({}), ["arousal"], "attention")
    assert (default.frame_log, default.frame_norm) == (True, True)
