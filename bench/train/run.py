"""Benchmark: training throughput of `mtl_attention`, the sermtl path against a naive path, side by side.

- sermtl path: segments read from the memory-mapped int16 audio store, pinned memory and non-blocking
  copies on CUDA, bf16 autocast on CUDA (train.bf16), optional torch.compile (train.compile);
- naive path: a torch Dataset that decodes each utterance's wav file with soundfile on every access,
  a DataLoader that pads, fp32, no compile.

Both train the same network (params.yaml's model/features for the chosen profile) on the same
crops for the same number of steps, alternating, `--repeats` times; figures are medians, ratios are
taken per repeat. Throughput is audio-seconds of training data per wall-second (forward + backward +
optimiser step). Model FLOPs per audio-second come from torch's FlopCounterMode.

    uv run python bench/train/run.py [--profile demo|paper] [--steps 20] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache"
TASKS = ["arousal", "valence", "dominance"]


def prepare(utterances: int, mean_duration: float) -> tuple[Path, Path]:
    corpus = CACHE / f"train_synth_{utterances}_{mean_duration}" / "IEMOCAP_full_release"
    store = corpus.parent / "store"
    sermtl = [sys.executable, "-m", "sermtl.cli"]
    if not (corpus / "Session5").is_dir():
        subprocess.run(
            [
                *sermtl,
                "synth",
                "--out",
                str(corpus),
                "--utterances",
                str(utterances),
                "--mean-duration",
                str(mean_duration),
            ],
            check=True,
            cwd=ROOT,
        )
    if not (store / "manifest.parquet").is_file():
        subprocess.run(
            [*sermtl, "ingest", "--source", str(corpus), "--out", str(store)], check=True, cwd=ROOT
        )
    return corpus, store


def load_params(profile: str):
    from sermtl.params import params_from_dict

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = profile
    return params_from_dict(raw)


class NaiveWavDataset(torch.utils.data.Dataset):
    """Decodes the wav file on every access: what a first implementation usually does."""

    def __init__(self, corpus: Path, wav_paths: list[str], labels: np.ndarray, crops: list[tuple[int, int]]):
        self.corpus, self.wav_paths, self.labels, self.crops = corpus, wav_paths, labels, crops

    def __len__(self) -> int:
        return len(self.wav_paths)

    def __getitem__(self, index: int):
        samples, _ = sf.read(self.corpus / self.wav_paths[index], dtype="float32")
        start, length = self.crops[index]
        return torch.from_numpy(samples[start : start + length].copy()), torch.from_numpy(self.labels[index])


def pad_collate(items):
    lengths = torch.tensor([len(w) for w, _ in items])
    waveform = torch.nn.utils.rnn.pad_sequence([w for w, _ in items], batch_first=True)
    return waveform, lengths, torch.stack([label for _, label in items])


def run_steps(model, optimizer, batches, device, bf16: bool) -> tuple[float, float]:
    """(audio seconds, wall seconds) for the given iterable of (waveform, lengths, labels) batches."""
    from sermtl.train.training import multitask_loss

    audio = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for waveform, lengths, labels in batches:
        waveform = waveform.to(device, non_blocking=True)
        lengths_d = lengths.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(waveform, lengths_d)
        loss = multitask_loss(logits, labels, TASKS, dict.fromkeys(TASKS, 1.0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        audio += float(lengths.sum()) / 16000.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return audio, time.perf_counter() - start


def flops_per_audio_second(model, device, sample_rate: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    waveform = torch.randn(4, 4 * sample_rate, device=device) * 0.1
    lengths = torch.full((4,), 4 * sample_rate, device=device)
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(waveform, lengths)
        sum(v.float().sum() for v in logits.values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 16.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="demo", choices=["demo", "paper"])
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--mean-duration", type=float, default=2.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)"
    )
    args = parser.parse_args()

    from sermtl.data.audio import AudioStore
    from sermtl.model.batching import UtteranceSet, collate, training_batches
    from sermtl.model.network import ModelConfig, build_model
    from sermtl.train.training import resolve_device

    params = load_params(args.profile)
    device = resolve_device(args.device, params)
    corpus, store_dir = prepare(args.utterances, args.mean_duration)
    store = AudioStore(store_dir)
    data = UtteranceSet(store, list(store.manifest["utterance_id"]), TASKS)
    config = ModelConfig.from_params(params, TASKS, "attention")
    batch_size, max_frames = params.train.batch_size, params.features.max_frames
    cuda = device.type == "cuda"
    torch.manual_seed(0)

    def fresh_model():
        torch.manual_seed(0)
        model = build_model(config).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=params.train.learning_rate)

    def epoch_segments(seed: int):
        batches = training_batches(
            data,
            config.frame_samples,
            config.hop_samples,
            max_frames,
            batch_size,
            np.random.default_rng(seed),
        )
        return batches[: args.steps]

    def fast_batches(segment_batches):
        for segments in segment_batches:
            batch = collate(data, segments, pin=cuda)
            labels = torch.from_numpy(data.labels[[s.item for s in segments]])
            yield batch.waveform, batch.lengths, labels

    def naive_batches(segment_batches):
        flat = [s for batch in segment_batches for s in batch]
        wav_paths = [str(store.manifest["wav_path"].iat[s.item]) for s in flat]
        dataset = NaiveWavDataset(
            corpus, wav_paths, data.labels[[s.item for s in flat]], [(s.start, s.length) for s in flat]
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_collate
        )
        yield from loader

    rows = []
    for repeat in range(args.repeats + 1):  # repeat 0 warms up (allocator, kernels, page cache)
        segments = epoch_segments(repeat)
        measured = {}
        for name, batches, bf16 in (
            ("sermtl", fast_batches, cuda and params.train.bf16),
            ("naive", naive_batches, False),
        ):
            model, optimizer = fresh_model()
            if name == "sermtl" and params.train.compile:
                model = torch.compile(model)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            audio, wall = run_steps(model, optimizer, batches(segments), device, bf16)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            measured[name] = (audio / wall, peak)
        if repeat:
            rows.append(measured)
            print(
                f"repeat {repeat}: sermtl {measured['sermtl'][0]:.1f} audio-s/s, "
                f"naive {measured['naive'][0]:.1f} audio-s/s, "
                f"ratio {measured['sermtl'][0] / measured['naive'][0]:.2f}",
                flush=True,
            )

    model, _ = fresh_model()
    flops = flops_per_audio_second(model, device, config.sample_rate)
    fast = statistics.median(r["sermtl"][0] for r in rows)
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "profile": args.profile,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "batch_size": batch_size,
        "max_frames": max_frames,
        "median_sermtl_audio_s_per_s": round(fast, 1),
        "median_naive_audio_s_per_s": round(statistics.median(r["naive"][0] for r in rows), 1),
        "median_ratio": round(statistics.median(r["sermtl"][0] / r["naive"][0] for r in rows), 2),
        "model_gflop_per_audio_s": round(flops / 1e9, 3),
        "achieved_tflops": round(fast * flops / 1e12, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if cuda:
        result["peak_gpu_gib_sermtl"] = round(max(r["sermtl"][1] for r in rows), 2)
        result["peak_gpu_gib_naive"] = round(max(r["naive"][1] for r in rows), 2)
        result["share_of_bf16_peak"] = round(fast * flops / 1e12 / args.peak_tflops, 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
