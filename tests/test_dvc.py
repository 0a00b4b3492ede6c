"""`dvc repro` works offline in a fresh copy of the repository, on the regenerated demo corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def sh(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def copy_working_tree(destination: Path) -> Path:
    """The files a clone of the working tree would have (tracked plus new, not ignored), copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    return copy_working_tree(tmp_path / "clone")


def test_dvc_repro_offline_in_fresh_clone(fresh_clone: Path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    git_env = {
        **env,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    sh("git", "init", "-q", cwd=fresh_clone, env=git_env)
    sh("git", "add", "-A", cwd=fresh_clone, env=git_env)
    sh("git", "commit", "-qm", "clone", cwd=fresh_clone, env=git_env)

    sh("sermtl", "synth", "--out", "data/IEMOCAP_full_release", cwd=fresh_clone, env=env)
    # The generator is deterministic: the regenerated corpus is exactly the version data.dvc tracks.
    sh("dvc", "add", "data", cwd=fresh_clone, env=env)
    assert sh("git", "status", "--porcelain", "data.dvc", cwd=fresh_clone, env=env) == ""

    # The data stages; the training stages (train@<system>-<fold>, results) are the same commands
    # as the DAG's and are exercised by the pipeline and training tests.
    sh("dvc", "repro", "validate", cwd=fresh_clone, env=env)
    summary = json.loads((fresh_clone / "artifacts/validation/summary.json").read_text())
    assert summary["success"] is True
    report = json.loads((fresh_clone / "artifacts/ingest/report.json").read_text())
    assert report["kept"] == 400 and report["dropped"] == 0
    assert "up to date" in sh("dvc", "status", "validate", cwd=fresh_clone, env=env)
    stages = sh("dvc", "stage", "list", cwd=fresh_clone, env=env)
    assert "train@mtl_attention-0" in stages and "train@egemaps_linear-4" in stages and "results" in stages

    # A parameter change re-runs exactly the stages that read it.
    params = fresh_clone / "params.yaml"
    params.write_text(params.read_text().replace("min_duration_s: 0.3", "min_duration_s: 0.2"))
    output = sh("dvc", "repro", "validate", cwd=fresh_clone, env=env)
    assert "Stage 'ingest' didn't change, skipping" in output
    assert "Running stage 'validate'" in output


def test_dvc_exp_run_set_param_and_stages_mirror_the_dag(fresh_clone: Path):
    """`dvc exp run -S key=value` runs the cheap data stages with a changed parameter and records it as an
    experiment; `dvc stage list` has one stage per DAG step, one train stage per (system, fold) item."""
    from sermtl.pipeline_runner import plan_step

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    sh("git", "init", "-q", cwd=fresh_clone, env=env)
    # `dvc exp run` commits the experiment (through scmrepo): an identity in the clone's git config too.
    sh("git", "config", "user.name", "t", cwd=fresh_clone, env=env)
    sh("git", "config", "user.email", "t@t", cwd=fresh_clone, env=env)
    sh("git", "add", "-A", cwd=fresh_clone, env=env)
    sh("git", "commit", "-qm", "clone", cwd=fresh_clone, env=env)

    stages = set(sh("dvc", "stage", "list", "--name-only", cwd=fresh_clone, env=env).split())
    trains = {f"train@{item['system']}-{item['fold']}" for item in plan_step(params_text(fresh_clone))}
    assert len(trains) == 25
    assert stages == {"ingest", "validate", "results", "significance"} | trains

    sh("sermtl", "synth", "--out", "data/IEMOCAP_full_release", cwd=fresh_clone, env=env)
    sh("dvc", "add", "data", cwd=fresh_clone, env=env)
    assert sh("git", "status", "--porcelain", "data.dvc", cwd=fresh_clone, env=env) == ""

    run = ["dvc", "exp", "run", "validate", "-S", "validation.min_duration_s=0.2", "-n", "short-min"]
    output = sh(*run, cwd=fresh_clone, env=env)
    assert "Running stage 'validate'" in output
    summary = json.loads((fresh_clone / "artifacts/validation/summary.json").read_text())
    assert summary["success"] is True

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=fresh_clone, env=env))
    (experiment,) = [e for e in find_named(shown, "short-min") if "data" in e]
    params = experiment["data"]["params"]["params.yaml"]["data"]
    assert params["validation"]["min_duration_s"] == 0.2
    listed = sh("dvc", "exp", "list", "--name-only", cwd=fresh_clone, env=env)
    assert listed.split() == ["short-min"]
    # The experiment lives in its own ref: the committed params.yaml keeps the default.
    committed = sh("git", "show", "HEAD:params.yaml", cwd=fresh_clone, env=env)
    assert "min_duration_s: 0.3" in committed


def params_text(repo: Path) -> str:
    return (repo / "params.yaml").read_text()


def find_named(node: object, name: str) -> list[dict]:
    """Every dict in `dvc exp show --json` output whose `name` is `name` (its nesting differs by version)."""
    found = []
    if isinstance(node, dict):
        if node.get("name") == name:
            found.append(node)
        for value in node.values():
            found += find_named(value, name)
    elif isinstance(node, list):
        for value in node:
            found += find_named(value, name)
    return found
