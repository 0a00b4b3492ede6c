"""Benchmark: ingest + validate an IEMOCAP-scale synthetic corpus (10,039 utterances, ~12.4 h).

Each step runs as its own process, beside a floor measured in the same run: one process that only
reads and decodes every wav (what any ingestion must do), so ingest/floor is the overhead ratio.
Each step runs as its own process so that wall time and peak memory (max RSS from wait4) are those a
user sees from the CLI. Figures are medians over --repeats runs. The corpus is generated once and cached.

    uv run python bench/ingest/run.py [--repeats 3] [--utterances 10039]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache"
DECODE_FLOOR = (
    "import sys, pathlib, soundfile as sf\n"
    "for p in sorted(pathlib.Path(sys.argv[1]).glob('Session*/sentences/wav/*/*.wav')):\n"
    "    sf.read(p, dtype='float32')\n"
)


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=10039)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sermtl = [sys.executable, "-m", "sermtl.cli"]
    corpus = CACHE / f"iemocap_synth_{args.utterances}_{args.seed}" / "IEMOCAP_full_release"
    if not (corpus / "Session5").is_dir():
        print(
            f"generating {args.utterances} utterances into {corpus} (cached for later runs) ...", flush=True
        )
        synth_wall, _ = timed(
            [
                *sermtl,
                "synth",
                "--out",
                str(corpus),
                "--utterances",
                str(args.utterances),
                "--seed",
                str(args.seed),
                "--mean-duration",
                "4.45",
            ]
        )
        print(f"generated in {synth_wall:.1f} s", flush=True)

    runs = []
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        ingest_dir, validation_dir = Path(work) / "ingest", Path(work) / "validation"
        for repeat in range(args.repeats):
            ingest_wall, ingest_rss = timed(
                [*sermtl, "ingest", "--source", str(corpus), "--out", str(ingest_dir), "--force"]
            )
            validate_wall, validate_rss = timed(
                [*sermtl, "validate", "--ingest", str(ingest_dir), "--out", str(validation_dir)]
            )
            floor_wall, _ = timed([sys.executable, "-c", DECODE_FLOOR, str(corpus)])
            runs.append((ingest_wall, ingest_rss, validate_wall, validate_rss, floor_wall))
            print(
                f"run {repeat + 1}: ingest {ingest_wall:.1f} s ({ingest_rss:.2f} GiB), "
                f"validate {validate_wall:.1f} s ({validate_rss:.2f} GiB), decode floor {floor_wall:.1f} s",
                flush=True,
            )
        report = json.loads((ingest_dir / "report.json").read_text())

    ingest_wall = statistics.median(r[0] for r in runs)
    validate_wall = statistics.median(r[2] for r in runs)
    total = statistics.median(r[0] + r[2] for r in runs)
    peak = max(max(r[1], r[3]) for r in runs)
    floor = statistics.median(r[4] for r in runs)
    result = {
        "utterances": report["kept"],
        "audio_hours": round(report["audio_hours"], 3),
        "repeats": args.repeats,
        "median_ingest_s": round(ingest_wall, 2),
        "median_validate_s": round(validate_wall, 2),
        "median_total_s": round(total, 2),
        "median_decode_floor_s": round(floor, 2),
        "ingest_over_floor": round(statistics.median(r[0] / r[4] for r in runs), 2),
        "peak_rss_gib": round(peak, 3),
        "audio_hours_per_s": round(report["audio_hours"] / total, 4),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
