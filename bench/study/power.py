"""Why a registration gate passed or refused: the per-speaker spread of a study's paired differences.

With a cluster-level test (significance.unit: speaker) only K clusters carry the evidence: no p-value
can be below 2 / 2^K, and Holm over the family asks the best comparison for p <= alpha / family. This
prints, for every comparison of a significance.json, the pooled UAR difference, the mean and sd of the
per-speaker differences, how many speakers favour the proposed system, the test's p, and the effect the
test would need: a mean per-speaker difference of about z * sd, where z makes all K speakers favour the
proposed system with probability 0.8 if the per-speaker differences were normal (z = Phi^-1(0.8^(1/K))).

    uv run python bench/study/power.py local_outputs/pipeline_root/<run>/test-significance/significance
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from sermtl.evaluate.significance import read_report

POWER = 0.8


def needed_ratio(clusters: int, power: float = POWER) -> float:
    """Mean / sd of the per-cluster differences at which all clusters are positive with prob. `power`."""
    return statistics.NormalDist().inv_cdf(power ** (1.0 / clusters))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("significance", help="significance.json or the folder holding it")
    args = parser.parse_args(argv)
    report = read_report(Path(args.significance))
    comparisons = report.comparisons
    clusters = min(c.clusters for c in comparisons)
    alpha, family = float(report.params["alpha"]), len(comparisons)
    ratio = needed_ratio(clusters)
    print(
        f"unit {report.params['unit']}: {clusters} clusters; smallest possible p 2/2^{clusters} = "
        f"{2 / 2**clusters:.4f}; Holm's first threshold alpha/{family} = {alpha / family:.4f}; "
        f"all {clusters} positive with probability {POWER} needs mean/sd >= {ratio:.2f}"
        " (differences in UAR points)"
    )
    header = ("baseline", "dimension", "pooled diff", "per-speaker mean", "sd", "speakers > 0", "p", "needed")
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for c in comparisons:
        diffs = [s.difference for s in c.speakers]
        if len(diffs) < 2:
            continue
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        positive = sum(d > 0 for d in diffs)
        print(
            f"| {c.baseline} | {c.dimension} | {100 * c.difference:+.1f} | {100 * mean:+.1f} | "
            f"{100 * sd:.1f} | {positive}/{len(diffs)} | {c.p['resampling']:.3f} | "
            f"{100 * ratio * sd:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
