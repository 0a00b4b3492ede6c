"""The CPU image runs the pipeline's steps: ingest, validate and one training run inside podman give the same
manifest and the same predictions as the same commands on the host. Opt-in (`make test-containers`, which
builds the image first): SERMTL_TEST_CONTAINERS=1 and the image of this checkout's tag present."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.data.synth import synthesize
from sermtl.schema import AUDIO_FILE, MANIFEST_FILE, PREDICTIONS_FILE

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "infra" / "containers" / "containers.conf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SERMTL_TEST_CONTAINERS") != "1", reason="opt-in: make test-containers"
    ),
]


def image() -> str:
    tag = subprocess.run([ROOT / "infra/docker/image-tag.sh"], capture_output=True, text=True, check=True)
    name = os.environ.get("SERMTL_TEST_IMAGE") or f"localhost/sermtl:{tag.stdout.strip()}"
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    if (
        shutil.which("podman") is None
        or subprocess.run(["podman", "image", "exists", name], env=env).returncode
    ):
        pytest.skip(f"{name} is not built (make images)")
    return name


def in_container(name: str, work: Path, *args: str) -> None:
    command = ["podman", "run", "--rm", "--network", "none", "-v", f"{work}:/data:U", name, *args]
    result = subprocess.run(
        command, env={**os.environ, "CONTAINERS_CONF": str(CONF)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def on_host(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def test_ingest_validate_and_training_in_the_cpu_image_match_the_host(tmp_path):
    name = image()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["max_epochs"] = 2
    raw.setdefault("profiles", {}).setdefault("demo", {}).setdefault("train", {})["max_epochs"] = 2
    for side in ("container", "host"):
        work = tmp_path / side
        synthesize(work / "IEMOCAP_full_release", utterances=60, seed=0, mean_duration_s=0.8)
        raw["data"]["corpus"] = (
            "/data/IEMOCAP_full_release" if side == "container" else str(work / "IEMOCAP_full_release")
        )
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    box, host = tmp_path / "container", tmp_path / "host"
    steps = [
        ["ingest", "--out", "{w}/ingest", "--params", "{w}/params.yaml"],
        ["validate", "--ingest", "{w}/ingest", "--out", "{w}/validate", "--params", "{w}/params.yaml"],
        [
            "train",
            "--system",
            "mtl_attention",
            "--fold",
            "0",
            "--store",
            "{w}/ingest",
            "--out",
            "{w}/train/mtl_attention/fold0",
            "--params",
            "{w}/params.yaml",
            "--device",
            "cpu",
        ],
    ]
    for step in steps:
        in_container(name, box, *(arg.format(w="/data") for arg in step))
        on_host(*(arg.format(w=host) for arg in step))
    pd.testing.assert_frame_equal(*(pd.read_parquet(w / "ingest" / MANIFEST_FILE) for w in (box, host)))
    assert (box / "ingest" / AUDIO_FILE).read_bytes() == (host / "ingest" / AUDIO_FILE).read_bytes()
    predictions = [pd.read_parquet(w / "train/mtl_attention/fold0" / PREDICTIONS_FILE) for w in (box, host)]
    pd.testing.assert_frame_equal(*predictions)
