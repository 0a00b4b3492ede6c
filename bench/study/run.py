"""Benchmark: the whole study on a synthetic corpus whose answer is known by construction (a simulation).

A scenario sets the effect settings of the generator (data.synth; sermtl.data.synth's docstring):
- hypothesis: cues concentrated in a short sub-span (cue_span 0.3) and shared between the dimensions
  (cue_sharing 1.0): the paper's hypothesis holds by construction, so attention should beat mean pooling
  and multi-task beat single-task. These are the committed data.synth settings (the `make run` corpus);
- null: the hypothesis corpus with null_labels: labels independent of the audio, so every system's UAR
  should lie in chance's interval and the registration gate should fail;
- spread: cues over the whole utterance (cue_span 1.0), dimensions independent (cue_sharing 0.0):
  neither attention nor multi-task has anything to gain.

It runs the study as a user does, each step as its own process: `sermtl synth --params P` (the corpus
is cached under bench/.cache/study/, it is deterministic), then `python -m pipelines.run_local --params P
--corpus C` (ingest, validate, train every (system, fold), results, significance, the gate, and the
registration when the gate passes) with a fresh MLflow store (sqlite) in the run's folder. P is the
repository's params.yaml with the scenario's data.synth, --profile, --seeds and --max-epochs applied.
Recorded: per system and dimension the pooled UAR (seed-averaged predictions), its spread over folds
and over seeds, chance's interval for that system (2.5-97.5% of the UAR of its pooled predictions
permuted over the utterances: a random classifier with the same prediction shares, on the same
labels), the comparisons of the significance report (p: the gate's test, corrected), the gate's
decision and reasons, and wall times: synth, the whole pipeline, each pipeline step (from kfp's log
lines; kfp.local trains two (system, fold) items at a time) and each (system, fold)'s training
seconds. The JSON result is printed at the end and written to the run's folder, beside the pipeline's
log and outputs.

    uv run python bench/study/run.py --scenario hypothesis [--utterances 400] [--seeds 0 1 2]
        [--profile demo|paper] [--max-epochs N] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache" / "study"
SCENARIOS = {
    "hypothesis": {"cue_span": 0.3, "cue_sharing": 1.0, "null_labels": False},
    "null": {"cue_span": 0.3, "cue_sharing": 1.0, "null_labels": True},
    "spread": {"cue_span": 1.0, "cue_sharing": 0.0, "null_labels": False},
}
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def study_params(args: argparse.Namespace, corpus: Path) -> dict:
    """The repository's params.yaml (as data) with the scenario and the command line's overrides."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = args.profile
    raw["data"]["corpus"] = str(corpus)
    synth = raw["data"]["synth"]
    synth.update(SCENARIOS[args.scenario], utterances=args.utterances, seed=args.seed)
    if args.mean_duration is not None:
        synth["mean_duration_s"] = args.mean_duration
    # train settings go where the profile reads them: a profile's own train overrides win over `train`.
    train = raw["train"] if args.profile == "paper" else raw["profiles"][args.profile].setdefault("train", {})
    if args.seeds is not None:
        train["seeds"] = args.seeds
    if args.max_epochs is not None:
        train["max_epochs"] = args.max_epochs
    if args.device is not None:
        train["device"] = args.device
    return raw


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> tuple[float, dict[str, dict]]:
    """Run `command`, its output to `log`; (wall seconds, per kfp task name in the order they ran: how
    many started, and the wall time from its first start to the next step's first start, or to its own
    last end for the last step). The DAG's steps run one after the other, but kfp.local runs up to two
    ParallelFor iterations (train-system-fold) at a time under one name, and then may lose one of their
    "finished" log lines: hence the spans from start to start."""
    started: dict[str, list[float]] = {}
    ended: dict[str, float] = {}
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            plain = ANSI.sub("", line)
            now = time.perf_counter() - start
            if match := TASK_START.search(plain):
                started.setdefault(match[1], []).append(now)
                print(f"  [{now:7.1f} s] {match[1]} ({len(started[match[1]])}) ...", flush=True)
            elif match := TASK_END.search(plain):
                ended[match[1]] = now
                print(f"  [{now:7.1f} s] {match[1]} {match[2]}", flush=True)
        code = process.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(command)}; log: {log}")
    names = list(started)  # in the order of their first start
    steps = {}
    for i, name in enumerate(names):
        until = started[names[i + 1]][0] if i + 1 < len(names) else ended.get(name, wall)
        steps[name] = {"tasks": len(started[name]), "wall_s": round(until - started[name][0], 1)}
    return wall, steps


def training_seconds(run_root: Path) -> dict[str, dict[str, float]]:
    """Per system: training seconds of each fold (metrics.json `train_seconds`, all seeds and networks)."""
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    for path in sorted(
        run_root.glob("pipeline_root/sermtl-*/for-loop-*/train-system-fold/trained_run/metrics.json")
    ):
        metrics = json.loads(path.read_text())
        seconds[metrics["system"]][f"fold{metrics['fold']}"] = round(
            float(metrics.get("train_seconds", 0.0)), 1
        )
    return {system: dict(sorted(folds.items())) for system, folds in sorted(seconds.items())}


