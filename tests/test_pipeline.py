"""The sermtl DAG: compiled structure, byte-for-byte determinism, and a real local run."""

from __future__ import annotations

import dataclasses
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

from components import resolve_images  # noqa: E402
from pipelines.run_local import LAST_RUN_FILE, run_local  # noqa: E402
from pipelines.sermtl_pipeline import (  # noqa: E402
    CLUSTER,
    PIPELINE_NAME,
    STEP_SECRETS,
    cluster_params,
    compile_pipeline,
    without_retries,
)
from sermtl.params import (  # noqa: E402
    ClusterParams,
    GpuParams,
    ParamsError,
    StepParams,
    TolerationParams,
    load_params,
    params_from_yaml,
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


# step (cluster.steps.<step>) -> its task's executor in the compiled YAML
EXECUTORS = {
    "fingerprint": "exec-fingerprint-corpus",
    "ingest": "exec-ingest-corpus",
    "validate": "exec-validate-corpus",
    "plan": "exec-plan-study",
    "train": "exec-train-system-fold",
    "collect": "exec-collect-study",
    "significance": "exec-test-significance",
    "gate": "exec-registration-gate",
    "register": "exec-register-model",
}
# The Secrets and keys infra/k8s/README.md defines for pipeline tasks, and where their templates are.
SECRETS_DIR = REPO_ROOT / "infra" / "k8s" / "secrets"
SECRET_TEMPLATES = {"sermtl-mlflow": "mlflow-client.env.example", "sermtl-s3": "s3-client.env.example"}
MLFLOW_SECRET = (
    "sermtl-mlflow",
    {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
)
S3_SECRET = (
    "sermtl-s3",
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"},
)
EXPECTED_SECRETS = {
    "exec-fingerprint-corpus": [S3_SECRET],
    "exec-ingest-corpus": [S3_SECRET],
    "exec-collect-study": [MLFLOW_SECRET],
    "exec-test-significance": [MLFLOW_SECRET],
    "exec-registration-gate": [MLFLOW_SECRET],
    "exec-register-model": [MLFLOW_SECRET],
}
NOT_CACHED_TASKS = {
    "fingerprint-corpus",
    "collect-study",
    "test-significance",
    "registration-gate",
    "register-model",
}


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def compiled_docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The compiled YAML's documents: the PipelineSpec, then the PlatformSpec (kfp-kubernetes settings)."""
    return _load(compile_pipeline(tmp_path_factory.mktemp("compiled") / "sermtl.yaml"))


@pytest.fixture(scope="module")
def compiled(compiled_docs: list[dict]) -> dict:
    return compiled_docs[0]


@pytest.fixture(scope="module")
def platform(compiled_docs: list[dict]) -> dict:
    """executor label -> its kubernetes platform config."""
    assert len(compiled_docs) == 2
    return compiled_docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _all_tasks(compiled: dict) -> dict[str, dict]:
    """Every task of the DAG by name, those inside the loop and the condition included."""
    tasks = dict(compiled["root"]["dag"]["tasks"])
    for component in compiled["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: task for name, task in tasks.items() if "dag" not in compiled["components"][_ref(task)]}


def _ref(task: dict) -> str:
    return task["componentRef"]["name"]


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
        "fingerprint-corpus",
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
    assert "dependentTasks" not in tasks["fingerprint-corpus"]
    assert tasks["ingest-corpus"]["dependentTasks"] == ["fingerprint-corpus"]
    assert tasks["validate-corpus"]["dependentTasks"] == ["ingest-corpus"]
    assert tasks["validate-corpus"]["inputs"]["artifacts"]["corpus_store"] == {
        "taskOutputArtifact": {"outputArtifactKey": "corpus_store", "producerTask": "ingest-corpus"}
    }
    for name in ("fingerprint-corpus", "ingest-corpus", "validate-corpus", "plan-study", "collect-study"):
        assert tasks[name]["inputs"]["parameters"]["params_yaml"] == {
            "componentInputParameter": "params_yaml"
        }
    for name in ("fingerprint-corpus", "ingest-corpus"):
        assert tasks[name]["inputs"]["parameters"]["corpus_uri"] == {"componentInputParameter": "corpus_uri"}
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
    # The KFP run and task that log the study: MLflow tags sermtl.kfp_run_id / sermtl.kfp_task.
    assert collect["inputs"]["parameters"]["pipeline_run_id"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}
    }
    assert collect["inputs"]["parameters"]["pipeline_task"] == {
        "runtimeValue": {"constant": "{{$.pipeline_task_name}}"}
    }


def test_compiled_executors_image_resources_env(compiled: dict) -> None:
    executors = compiled["deploymentSpec"]["executors"]
    assert set(executors) == set(EXECUTORS.values())
    cpu_image, cuda_image = resolve_images(CLUSTER.images.cpu, CLUSTER.images.cuda)
    assert CLUSTER.gpu.enabled and cuda_image == cpu_image + "-cuda"
    for step, name in EXECUTORS.items():
        container = executors[name]["container"]
        settings = getattr(CLUSTER.steps, step)
        assert container["image"] == (cuda_image if step == "train" else cpu_image), name
        resources = container["resources"]
        assert resources["resourceCpuRequest"] == settings.cpu, name
        assert resources["resourceMemoryRequest"] == settings.memory, name
        assert resources.get("resourceMemoryLimit", "") == settings.memory_limit, name
        assert resources.get("resourceCpuLimit", "") == settings.cpu_limit, name
        assert "pip install" not in " ".join(container["command"])
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["GX_ANALYTICS_ENABLED"] == "false"
        assert not {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} & set(env), "only from Secrets"


def test_repository_cluster_section_sizes_every_step() -> None:
    """params.yaml sizes every step: requests and a memory limit; training asks for the most."""
    cluster = load_params(REPO_ROOT / "params.yaml").cluster
    assert cluster == CLUSTER == cluster_params()
    steps = {step: getattr(cluster.steps, step) for step in EXECUTORS}
    assert all(s.cpu and s.memory and s.memory_limit for s in steps.values())
    assert steps["train"].cpu == "4" and steps["train"].memory == "16Gi"
    assert cluster.secrets.mlflow.name == "sermtl-mlflow" and cluster.secrets.s3.name == "sermtl-s3"


def test_compiled_gpu_request_on_training_only(compiled: dict, platform: dict) -> None:
    executors = compiled["deploymentSpec"]["executors"]
    accelerator = executors["exec-train-system-fold"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
    assert platform["exec-train-system-fold"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "nodeSelector" not in platform["exec-train-system-fold"]  # params.yaml: {} (any GPU node)
    for name in set(EXECUTORS.values()) - {"exec-train-system-fold"}:
        assert "accelerator" not in executors[name]["container"]["resources"], name
        assert not {"tolerations", "nodeSelector"} & set(platform.get(name, {})), name


def test_gpu_settings_come_from_the_cluster_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERMTL_IMAGE", raising=False)
    monkeypatch.delenv("SERMTL_CUDA_IMAGE", raising=False)
    cluster = params_from_yaml(
        """
cluster:
  images: {cpu: registry.example/sermtl:1.2.3}
  gpu:
    accelerator_type: amd.com/gpu
    limit: 2
    node_selector: {cloud.google.com/gke-accelerator: nvidia-l4, pool: gpu}
    tolerations:
      - {key: dedicated, operator: Equal, value: ml, effect: NoExecute}
      - {key: nvidia.com/gpu, operator: Exists, effect: ""}
  steps: {train: {memory: 64Gi, retries: 5}}
"""
    ).cluster
    assert cluster.steps.train == StepParams("4", "64Gi", "", "32Gi", 5), "unset keys keep train's defaults"
    spec, platform_spec = _load(compile_pipeline(tmp_path / "gpu.yaml", cluster))
    train = spec["deploymentSpec"]["executors"]["exec-train-system-fold"]["container"]
    assert train["image"] == "registry.example/sermtl:1.2.3-cuda"
    assert spec["deploymentSpec"]["executors"]["exec-plan-study"]["container"]["image"] == (
        "registry.example/sermtl:1.2.3"
    )
    assert train["resources"]["accelerator"]["resourceType"] == "amd.com/gpu"
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    assert train["resources"]["resourceMemoryRequest"] == "64Gi"
    k8s = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-system-fold"]
    assert k8s["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "gpu"}}
    assert k8s["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
        {"key": "nvidia.com/gpu", "operator": "Exists"},
    ]
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train-system-fold"]
    assert loop["retryPolicy"]["maxRetryCount"] == 5
    assert spec["root"]["dag"]["tasks"]["plan-study"]["retryPolicy"]["maxRetryCount"] == 2


def test_cluster_without_gpus_trains_on_the_cpu_image(tmp_path: Path) -> None:
    cluster = dataclasses.replace(CLUSTER, gpu=GpuParams(enabled=False, node_selector={"a": "b"}))
    spec, platform_spec = _load(compile_pipeline(tmp_path / "cpu.yaml", cluster))
    train = spec["deploymentSpec"]["executors"]["exec-train-system-fold"]["container"]
    assert train["image"] == resolve_images(CLUSTER.images.cpu)[0]
    assert "accelerator" not in train["resources"]
    executors = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "exec-train-system-fold" not in executors


def test_images_follow_the_environment_at_compile_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERMTL_IMAGE", "registry.example/sermtl:0.2.0-abc1234")
    monkeypatch.delenv("SERMTL_CUDA_IMAGE", raising=False)
    spec = _load(compile_pipeline(tmp_path / "env.yaml", CLUSTER))[0]
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-train-system-fold") == "registry.example/sermtl:0.2.0-abc1234-cuda"
    assert set(images.values()) == {"registry.example/sermtl:0.2.0-abc1234"}
    monkeypatch.setenv("SERMTL_CUDA_IMAGE", "registry.example/sermtl-gpu@sha256:" + "0" * 64)
    spec = _load(compile_pipeline(tmp_path / "env2.yaml", CLUSTER))[0]
    train = spec["deploymentSpec"]["executors"]["exec-train-system-fold"]["container"]
    assert train["image"] == "registry.example/sermtl-gpu@sha256:" + "0" * 64


def test_compiled_retries_on_every_task(compiled: dict) -> None:
    tasks = _all_tasks(compiled)
    assert set(tasks) == {name.removeprefix("exec-") for name in EXECUTORS.values()}
    for name, task in tasks.items():
        assert task["retryPolicy"] == {
            "maxRetryCount": CLUSTER.retry.count,
            "backoffDuration": f"{CLUSTER.retry.backoff_s}s",
            "backoffFactor": CLUSTER.retry.backoff_factor,
            "backoffMaxDuration": f"{CLUSTER.retry.backoff_max_s}s",
        }, name
    assert CLUSTER.retry.count >= 1


def test_local_runs_do_not_retry(tmp_path: Path) -> None:
    """run_local builds the DAG with without_retries: a failed local task fails at once."""
    spec = _load(compile_pipeline(tmp_path / "local.yaml", without_retries(CLUSTER)))[0]
    assert all(task.get("retryPolicy", {}).get("maxRetryCount", 0) == 0 for task in _all_tasks(spec).values())


def test_compiled_caching(compiled: dict) -> None:
    """Steps that write to MLflow, and the corpus fingerprint, always run; the others are cached."""
    for name, task in _all_tasks(compiled).items():
        assert task["cachingOptions"].get("enableCache", False) is (name not in NOT_CACHED_TASKS), name
    ingest = compiled["root"]["dag"]["tasks"]["ingest-corpus"]["inputs"]["parameters"]
    assert ingest["data_version"] == {"componentInputParameter": "data_version"}
    assert ingest["corpus_fingerprint"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "fingerprint-corpus"}
    }
    definitions = compiled["components"]["comp-ingest-corpus"]["inputDefinitions"]["parameters"]
    assert set(definitions) == {"corpus_uri", "params_yaml", "data_version", "corpus_fingerprint"}
    assert not any(d.get("isOptional") for d in definitions.values()), "every cache-key input is wired"


def test_compiled_secrets_by_reference(platform: dict) -> None:
    """Each task that reads S3 or talks to MLflow gets its Secret as env vars, named as infra/k8s says."""
    assert set(STEP_SECRETS) == {step for step, name in EXECUTORS.items() if name in EXPECTED_SECRETS}
    for name in EXECUTORS.values():
        refs = platform.get(name, {}).get("secretAsEnv", [])
        found = [(ref["secretName"], {item["secretKey"] for item in ref["keyToEnv"]}) for ref in refs]
        assert found == EXPECTED_SECRETS.get(name, []), name
        for ref in refs:
            assert all(item["secretKey"] == item["envVar"] for item in ref["keyToEnv"])
            assert ref["optional"] is False  # a missing Secret or key stops the pod, loudly
            template = (SECRETS_DIR / SECRET_TEMPLATES[ref["secretName"]]).read_text()
            keys = {line.split("=", 1)[0] for line in template.splitlines() if "=" in line}
            assert {item["secretKey"] for item in ref["keyToEnv"]} <= keys, ref["secretName"]


def test_secret_name_can_be_left_out(tmp_path: Path) -> None:
    secrets = dataclasses.replace(
        CLUSTER.secrets, s3=dataclasses.replace(CLUSTER.secrets.s3, name="")
    )  # e.g. S3 access through workload identity
    cluster = dataclasses.replace(CLUSTER, secrets=secrets)
    executors = _load(compile_pipeline(tmp_path / "no-s3.yaml", cluster))[1]["platforms"]["kubernetes"]
    assert "secretAsEnv" not in executors["deploymentSpec"]["executors"].get("exec-ingest-corpus", {})
    assert executors["deploymentSpec"]["executors"]["exec-collect-study"]["secretAsEnv"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cluster: {gpu: {limit: 0}}", r"cluster.gpu.limit: must be an integer >= 1 \(got 0\)"),
        ("cluster: {gpu: {enabled: yes please}}", r"cluster.gpu.enabled: expected bool"),
        ("cluster: {gpu: {node_selector: {pool: true}}}", r"cluster.gpu.node_selector.pool: expected str"),
        (
            "cluster: {gpu: {tolerations: [{key: a, operator: In}]}}",
            r"cluster.gpu.tolerations\[0\].operator: must be one of Exists, Equal \(got 'In'\)",
        ),
        (
            "cluster: {gpu: {tolerations: [{effect: NoScheduel}]}}",
            r"cluster.gpu.tolerations\[0\].effect: must be one of NoSchedule, .* \(got 'NoScheduel'\)",
        ),
        (
            "cluster: {steps: {trian: {cpu: '1'}}}",
            r"cluster.steps.trian: unknown key; did you mean `train`\? \(expected one of: fingerprint, ",
        ),
        (
            "cluster: {steps: {train: {cpu: 4 cores}}}",
            r"cluster.steps.train.cpu: must be a CPU quantity .* \(got '4 cores'\)",
        ),
        (
            "cluster: {steps: {ingest: {memory: 4GB}}}",
            r"cluster.steps.ingest.memory: must be a memory .* \(got '4GB'\)",
        ),
        (
            "cluster: {steps: {gate: {memory_limit: lots}}}",
            r"cluster.steps.gate.memory_limit: must be .* \(got 'lots'\)",
        ),
        (
            "cluster: {steps: {gate: {retries: -2}}}",
            r"cluster.steps.gate.retries: must be an integer >= -1 \(got -2\)",
        ),
        ("cluster: {retry: {count: 1.5}}", r"cluster.retry.count: expected int"),
        (
            "cluster: {retry: {backoff_factor: 0.5}}",
            r"cluster.retry.backoff_factor: must be a number >= 1 \(got 0.5\)",
        ),
        ("cluster: {images: {gpu: x}}", r"cluster.images.gpu: unknown key \(expected one of: cpu, cuda\)"),
        (
            "cluster: {secrets: {mlflow: {env: {A: 1BAD}}}}",
            r"cluster.secrets.mlflow.env.A: must be an environment variable name \(got '1BAD'\)",
        ),
        (
            "cluster: {secrets: {vault: {name: x}}}",
            r"cluster.secrets.vault: unknown key \(expected one of: mlflow, s3\)",
        ),
    ],
)
def test_bad_cluster_params_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(text)


def test_cluster_section_merges_with_profiles_and_defaults() -> None:
    params = params_from_yaml(
        "profile: cpu\ncluster: {retry: {count: 4}}\nprofiles:\n  cpu: {cluster: {gpu: {enabled: false}}}\n"
    )
    assert params.profile == "cpu" and params.extra == {}
    assert params.cluster.gpu == GpuParams(enabled=False) and params.cluster.retry.count == 4
    assert params.cluster.steps == ClusterParams().steps
    assert params.cluster.gpu.tolerations == [TolerationParams()]
    assert params_from_yaml("data: {}").cluster == ClusterParams()


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
    assert record["ingest"]["corpus_fingerprint"].startswith("listing:")  # ingest's cache key
    assert record["ingest"]["data_version"] == ""  # not DVC-tracked: the study falls back to ingest's
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
    assert Path(record["results_report_html"]).read_text().lower().startswith("<!doctype html>")
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs(client.get_experiment_by_name("sermtl").experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    registration = [r for r in runs if r.info.run_name == "registration"]
    assert len(parents) == 1 and len(registration) == 1
    assert len(runs) == 2 + len(TINY_SYSTEMS) * 5
    assert parents[0].data.tags["sermtl.data_version"].startswith("ingest:")
    children = [r for r in runs if r not in parents]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    # The KFP run and task that logged the study, on the study run and (inherited) its fold runs.
    kfp_run = parents[0].data.tags["sermtl.kfp_run_id"]
    assert kfp_run and kfp_run == parents[0].data.tags["sermtl.pipeline_run_id"]
    assert parents[0].data.tags["sermtl.kfp_task"] == "collect-study"
    folds = [r for r in children if r.info.run_name != "registration"]
    assert len(folds) == len(TINY_SYSTEMS) * 5
    assert all(r.data.tags["sermtl.kfp_run_id"] == kfp_run for r in folds)
    assert all(r.data.tags["sermtl.kfp_task"] == "collect-study" for r in folds)
    assert registration[0].data.tags["sermtl.kfp_run_id"] == kfp_run  # inherited from the study

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
    assert 'uv run sermtl promote sermtl-ser --reason "' in printed  # the next command to try
    assert "uv run sermtl serve -m models:/sermtl-ser@champion" in printed


def test_local_tasks_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.run_local as run_local_module

    monkeypatch.setattr(run_local_module.os, "sched_getaffinity", lambda _: set(range(2)), raising=False)
    assert run_local_module.task_threads() == 1  # two trainers at once on two cores: one thread each
    monkeypatch.setattr(run_local_module.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert run_local_module.task_threads() == 8


def test_refused_gate_explains_the_power_of_the_speaker_level_test() -> None:
    from pipelines.run_local import next_steps

    report = {"params": {"unit": "speaker", "alpha": 0.05}, "comparisons": [{"clusters": 10}] * 12}
    lines = next_steps(False, "sermtl-ser", report)
    assert lines[0].startswith("nothing was registered")
    assert "2/2^10 = 0.0020" in lines[1] and "p <= 0.0042" in lines[1]
    assert next_steps(False, "sermtl-ser", None) == lines[:1]
    assert not any("sermtl promote" in line for line in lines)  # no command that cannot work


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
