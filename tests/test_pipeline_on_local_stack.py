"""The whole DAG against the local stack, as a team without a cluster runs it: the corpus read from the
stack's S3 (SeaweedFS), the study, significance, gate and registration in its MLflow server (PostgreSQL
backend store, artifacts on the same S3)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from test_local_stack import ANY_PORT, read_env_file, stack, stack_dir  # noqa: F401  (stack_dir: fixture)
from test_pipeline import TINY_SYSTEMS, TINY_UTTERANCES, tiny_params

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.slow


@pytest.fixture
def local_config():
    from kfp.local import config

    config.LocalExecutionConfig.instance = None
    yield
    config.LocalExecutionConfig.instance = None


def test_dag_runs_against_the_local_stack_with_an_s3_corpus(
    stack_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_config: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    from pipelines.run_local import run_local
    from sermtl.data.synth import synthesize

    stack("up", "--dir", str(stack_dir), *ANY_PORT, "--timeout", "240")
    env = read_env_file(stack_dir / "stack.env")
    for key, value in env.items():  # what `source .localstack/stack.env` does
        monkeypatch.setenv(key, value)

    corpus = tmp_path / "upload" / "IEMOCAP_full_release"
    synthesize(corpus, utterances=TINY_UTTERANCES, seed=0, mean_duration_s=0.8)
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"])
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "sermtl-data", f"IEMOCAP_full_release/{path.relative_to(corpus)}")

    params = tiny_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["data"]["corpus"] = "s3://sermtl-data/IEMOCAP_full_release"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    record = run_local(params, outputs_dir=tmp_path / "local_outputs")
    printed = capsys.readouterr().out

    assert record["status"] == "succeeded" and record["corpus_uri"].startswith("s3://sermtl-data/")
    assert record["ingest"]["kept"] == TINY_UTTERANCES
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sermtl")
    runs = client.search_runs([experiment.experiment_id])
    studies = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(studies) == 1 and len(runs) == 2 + len(TINY_SYSTEMS) * 5  # + the registration run
    assert studies[0].data.tags["sermtl.gate.passed"] == "true"
    version = client.get_model_version_by_alias("sermtl-ser", "challenger")
    assert version.tags["sermtl.study_run_id"] == studies[0].info.run_id
    # Artifacts went through the server to the stack's S3 bucket.
    listed = s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/").get("Contents", [])
    assert any(item["Key"].endswith("significance/significance.json") for item in listed)
    assert "registration gate passed" in printed