def chance_interval(labels: np.ndarray, predictions: np.ndarray, resamples: int, rng) -> list[float]:
    """2.5 and 97.5 percentiles of the UAR of `predictions` permuted over the utterances: a random
    classifier with the same prediction shares, on the same labels."""
    shuffled = rng.permuted(np.broadcast_to(predictions, (resamples, predictions.size)), axis=1)
    recalls = [(shuffled[:, labels == c] == c).mean(axis=1) for c in np.unique(labels)]
    return [round(float(x), 4) for x in np.percentile(np.mean(recalls, axis=0), [2.5, 97.5])]


def summarise(record: dict, params, resamples: int) -> dict:
    from sermtl.evaluate.metrics import uar
    from sermtl.evaluate.significance import decisive, read_report

    results_dir = Path(record["study_results"])
    table = pd.DataFrame(json.loads((results_dir / "results.json").read_text()))
    table = table[table["subset"] == "all"]
    pooled = pd.read_parquet(results_dir / "predictions.parquet")
    rng = np.random.default_rng(0)
    systems: dict[str, dict] = {}
    for row in table.itertuples():
        frame = pooled[(pooled["system"] == row.system) & (pooled["dimension"] == row.dimension)]
        labels, predictions = frame["label"].to_numpy(), frame["prediction"].to_numpy()
        interval = chance_interval(labels, predictions, resamples, rng)
        assert abs(uar(labels, predictions) - row.pooled_uar) < 1e-9
        systems.setdefault(row.system, {})[row.dimension] = {
            "pooled_uar": round(row.pooled_uar, 4),
            "fold_uar_mean": round(row.fold_uar_mean, 4),
            "fold_uar_std": round(row.fold_uar_std, 4),
            "seeds": int(row.seeds),
            "seed_uar_mean": round(row.seed_uar_mean, 4),
            "seed_uar_std": round(row.seed_uar_std, 4),
            "chance_interval": interval,
            "within_chance": interval[0] <= round(row.pooled_uar, 4) <= interval[1],
        }
    report = read_report(Path(record["significance"]))
    verdicts = decisive(report, params.registry.gate.test)
    comparisons: dict[str, dict[str, dict]] = defaultdict(dict)
    for c in report.comparisons:
        verdict = verdicts[(c.baseline, c.dimension)]
        comparisons[c.baseline][c.dimension] = {
            "difference": round(c.difference, 4),
            "ci": [round(c.ci_low, 4), round(c.ci_high, 4)],
            "p_adjusted": round(c.p_adjusted[params.registry.gate.test], 4),
            "verdict": "better" if verdict.better else "worse" if verdict.worse else "not significant",
        }
    decision = record.get("decision") or {}
    return {
        "systems": systems,
        "comparisons": dict(comparisons),
        "gate": {"passed": decision.get("gate_passed"), "reasons": decision.get("gate_reasons", [])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--utterances", type=int, default=400, help="corpus size (data.synth.utterances)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (data.synth.seed)")
    parser.add_argument("--mean-duration", type=float, default=None, help="default: data.synth's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seeds (default: profile's)")
    parser.add_argument("--profile", default="demo", choices=["demo", "paper"])
    parser.add_argument("--max-epochs", type=int, default=None, help="train.max_epochs (default: profile's)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="train.device")
    parser.add_argument("--chance-resamples", type=int, default=2000)
    args = parser.parse_args()

    from sermtl.params import params_from_dict

    synth_key = f"{args.scenario}_u{args.utterances}_s{args.seed}_d{args.mean_duration or 'default'}"
    corpus = CACHE / "corpora" / synth_key / "IEMOCAP_full_release"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = CACHE / "runs" / f"{args.scenario}-u{args.utterances}-{args.profile}-{stamp}"
    run.mkdir(parents=True)
    raw = study_params(args, corpus)
    params = params_from_dict(raw, "study params")  # checked before anything runs
    params_path = run / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run / 'mlruns' / 'mlflow.db'}",
    }
    print(f"scenario {args.scenario}: {json.dumps(SCENARIOS[args.scenario])}; run folder {run}", flush=True)

    times: dict[str, object] = {}
    if (corpus / "Session5").is_dir():
        times["synth_s"] = "cached"
    else:
        synth = [
            sys.executable,
            "-m",
            "sermtl.cli",
            "synth",
            "--out",
            str(corpus),
            "--params",
            str(params_path),
        ]
        times["synth_s"] = round(run_logged(synth, run / "synth.log", env)[0], 1)
        print(f"synth: {times['synth_s']} s", flush=True)

    outputs = run / "outputs"
    pipeline = [sys.executable, "-m", "pipelines.run_local", "--params", str(params_path)]
    pipeline += ["--corpus", str(corpus), "--outputs", str(outputs)]
    wall, steps = run_logged(pipeline, run / "pipeline.log", env)
    times["pipeline_s"] = round(wall, 1)
    times["steps"] = steps
    times["train_seconds"] = training_seconds(outputs)
    record = json.loads((outputs / "last_run.json").read_text())

    start = time.perf_counter()
    summary = summarise(record, params, args.chance_resamples)
    times["summary_s"] = round(time.perf_counter() - start, 1)
    result = {
        "scenario": args.scenario,
        "settings": SCENARIOS[args.scenario],
        "utterances": args.utterances,
        "corpus_seed": args.seed,
        "profile": args.profile,
        "train_seeds": params.train.seeds,
        "max_epochs": params.train.max_epochs,
        "kept": record.get("ingest", {}).get("kept"),
        **summary,
        "times": times,
        "run_folder": str(run),
        "cpu_count": os.cpu_count(),
    }
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
