"""Benchmark: `evaluate.significance.significance_tests` at paper scale, beside a naive per-resample loop.

Data: 10,000 utterances x 3 dimensions x 5 systems (the proposed one and 4 baselines), each system
right on a given share of utterances, in memory in the prediction-table layout; the utterances belong to
10 speakers (2 per session) and 150 dialogs, as in IEMOCAP. The vectorised path runs the whole study
(12 comparisons, `--resamples` resamples each, bootstrap and then permutation, pairing and all) at the
resampling unit `--unit` (default: significance.unit's default). The naive path is what a first
implementation does at the utterance level: per resample, draw utterance indices (bootstrap) or a swap
mask (permutation) and call sermtl.evaluate.metrics.uar twice; it runs `--naive-resamples` resamples of one
comparison in the same repeat. The speed ratio is taken per repeat on the time per (comparison x
resample); figures are medians over `--repeats`. Peak RSS is the process maximum (ru_maxrss), which
includes the interpreter, pandas and the data.

    uv run python bench/significance/run.py [--repeats 3] [--resamples 10000] [--utterances 10000]
        [--unit speaker]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sermtl.evaluate.metrics import PREDICTION_COLUMNS, uar
from sermtl.evaluate.significance import UNITS, significance_tests, write_report
from sermtl.params import Params

ROOT = Path(__file__).resolve().parents[2]
DIMENSIONS = ["arousal", "valence", "dominance"]
ACCURACY = {
    "mtl_attention": 0.62,
    "mtl_mean": 0.6,
    "stl_attention": 0.58,
    "stl_mean": 0.55,
    "egemaps_linear": 0.5,
}


def build(utterances: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # session 1-5, dialog 1-30 of the session, speaker F or M: 10 speakers, 150 dialogs
    ids = np.array(
        [
            f"Ses{1 + i % 5:02d}F_impro{1 + i // 10 % 30:02d}_{'FM'[i // 5 % 2]}{i:05d}"
            for i in range(utterances)
        ]
    )
    parts = []
    for dimension in DIMENSIONS:
        labels = rng.choice(3, size=utterances, p=[0.3, 0.45, 0.25])
        for system, accuracy in ACCURACY.items():
            wrong = (labels + rng.integers(1, 3, utterances)) % 3
            predictions = np.where(rng.random(utterances) < accuracy, labels, wrong)
            parts.append(
                pd.DataFrame(
                    {
                        "utterance_id": ids,
                        "system": system,
                        "fold": np.arange(utterances) % 5,
                        "test_session": np.arange(utterances) % 5 + 1,
                        "dimension": dimension,
                        "improvised": np.arange(utterances) % 2 == 0,
                        "label": labels,
                        "prediction": predictions,
                        "prob_low": 1 / 3,
                        "prob_medium": 1 / 3,
                        "prob_high": 1 / 3,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True).astype(PREDICTION_COLUMNS)


def naive_seconds_per_resample(predictions: pd.DataFrame, kind: str, resamples: int, seed: int) -> float:
    """One comparison (proposed vs the first baseline, first dimension), one resample at a time."""
    rows = predictions[predictions["dimension"] == DIMENSIONS[0]]
    first = rows[rows["system"] == "mtl_attention"].set_index("utterance_id")
    second = rows[rows["system"] == "mtl_mean"].set_index("utterance_id").loc[first.index]
    labels = first["label"].to_numpy()
    a, b = first["prediction"].to_numpy(), second["prediction"].to_numpy()
    rng = np.random.default_rng(seed)
    n = len(labels)
    out = np.empty(resamples)
    start = time.perf_counter()
    for i in range(resamples):
        if kind == "bootstrap":
            index = rng.integers(0, n, n)
            out[i] = uar(labels[index], a[index]) - uar(labels[index], b[index])
        else:
            swap = rng.random(n) < 0.5
            out[i] = uar(labels, np.where(swap, b, a)) - uar(labels, np.where(swap, a, b))
    return (time.perf_counter() - start) / resamples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=10000)
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--naive-resamples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unit", choices=UNITS, default=Params().significance.unit)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "significance.json")
    args = parser.parse_args()

    predictions = build(args.utterances, args.seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    baselines = [s for s in ACCURACY if s != "mtl_attention"]
    base = Params()
    params = {
        kind: dataclasses.replace(
            base,
            significance=dataclasses.replace(
                base.significance,
                baselines=baselines,
                resamples=args.resamples,
                resampling=kind,
                unit=args.unit,
            ),
        )
        for kind in ("bootstrap", "permutation")
    }
    comparisons = len(baselines) * len(DIMENSIONS)
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            run: dict[str, float] = {}
            for kind in ("bootstrap", "permutation"):
                start = time.perf_counter()
                report = significance_tests(predictions, params[kind])
                run[f"{kind}_s"] = time.perf_counter() - start
                run[f"{kind}_per_resample_s"] = run[f"{kind}_s"] / (comparisons * args.resamples)
                naive = naive_seconds_per_resample(
                    predictions, kind, args.naive_resamples, args.seed + repeat
                )
                run[f"naive_{kind}_per_resample_s"] = naive
                run[f"{kind}_speedup"] = naive / run[f"{kind}_per_resample_s"]
            start = time.perf_counter()
            write_report(report, Path(work) / "out")
            run["write_report_s"] = time.perf_counter() - start
            runs.append(run)
            print(
                f"run {repeat + 1}: bootstrap {run['bootstrap_s']:.2f} s, "
                f"permutation {run['permutation_s']:.2f} s "
                f"({comparisons} comparisons x {args.resamples} resamples, unit {args.unit}); "
                "naive per resample "
                f"{1e3 * run['naive_bootstrap_per_resample_s']:.2f} / "
                f"{1e3 * run['naive_permutation_per_resample_s']:.2f} ms -> speed-up "
                f"{run['bootstrap_speedup']:.0f}x / {run['permutation_speedup']:.0f}x; "
                f"report files {run['write_report_s']:.2f} s",
                flush=True,
            )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    result = {
        "utterances": args.utterances,
        "dimensions": len(DIMENSIONS),
        "baselines": len(baselines),
        "resamples": args.resamples,
        "unit": args.unit,
        "clusters": report.comparisons[0].clusters,
        "naive_resamples": args.naive_resamples,
        "repeats": args.repeats,
        "median_bootstrap_s": round(median("bootstrap_s"), 3),
        "median_permutation_s": round(median("permutation_s"), 3),
        "median_write_report_s": round(median("write_report_s"), 3),
        "median_naive_bootstrap_ms_per_resample": round(1e3 * median("naive_bootstrap_per_resample_s"), 3),
        "median_naive_permutation_ms_per_resample": round(
            1e3 * median("naive_permutation_per_resample_s"), 3
        ),
        "median_bootstrap_us_per_resample": round(1e6 * median("bootstrap_per_resample_s"), 3),
        "median_permutation_us_per_resample": round(1e6 * median("permutation_per_resample_s"), 3),
        "median_bootstrap_speedup": round(median("bootstrap_speedup"), 1),
        "median_permutation_speedup": round(median("permutation_speedup"), 1),
        "rss_after_data_gib": round(rss_data, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
