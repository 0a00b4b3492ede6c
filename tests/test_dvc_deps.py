"""Every DVC stage's `deps` cover the library code it runs, so `dvc repro` reruns it when that code changes.

What a stage runs is measured, not listed by hand: each stage's own `cmd` from dvc.yaml is run on a tiny
generated corpus, and the `sermtl` modules loaded by the time it exits (lazy imports included) must each be
covered by a file or folder in that stage's `deps`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sermtl.data.synth import synthesize
from sermtl.params import params_from_dict
from sermtl.train.training import train_fold

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# Runs `sermtl ...` as the console script does and, on the way out, writes the library modules loaded.
RECORDER = """
import atexit, json, os, sys
def _dump():
    names = sorted(n for n in sys.modules if n == "sermtl" or n.startswith("sermtl."))
    with open(os.environ["SERMTL_MODULES_OUT"], "w") as handle:
        files = [getattr(sys.modules[n], "__file__", None) for n in names]
        json.dump([f for f in files if f], handle)
atexit.register(_dump)
from sermtl.cli import main
sys.argv = ["sermtl", *sys.argv[1:]]
main()
"""
TINY = {
    "data": {"sessions": [1, 2]},  # two folds: what a stage runs does not depend on how many
    "features": {"frame_ms": 20, "hop_ms": 20, "max_frames": 10},
    "model": {"conv_channels": 4, "conv_kernel": 8, "conv_pool": 4, "rnn_hidden": 8, "rnn_layers": 1},
    "train": {"max_epochs": 1, "early_stopping_patience": 1, "device": "cpu", "seeds": [0]},
    "significance": {"resamples": 1000, "unit": "utterance"},
}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def deep_update(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A project folder as `dvc repro` sees it: params.yaml (tiny settings) and the corpus under data/."""
    work = tmp_path_factory.mktemp("dvc_deps")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "paper"
    deep_update(raw, TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    synthesize(work / raw["data"]["corpus"], utterances=100, mean_duration_s=0.8)
    return work


def start_stage(work: Path, stage: str, item: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Start the stage's dvc.yaml `cmd` in `work`, recording the library modules it loads."""
    raw = yaml.safe_load((work / "params.yaml").read_text())
    cmd = stages()[stage]["cmd"].replace("${data.corpus}", raw["data"]["corpus"])
    for key, value in (item or {}).items():
        cmd = cmd.replace("${item." + key + "}", str(value))
    words = shlex.split(cmd)
    assert words[0] == "sermtl", f"stage {stage}: cmd does not start with sermtl"
    record = work / f"modules-{stage}-{'-'.join(map(str, (item or {}).values()))}.json"
    env = {
        **os.environ,
        "SERMTL_MODULES_OUT": str(record),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "GIT_DIR": str(work / "no-git"),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", RECORDER, *words[1:]],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, record


def finish_stage(stage: str, started: tuple[subprocess.Popen, Path]) -> set[Path]:
    """Wait for a started stage; the library files it loaded."""
    process, record = started
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, f"stage {stage} failed:\n{stdout}\n{stderr}"
    return {Path(name).resolve() for name in json.loads(record.read_text())}


def run_stage(work: Path, stage: str, item: dict | None = None) -> set[Path]:
    return finish_stage(stage, start_stage(work, stage, item))


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    library = [f for f in files if (ROOT / "src").resolve() in f.parents]
    missing = []
    for path in library:
        relative = path.relative_to(ROOT.resolve())
        if not any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps):
            missing.append(str(relative))
    return sorted(missing)


def test_every_stage_lists_the_library_code_it_runs(workspace: Path):
    specs = stages()
    loaded = {"ingest": run_stage(workspace, "ingest")}
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    # Stages that need only the ingest store, at once; one train stage per system (each runs different
    # code: eGeMAPS, single- or multi-task).
    validating = start_stage(workspace, "validate")
    training = [start_stage(workspace, "train", {"system": s, "fold": 0}) for s in raw["systems"]]
    loaded["train"] = set().union(*(finish_stage("train", one) for one in training))
    loaded["validate"] = finish_stage("validate", validating)
    # The other fold, in-process (what it runs was measured on fold 0): results and significance need all.
    params = params_from_dict(raw)
    for system in raw["systems"]:
        for fold in range(1, len(raw["data"]["sessions"])):
            out = workspace / "artifacts" / "train" / system / f"fold{fold}"
            train_fold(workspace / "artifacts" / "ingest", system, fold, out, params, progress=False)
    collecting = start_stage(workspace, "results")
    loaded["significance"] = run_stage(workspace, "significance")
    loaded["results"] = finish_stage("results", collecting)
    assert set(loaded) == set(specs), "a dvc.yaml stage this test does not run"

    problems = {stage: uncovered(files, specs[stage]["deps"]) for stage, files in loaded.items()}
    problems = {stage: missing for stage, missing in problems.items() if missing}
    assert not problems, f"dvc.yaml stages run library modules their deps do not list: {problems}"
    # The measurement sees what a stage imports lazily (training imports the eGeMAPS code only for it).
    assert ROOT.resolve() / "src/sermtl/model/egemaps.py" in loaded["train"]
    assert ROOT.resolve() / "src/sermtl/model/egemaps.py" not in loaded["ingest"]
