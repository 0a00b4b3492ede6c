"""Benchmark: where a demo training step's time goes on a CPU, per front-end setting and thread count.

One forward + backward + Adam step of the demo network (GRU 32, one layer) on a batch of 32 x 2.5 s of
noise, for a few front-end settings (channels, kernel, pooling, frame length); the median of 5 steps after
warm-up, as audio-seconds per second. `--profile` adds torch.profiler's top operators for the first
setting: run it once alone and once while a second trainer runs to see what oversubscription does.

    uv run python bench/train/frontend.py [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sermtl.model.network import ModelConfig, build_model

SETTINGS = [  # (conv_channels, conv_kernel, conv_pool, frame_samples): the demo's first
    (8, 16, 4, 320),
    (8, 8, 8, 320),
    (8, 16, 8, 320),
    (16, 16, 8, 320),
    (8, 16, 4, 640),
]
BATCH, SECONDS, RATE = 32, 2.5, 16000


def step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, lengths: torch.Tensor
) -> None:
    logits, _ = model(x, lengths)
    loss = sum(value.logsumexp(-1).mean() for value in logits.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = int(SECONDS * RATE)
    x, lengths = torch.randn(BATCH, samples) * 0.05, torch.full((BATCH,), samples)
    print(f"threads {args.threads}; batch {BATCH} x {SECONDS} s")
    for index, (channels, kernel, pool, frame) in enumerate(SETTINGS):
        torch.manual_seed(0)
        config = ModelConfig(
            frame_samples=frame,
            hop_samples=frame,
            conv_channels=channels,
            conv_kernel=kernel,
            conv_pool=pool,
            rnn_hidden=32,
            rnn_layers=1,
        )
        model = build_model(config)
        optimizer = torch.optim.Adam(model.parameters())
        step(model, optimizer, x, lengths)  # warm-up
        times = []
        for _ in range(5):
            started = time.perf_counter()
            step(model, optimizer, x, lengths)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(
            f"channels {channels:2d} kernel {kernel:2d} pool {pool} frame {frame}: "
            f"{median:.3f} s per step, {BATCH * SECONDS / median:.0f} audio-s/s"
        )
        if args.profile and index == 0:
            with torch.profiler.profile() as prof:
                step(model, optimizer, x, lengths)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
