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


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The files a clone of the working tree would have (tracked plus new, not ignored), in a new repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


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
