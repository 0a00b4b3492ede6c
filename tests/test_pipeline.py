"""The sermtl DAG: compiled structure, byte-for-byte determinism, and a real local run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # components/ and pipelines/ are top-level packages of the repo
    sys.path.insert(0, str(REPO_ROOT))

from components import SERMTL_IMAGE  # noqa: E402
from pipelines.run_local import LAST_RUN_FILE, run_local  # noqa: E402
from pipelines.sermtl_pipeline import (  # noqa: E402
    COLLECT_RESOURCES,
    GATE_RESOURCES,
    INGEST_RESOURCES,
    PIPELINE_NAME,
    PLAN_RESOURCES,
    REGISTER_RESOURCES,
    SIGNIFICANCE_RESOURCES,
    TRAIN_RESOURCES,
    VALIDATE_RESOURCES,
    compile_pipeline,
)

TINY_UTTERANCES = 60


TINY_SYSTEMS = ("mtl_attention", "egemaps_linear")


def tiny_params(tmp_path: Path, **data_overrides: object) -> Path:
    """A params.yaml whose corpus (generated on first use) is tiny and lives under tmp_path.

    The study keeps two systems (a neural one and the hand-crafted one) and two epochs, so the
    DAG's fan-out and collection run for real at the cost of 10 short trainings.
    """
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["corpus"] = str(tmp_path / "IEMOCAP_full_release")
    raw["data"]["synth"].update(utterances=TINY_UTTERANCES, mean_duration_s=0.8)
    raw["data"].update(data_overrides)
    raw["systems"] = {name: raw["systems"][name] for name in TINY_SYSTEMS}
    raw["profiles"]["demo"]["train"].update(max_epochs=2, early_stopping_patience=1)
    raw["significance"].update(baselines=["egemaps_linear"], resamples=2000)
    # Two epochs on 60 utterances prove nothing: let the gate pass unless the model is significantly
    # worse, so that the registration branch of the DAG runs too.
    raw["registry"]["gate"].update(min_dimensions_better=0, max_comparisons_worse=0)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def local_config() -> Iterator[None]:
    """kfp.local.init sets a process-wide singleton: start and leave every test without one."""
    from kfp.local import config

    config.LocalExecutionConfig.instance = None
    yield
    config.LocalExecutionConfig.instance = None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "sermtl.yaml")
    return yaml.safe_load(path.read_text())


def test_compiled_dag_structure(compiled: dict) -> None:
    assert compiled["pipelineInfo"]["name"] == PIPELINE_NAME
    assert compiled["pipelineInfo"]["description"]
    root = compiled["root"]
    assert root["inputDefinitions"]["parameters"] == {
        "corpus_uri": {"parameterType": "STRING"},
        "params_yaml": {"parameterType": "STRING"},
        "data_version": {"defaultValue": "", "isOptional": True, "parameterType": "STRING"},
    }
    tasks = root["dag"]["tasks"]
    assert set(tasks) == {
        "ingest-corpus",
        "validate-corpus",
        "plan-study",
        "for-loop-1",
        "collect-study",
        "test-significance",
        "registration-gate",
        "condition-2",
    }
    assert tasks["ingest-corpus"]["taskInfo"]["name"] == "Ingest corpus"
    assert tasks["validate-corpus"]["taskInfo"]["name"] == "Validate corpus"
    assert "dependentTasks" not in tasks["ingest-corpus"]
    assert tasks["validate-corpus"]["dependentTasks"] == ["ingest-corpus"]
    assert tasks["validate-corpus"]["inputs"]["artifacts"]["corpus_store"] == {
        "taskOutputArtifact": {"outputArtifactKey": "corpus_store", "producerTask": "ingest-corpus"}
    }
    for name in ("ingest-corpus", "validate-corpus", "plan-study", "collect-study"):
        assert tasks[name]["inputs"]["parameters"]["params_yaml"] == {
            "componentInputParameter": "params_yaml"
        }
    assert tasks["ingest-corpus"]["inputs"]["parameters"]["corpus_uri"] == {
        "componentInputParameter": "corpus_uri"
    }
    assert set(root["outputDefinitions"]["artifacts"]) == {
        "corpus_store",
        "validation_report",
        "validation_summary",
        "validation_docs",
        "study_results",
        "results_report",
        "results_table",
        "significance",
        "significance_report",
        "significance_table",
    }


def test_compiled_decisions_register_only_after_a_passed_gate(compiled: dict) -> None:
    tasks = compiled["root"]["dag"]["tasks"]
    assert tasks["test-significance"]["inputs"]["artifacts"]["study_results"] == {
        "taskOutputArtifact": {"outputArtifactKey": "study_results", "producerTask": "collect-study"}
    }
    assert set(tasks["registration-gate"]["dependentTasks"]) == {"collect-study", "test-significance"}
    condition = tasks["condition-2"]
    assert condition["taskInfo"]["name"] == "gate-passed"
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--registration-gate-Output'] == 'passed'"
    )
    register = compiled["components"]["comp-condition-2"]["dag"]["tasks"]["register-model"]
    assert register["inputs"]["artifacts"]["proposed_runs"] == {
        "componentInputArtifact": "pipelinechannel--collect-study-proposed_runs"
    }


def test_compiled_study_fans_out_over_plan_and_collects(compiled: dict) -> None:
    tasks = compiled["root"]["dag"]["tasks"]
    assert tasks["plan-study"]["dependentTasks"] == ["validate-corpus"]  # no training on a failed corpus
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--plan-study-Output"}
    body = compiled["components"]["comp-for-loop-1"]["dag"]["tasks"]
    train = body["train-system-fold"]
    assert train["inputs"]["artifacts"]["corpus_store"] == {
        "componentInputArtifact": "pipelinechannel--ingest-corpus-corpus_store"
    }
    for field in ("system", "fold"):
        assert (
            train["inputs"]["parameters"][field]["parameterExpressionSelector"]
            == f'parseJson(string_value)["{field}"]'
        )
    collect = tasks["collect-study"]
    assert collect["inputs"]["artifacts"]["trained_runs"] == {
        "taskOutputArtifact": {
            "outputArtifactKey": "pipelinechannel--train-system-fold-trained_run",
            "producerTask": "for-loop-1",
        }
    }
    assert collect["inputs"]["parameters"]["pipeline_run_id"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}
    }


def test_compiled_executors_image_resources_env(compiled: dict) -> None:
    executors = compiled["deploymentSpec"]["executors"]
    expected = {
        "exec-ingest-corpus": INGEST_RESOURCES,
        "exec-validate-corpus": VALIDATE_RESOURCES,
        "exec-plan-study": PLAN_RESOURCES,
        "exec-train-system-fold": TRAIN_RESOURCES,
        "exec-collect-study": COLLECT_RESOURCES,
        "exec-test-significance": SIGNIFICANCE_RESOURCES,
        "exec-registration-gate": GATE_RESOURCES,
        "exec-register-model": REGISTER_RESOURCES,
    }
    assert set(executors) == set(expected)
    for name, resources in expected.items():
        container = executors[name]["container"]
        assert container["image"] == SERMTL_IMAGE
        assert container["resources"]["resourceCpuRequest"] == resources["cpu"]
        assert container["resources"]["resourceMemoryRequest"] == resources["memory"]
        assert "pip install" not in " ".join(container["command"])
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["GX_ANALYTICS_ENABLED"] == "false"


def test_compile_is_deterministic(tmp_path: Path) -> None:
    first = compile_pipeline(tmp_path / "a.yaml").read_bytes()
    second = compile_pipeline(tmp_path / "b.yaml").read_bytes()
    assert first == second


def test_run_local_cli_is_importable_from_repo_root() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--corpus" in result.stdout and "--outputs" in result.stdout


@pytest.mark.slow
def test_run_local_end_to_end(
    tmp_path: Path, local_config: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = tmp_path / "local_outputs"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    record = run_local(tiny_params(tmp_path), outputs_dir=outputs)
    printed = capsys.readouterr().out

    assert (tmp_path / "IEMOCAP_full_release").is_dir(), "the missing corpus was synthesised"
    assert record["status"] == "succeeded"
    assert json.loads((outputs / LAST_RUN_FILE).read_text()) == json.loads(json.dumps(record))
    run_dir = Path(record["run_dir"])
    assert run_dir.parent == outputs / "pipeline_root" and run_dir.name.startswith("sermtl-")

    store = Path(record["corpus_store"])
    assert store == run_dir / "ingest-corpus" / "corpus_store"
    assert (store / "manifest.parquet").is_file() and (store / "audio.pcm16").is_file()
    report = Path(record["validation_report"])
    assert report.is_file() and "passed" in report.read_text()
    assert Path(record["validation_report_html"]) == outputs / "validation_report.html"
    assert Path(record["validation_report_html"]).read_bytes() == report.read_bytes()
    assert (Path(record["validation_docs"]) / "data_docs" / "index.html").is_file()

    assert record["ingest"]["kept"] == TINY_UTTERANCES and record["ingest"]["dropped"] == 0
    assert isinstance(record["ingest"]["kept"], int), "protobuf's float widening is undone"
    assert record["validation"]["success"] is True
    for path in (str(store), str(report), str(outputs / LAST_RUN_FILE)):
        assert path in printed

    # The study: every (system, fold) trained, pooled into the results table, logged to MLflow.
    results = Path(record["study_results"])
    pooled = pd.read_parquet(results / "predictions.parquet")
    assert set(pooled["system"]) == set(TINY_SYSTEMS) and set(pooled["fold"]) == set(range(5))
    assert len(pooled) == len(TINY_SYSTEMS) * TINY_UTTERANCES * 3  # every utterance tested once per system
    assert "| **mtl_attention** * |" in printed and "egemaps_linear" in printed
    assert Path(record["results_report_html"]).read_text().startswith("<!doctype html>")
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs(client.get_experiment_by_name("sermtl").experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    registration = [r for r in runs if r.info.run_name == "registration"]
    assert len(parents) == 1 and len(registration) == 1
    assert len(runs) == 2 + len(TINY_SYSTEMS) * 5
    assert parents[0].data.tags["sermtl.data_version"].startswith("ingest:")
    children = [r for r in runs if r not in parents]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)

    # Decisions: significance on the pooled predictions, the gate, the registration, all in MLflow.
    significance = json.loads((Path(record["significance"]) / "significance.json").read_text())
    assert significance["proposed"] == "mtl_attention" and significance["baselines"] == ["egemaps_linear"]
    assert Path(record["significance_report_html"]).is_file() and Path(record["comparison_html"]).is_file()
    study = parents[0]
    assert study.data.tags["sermtl.gate.passed"] == "true"
    assert study.data.tags["sermtl.registry.version"] == "1"
    version = client.get_model_version_by_alias("sermtl-ser", "challenger")
    assert str(version.version) == "1" and version.tags["sermtl.study_run_id"] == study.info.run_id
    assert {"significance/significance.json", "comparison/comparison.html"} <= {
        f"{folder.path}/{item.path.split('/')[-1]}"
        for folder in client.list_artifacts(study.info.run_id)
        if folder.is_dir
        for item in client.list_artifacts(study.info.run_id, folder.path)
    }
    assert "registration gate passed" in printed and "challenger" in printed


@pytest.mark.slow
def test_run_local_stops_on_failed_validation(tmp_path: Path, local_config: None) -> None:
    outputs = tmp_path / "local_outputs"
    with pytest.raises(RuntimeError, match="validate-corpus"):
        run_local(tiny_params(tmp_path, speakers_per_session=3), outputs_dir=outputs)
    record = json.loads((outputs / LAST_RUN_FILE).read_text())
    assert record["status"] == "failed"
    assert Path(record["corpus_store"]).is_dir(), "ingest succeeded and its store is kept"
    assert "FAILED" in Path(record["validation_report"]).read_text()
    assert "FAILED" in (outputs / "validation_report.html").read_text()
