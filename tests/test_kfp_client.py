"""`sermtl pipeline compile|submit|schedule`: named, deterministic versions and the KFP client calls.

There is no cluster here: submit/schedule run against tests/fake_kfp_server.py (the v2beta1 REST API
on 127.0.0.1), which records every request.

The golden file tests/golden/sermtl_pipeline.yaml is the compiled IR for tests/golden/params.yaml.
After an intended change to the DAG or the components, regenerate it (and review the diff) with

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_kfp_client.py -k golden
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.abc
import os
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from fake_kfp_server import API, FakeKfpServer
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.mlops import kfp_client
from sermtl.mlops.kfp_client import (
    KfpError,
    compile_version,
    normalize_cron,
    parse_param_pairs,
    schedule,
    submit,
    version_name,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_PARAMS = GOLDEN_DIR / "params.yaml"
GOLDEN_IR = GOLDEN_DIR / "sermtl_pipeline.yaml"
GOLDEN_VERSION = "sermtl-golden"
REGENERATE = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_kfp_client.py -k golden"
COMMIT = "3BC016DECEBE80C6D1DDCC155C450709C7E83DF4"
TOKEN = "fake-kfp-token-for-tests"
CORPUS = "s3://sermtl-data/IEMOCAP_full_release"


@pytest.fixture()
def pinned_commit(monkeypatch: pytest.MonkeyPatch) -> str:
    """Version names from a fixed commit, as in an image built with SERMTL_GIT_COMMIT (never dirty)."""
    monkeypatch.setenv("SERMTL_GIT_COMMIT", COMMIT)
    return COMMIT.lower()[:7]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> kfp_client.CompiledVersion:
    saved = os.environ.get("SERMTL_GIT_COMMIT")
    os.environ["SERMTL_GIT_COMMIT"] = COMMIT
    try:
        return compile_version(tmp_path_factory.mktemp("kfp"), GOLDEN_PARAMS)
    finally:
        if saved is None:
            os.environ.pop("SERMTL_GIT_COMMIT")
        else:
            os.environ["SERMTL_GIT_COMMIT"] = saved


@pytest.fixture()
def server():
    with FakeKfpServer(token=TOKEN) as fake:
        yield fake


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _upload_calls(server: FakeKfpServer) -> list:
    return server.calls("POST", f"{API}/pipelines/upload_version") + server.calls(
        "POST", f"{API}/pipelines/upload"
    )


# --- version names ------------------------------------------------------------------------------------


def test_version_name_format_and_determinism(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("profile: paper\n")
    name = version_name(params, COMMIT)
    package = re.sub(r"[^a-z0-9]+", "-", metadata.version("sermtl").lower()).strip("-")
    assert re.fullmatch(rf"sermtl-{package}-3bc016d-p[0-9a-f]{{8}}", name), name
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert version_name(params, COMMIT) == name  # deterministic
    assert version_name(params, COMMIT, dirty=True) == name.replace("-3bc016d-", "-3bc016d-dirty-")
    assert version_name(params, "0123456789abcdef") != name  # another commit
    params.write_text("profile: paper\n# a comment is a change too\n")
    assert version_name(params, COMMIT) != name  # other params.yaml bytes
    assert version_name(params, "").split("-")[4] == "nogit"


def test_version_name_from_checkout_and_long_package_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinned_commit: str
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("profile: paper\n")
    assert f"-{pinned_commit}-p" in version_name(params)  # $SERMTL_GIT_COMMIT: pinned, not dirty
    monkeypatch.setattr(
        kfp_client, "package_version", lambda: "12.345.6789.dev123+g0123456789abcdef.d2026" * 2
    )
    long_name = version_name(params)
    assert len(long_name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long_name)
    assert long_name.endswith(f"-{pinned_commit}-p{kfp_client.params_digest(params)[:8]}")


def test_version_name_of_missing_params_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KfpError, match="cannot read the parameter file"):
        version_name(tmp_path / "nope.yaml", COMMIT)


# --- compiling ----------------------------------------------------------------------------------------


def test_compile_twice_gives_identical_bytes(tmp_path: Path, pinned_commit: str) -> None:
    first = compile_version(tmp_path / "a", GOLDEN_PARAMS)
    second = compile_version(tmp_path / "b", GOLDEN_PARAMS)
    assert first.name == second.name == version_name(GOLDEN_PARAMS, COMMIT)
    assert first.pipeline_path == tmp_path / "a" / first.name / "pipeline.yaml"
    assert first.pipeline_path.read_bytes() == second.pipeline_path.read_bytes()
    assert first.manifests_path.read_bytes() == second.manifests_path.read_bytes()
    assert sorted(p.name for p in first.directory.iterdir()) == ["manifests.yaml", "pipeline.yaml"]


def test_compiled_ir_is_self_contained(compiled: kfp_client.CompiledVersion) -> None:
    parameters = compiled.parameters()
    assert parameters["params_yaml"]["defaultValue"] == GOLDEN_PARAMS.read_text()
    assert "defaultValue" not in parameters["corpus_uri"]  # chosen per run
    # kfp 2.17 would leave params.yaml's lines uncommented in the header; it is summarized instead
    header = [line for line in compiled.pipeline_path.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("#    params_yaml: str [Default: '<") for line in header)
    text = compiled.pipeline_path.read_text()
    assert text.index("components:") > text.index("# Outputs:")
    assert all(line.startswith("#") for line in text[: text.index("components:")].splitlines())


def test_golden_ir(tmp_path: Path) -> None:
    """The compiled IR for tests/golden/params.yaml; see the module docstring to regenerate it."""
    version = compile_version(tmp_path, GOLDEN_PARAMS, version=GOLDEN_VERSION)
    produced = version.pipeline_path.read_text()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_IR.write_text(produced)
        pytest.skip(f"rewrote {GOLDEN_IR}; review it with git diff")
    assert GOLDEN_IR.is_file(), f"{GOLDEN_IR} is missing; create it with: {REGENERATE}"
    expected = GOLDEN_IR.read_text()
    if produced != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    expected.splitlines(True), produced.splitlines(True), "golden", "compiled", n=2
                )
            )[:80]
        )
        pytest.fail(
            f"the compiled pipeline differs from {GOLDEN_IR}.\nIf the change to the DAG/components is "
            f"intended, regenerate it with:\n    {REGENERATE}\nand review the diff.\n\n{diff}"
        )


def test_manifests_hold_pipeline_and_version(tmp_path: Path, compiled: kfp_client.CompiledVersion) -> None:
    docs = list(yaml.safe_load_all(compiled.manifests_path.read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("pipelines.kubeflow.org/v2beta1", "Pipeline"),
        ("pipelines.kubeflow.org/v2beta1", "PipelineVersion"),
    ]
    pipeline, version = docs
    assert pipeline["metadata"] == {"name": "sermtl"} and pipeline["spec"]["displayName"] == "sermtl"
    assert version["metadata"] == {"name": compiled.name}
    assert version["spec"]["displayName"] == compiled.name and version["spec"]["pipelineName"] == "sermtl"
    ir = compiled.ir()
    assert version["spec"]["pipelineSpec"] == ir[0]  # the same spec as the uploaded IR
    assert version["spec"].get("platformSpec") == (ir[1] if len(ir) > 1 else None)

    namespaced = compile_version(tmp_path, GOLDEN_PARAMS, version="sermtl-ns-test", namespace="team-a")
    metadata_ = [d["metadata"] for d in yaml.safe_load_all(namespaced.manifests_path.read_text())]
    assert metadata_ == [
        {"name": "sermtl", "namespace": "team-a"},
        {"name": "sermtl-ns-test", "namespace": "team-a"},
    ]


def test_no_credentials_in_compiled_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials reach the tasks only as references to the Kubernetes Secrets (names and keys)."""
    clean = compile_version(tmp_path / "clean", GOLDEN_PARAMS, version="sermtl-secrets-test")
    secrets = {
        "AWS_ACCESS_KEY_ID": "fake-access-key-id-0001",
        "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-5f9c2e7b41",
        "AWS_SESSION_TOKEN": "fake-aws-session-token-0c3d",
        "AWS_ENDPOINT_URL": "http://s3user:s3pass-4e1f@seaweed.example:8333",
        "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user-7d1",
        "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-83ac",
        "MLFLOW_TRACKING_URI": "http://trackuser:trackpass-91b2@mlflow.example:5000",
        "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-2a9e",
        "KFP_TOKEN": TOKEN,
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    version = compile_version(tmp_path / "env", GOLDEN_PARAMS, version="sermtl-secrets-test")
    for path in (version.pipeline_path, version.manifests_path):
        text = path.read_text()
        for value in [*secrets.values(), "trackpass-91b2", "trackuser", "s3pass-4e1f", "s3user"]:
            assert value not in text, f"{value!r} leaked into {path.name}"
    # The environment of the compiling process changes nothing in the outputs...
    assert version.pipeline_path.read_bytes() == clean.pipeline_path.read_bytes()
    assert version.manifests_path.read_bytes() == clean.manifests_path.read_bytes()
    # ...and the tasks get their credentials by reference to the Secrets of infra/k8s/README.md.
    platform = version.ir()[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    references = {
        (executor, ref["secretName"], item["secretKey"], item["envVar"])
        for executor, config in platform.items()
        for ref in config.get("secretAsEnv", [])
        for item in ref["keyToEnv"]
    }
    assert ("exec-ingest-corpus", "sermtl-s3", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY") in references
    assert (
        "exec-collect-study",
        "sermtl-mlflow",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_PASSWORD",
    ) in references
    assert {secret for _, secret, _, _ in references} == {"sermtl-s3", "sermtl-mlflow"}


def test_compile_refuses_broken_params(tmp_path: Path) -> None:
    broken = tmp_path / "params.yaml"
    broken.write_text("profile: paper\ndata:\n  sampel_rate: 16000\n")
    with pytest.raises(KfpError, match="sampel_rate"):
        compile_version(tmp_path / "out", broken)
    with pytest.raises(KfpError, match="not a valid name"):
        compile_version(tmp_path / "out", GOLDEN_PARAMS, version="Not_Valid")
    assert not (tmp_path / "out").exists()


def test_compile_without_the_pipeline_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pipelines/ and components/ install with sermtl; an install that lacks them is told how to get them."""

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pipelines":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for name in [m for m in sys.modules if m.split(".")[0] in ("pipelines", "components")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])
    with pytest.raises(KfpError, match=r"install sermtl from its repository .*pipelines/ and components/"):
        compile_version(tmp_path / "out", GOLDEN_PARAMS, version="sermtl-x")
    assert not (tmp_path / "out").exists()


def test_compile_from_another_directory_finds_the_installed_pipeline(tmp_path: Path) -> None:
    """Another cwd, no PYTHONPATH, no script folder on sys.path (-P): what the install provides suffices."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import sys; from pathlib import Path; from sermtl.mlops.kfp_client import compile_version; "
        "v = compile_version(Path('out'), Path(sys.argv[1]), version='sermtl-elsewhere'); "
        "print(v.pipeline_path.is_file(), __import__('pipelines').__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code, str(GOLDEN_PARAMS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True ")


# --- parameters and cron ------------------------------------------------------------------------------


def test_param_pairs() -> None:
    assert parse_param_pairs(["corpus_uri=s3://b/p?x=1", "data_version="]) == {
        "corpus_uri": "s3://b/p?x=1",
        "data_version": "",
    }
    for bad in ("corpus_uri", "=value", " =x"):
        with pytest.raises(KfpError, match=re.escape(f"--param {bad!r} is not key=value")):
            parse_param_pairs([bad])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("0 3 * * *", "0 0 3 * * *"),
        ("  30   2 * * MON-FRI ", "0 30 2 * * MON-FRI"),
        ("*/15 * * * *", "0 */15 * * * *"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
        ("0 0 1,15 * jan,jul *", "0 0 1,15 * jan,jul *"),
        ("@daily", "@daily"),
        ("@every 6h30m", "@every 6h30m"),
    ],
)
def test_cron_accepted_and_normalised(given: str, expected: str) -> None:
    assert normalize_cron(given) == expected


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("", "0 field"),
        ("* * *", "3 field"),
        ("0 0 3 * * * 2026", "7 field"),
        ("61 * * * *", "minute value '61'"),
        ("0 25 * * *", "hour value '25'"),
        ("0 0 0 * *", "day of month value '0'"),
        ("0 0 * 13 *", "month value '13'"),
        ("0 0 * * 7", "day of week value '7'"),
        ("*/0 * * * *", "step '0'"),
        ("5-1 * * * *", "reversed"),
        ("0 0 * * funday", "funday"),
        ("@fortnightly", "unknown descriptor"),
        ("@every soon", "unknown descriptor"),
    ],
)
def test_bad_cron_is_refused_before_any_request(
    cron: str, reason: str, server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    with pytest.raises(KfpError, match=re.escape(reason)):
        schedule(server.url, compiled, cron=cron, params={"corpus_uri": CORPUS}, existing_token=TOKEN)
    assert server.requests == []


def test_unknown_or_missing_parameters_are_refused_before_any_request(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    with pytest.raises(KfpError, match=r"unknown pipeline parameter.*corpus_url.*valid: corpus_uri"):
        submit(server.url, compiled, params={"corpus_url": CORPUS}, existing_token=TOKEN)
    with pytest.raises(KfpError, match=re.escape("pass --param corpus_uri=VALUE")):
        submit(server.url, compiled, params={}, existing_token=TOKEN)
    assert server.requests == []


# --- submit / schedule against the fake server ------------------------------------------------------------


def test_submit_uploads_the_version_and_starts_the_run(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    result = submit(
        server.url,
        compiled,
        experiment="nightly",
        params={"corpus_uri": CORPUS, "data_version": "md5:abc"},
        run_name="first-run",
        existing_token=TOKEN,
    )
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in server.requests)
    assert server.requests[0].path == f"{API}/healthz"

    (create,) = server.calls("POST", f"{API}/pipelines")
    assert create.json["display_name"] == "sermtl" and create.json["name"] == "sermtl"
    (upload,) = _upload_calls(server)
    assert upload.path == f"{API}/pipelines/upload_version"
    assert upload.arg("name") == compiled.name and upload.arg("pipelineid") == result.upload.pipeline_id
    assert upload.files["uploadfile"][1] == compiled.pipeline_path.read_bytes()  # the compiled bytes
    description = upload.arg("description")
    assert COMMIT in description and compiled.params_sha256[:12] in description

    (experiment,) = server.calls("POST", f"{API}/experiments")
    assert experiment.json["display_name"] == "nightly"
    (run,) = server.calls("POST", f"{API}/runs")
    assert run.json["display_name"] == "first-run"
    assert run.json["experiment_id"] == result.upload.experiment_id
    assert run.json["pipeline_version_reference"] == {
        "pipeline_id": result.upload.pipeline_id,
        "pipeline_version_id": result.upload.version_id,
    }
    assert run.json["runtime_config"]["parameters"] == {"corpus_uri": CORPUS, "data_version": "md5:abc"}
    assert "pipeline_spec" not in run.json  # the run references the uploaded version

    assert result.upload.pipeline_created and result.upload.version_created
    assert result.run_id == server.runs[result.run_id]["run_id"]
    assert result.run_url == f"{server.url}/#/runs/details/{result.run_id}"
    stored = server.versions[result.upload.version_id]
    # With a PlatformSpec (kfp-kubernetes settings) the API stores both, nested.
    assert stored["name"] == compiled.name
    assert stored["pipeline_spec"] == {"pipeline_spec": compiled.ir()[0], "platform_spec": compiled.ir()[1]}


def test_second_submit_reuses_pipeline_version_and_experiment(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    first = submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token=TOKEN)
    second = submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token=TOKEN)
    assert len(_upload_calls(server)) == 1
    assert len(server.calls("POST", f"{API}/pipelines")) == 1
    assert len(server.calls("POST", f"{API}/experiments")) == 1
    assert len(server.calls("POST", f"{API}/runs")) == 2
    assert not second.upload.pipeline_created and not second.upload.version_created
    assert second.upload.version_id == first.upload.version_id and second.run_id != first.run_id
    assert first.run_name.startswith(compiled.name + "-")


def test_existing_pipeline_from_elsewhere_is_found(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    with server._lock:  # as if someone had uploaded the pipeline through the UI
        pipeline = server._create_pipeline({"name": "sermtl", "display_name": "sermtl"})
    result = submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token=TOKEN)
    assert result.upload.pipeline_id == pipeline["pipeline_id"] and not result.upload.pipeline_created
    assert server.calls("POST", f"{API}/pipelines") == []


def test_dirty_version_with_other_content_is_not_reused(
    tmp_path: Path, server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token=TOKEN)
    other_params = tmp_path / "params.yaml"
    other_params.write_text(GOLDEN_PARAMS.read_text() + "train: {seeds: [7]}\n")
    other = compile_version(tmp_path, other_params, version=compiled.name)  # same name, other spec
    with pytest.raises(KfpError, match=r"already exists .* with a different spec"):
        submit(
            server.url,
            dataclasses.replace(other, dirty=True),
            params={"corpus_uri": CORPUS},
            existing_token=TOKEN,
        )
    same = dataclasses.replace(compiled, dirty=True)  # dirty, but the same content: reused
    assert not submit(
        server.url, same, params={"corpus_uri": CORPUS}, existing_token=TOKEN
    ).upload.version_created


def test_schedule_creates_a_recurring_run(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    result = schedule(
        server.url,
        compiled,
        cron="30 2 * * 1-5",
        experiment="nightly",
        params={"corpus_uri": CORPUS},
        name="sermtl-nightly",
        max_concurrency=2,
        existing_token=TOKEN,
    )
    (job,) = server.calls("POST", f"{API}/recurringruns")
    assert job.json["trigger"] == {"cron_schedule": {"cron": "0 30 2 * * 1-5"}}
    assert int(job.json["max_concurrency"]) == 2 and job.json["no_catchup"] is True
    assert job.json["mode"] == "ENABLE" and job.json["display_name"] == "sermtl-nightly"
    assert job.json["runtime_config"]["parameters"] == {"corpus_uri": CORPUS}
    assert job.json["pipeline_version_reference"]["pipeline_version_id"] == result.upload.version_id
    assert job.json["experiment_id"] == result.upload.experiment_id
    assert result.created and result.cron == "0 30 2 * * 1-5" and result.max_concurrency == 2
    assert result.url == f"{server.url}/#/recurringrun/details/{result.recurring_run_id}"

    again = schedule(
        server.url,
        compiled,
        cron="0 30 2 * * 1-5",
        experiment="nightly",
        params={"corpus_uri": CORPUS},
        name="sermtl-nightly",
        existing_token=TOKEN,
    )
    assert not again.created and again.recurring_run_id == result.recurring_run_id
    assert len(server.calls("POST", f"{API}/recurringruns")) == 1 and len(_upload_calls(server)) == 1
    with pytest.raises(KfpError, match="'sermtl-nightly' already exists"):
        schedule(
            server.url,
            compiled,
            cron="0 4 * * *",
            experiment="nightly",
            params={"corpus_uri": CORPUS},
            name="sermtl-nightly",
            existing_token=TOKEN,
        )


def test_unreachable_host_is_named(compiled: kfp_client.CompiledVersion) -> None:
    host = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(KfpError, match=re.escape(f"cannot reach the KFP API at {host}")):
        submit(host, compiled, params={"corpus_uri": CORPUS})
    with pytest.raises(KfpError, match="must be an http:// or https:// URL"):
        submit("localhost:8080", compiled, params={"corpus_uri": CORPUS})


def test_server_errors_show_status_and_message_but_not_the_token(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion
) -> None:
    with pytest.raises(KfpError) as refused:
        submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token="wrong-token")
    assert "401" in str(refused.value) and "Unauthenticated" in str(refused.value)
    assert "wrong-token" not in str(refused.value)

    server.failures[("POST", f"{API}/runs")] = (500, "database is locked")
    with pytest.raises(KfpError, match=r"answered 500 .*while starting run .*: database is locked"):
        submit(server.url, compiled, params={"corpus_uri": CORPUS}, existing_token=TOKEN)


def test_multi_user_server_needs_a_namespace(compiled: kfp_client.CompiledVersion) -> None:
    with FakeKfpServer(multi_user=True) as fake:
        with pytest.raises(KfpError, match="multi-user: pass --namespace"):
            submit(fake.url, compiled, params={"corpus_uri": CORPUS})
        result = submit(fake.url, compiled, params={"corpus_uri": CORPUS}, namespace="team-a")
        assert fake.experiments[result.upload.experiment_id]["namespace"] == "team-a"
        assert fake.pipelines[result.upload.pipeline_id]["namespace"] == "team-a"


def test_token_comes_from_the_environment(
    server: FakeKfpServer, compiled: kfp_client.CompiledVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    submit(server.url, compiled, params={"corpus_uri": CORPUS})
    assert server.calls("POST", f"{API}/runs")[0].headers["authorization"] == f"Bearer {TOKEN}"


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_compile(tmp_path: Path, pinned_commit: str) -> None:
    result = CliRunner().invoke(
        app, ["pipeline", "compile", "--out", str(tmp_path), "--params", str(GOLDEN_PARAMS)]
    )
    assert result.exit_code == 0, result.output
    name = version_name(GOLDEN_PARAMS, COMMIT)
    assert f"version {name}" in result.output
    assert (tmp_path / name / "pipeline.yaml").is_file() and (tmp_path / name / "manifests.yaml").is_file()


def test_cli_submit_and_schedule(
    tmp_path: Path, server: FakeKfpServer, pinned_commit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    common = ["--host", server.url, "--out", str(tmp_path), "--params", str(GOLDEN_PARAMS)]
    runner = CliRunner()
    submit_args = ["--experiment", "cli", "--run-name", "cli-run", "--param", f"corpus_uri={CORPUS}"]
    result = runner.invoke(app, ["pipeline", "submit", *common, *submit_args])
    assert result.exit_code == 0, result.output
    (run,) = server.runs.values()
    assert f"run 'cli-run': {run['run_id']}" in result.output
    assert f"{server.url}/#/runs/details/{run['run_id']}" in result.output
    assert "uploaded" in result.output and TOKEN not in result.output
    assert run["runtime_config"]["parameters"] == {"corpus_uri": CORPUS}

    result = runner.invoke(
        app, ["pipeline", "schedule", *common, "--cron", "0 3 * * *", "--param", f"corpus_uri={CORPUS}"]
    )
    assert result.exit_code == 0, result.output
    assert "already there, reused" in result.output and "cron '0 0 3 * * *'" in result.output
    (job,) = server.recurring_runs.values()
    assert job["max_concurrency"] in (1, "1") and job["no_catchup"] is True
    assert TOKEN not in runner.invoke(app, ["pipeline", "submit", "--help"]).output


def test_cli_errors(tmp_path: Path, server: FakeKfpServer, pinned_commit: str) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    common = ["--host", server.url, "--out", str(out), "--params", str(GOLDEN_PARAMS), "--token", TOKEN]
    result = runner.invoke(app, ["pipeline", "submit", *common, "--param", "corpus_uri"])
    assert result.exit_code == 2 and "--param 'corpus_uri' is not key=value" in result.output
    result = runner.invoke(app, ["pipeline", "schedule", *common, "--cron", "every night"])
    assert result.exit_code == 2 and "'every night' has 2 field(s)" in result.output
    assert not out.exists() and server.requests == []  # refused before compiling or connecting

    host = f"http://127.0.0.1:{_free_port()}"
    result = runner.invoke(
        app, ["pipeline", "submit", *common[2:], "--host", host, "--param", f"corpus_uri={CORPUS}"]
    )
    assert result.exit_code == 2 and f"cannot reach the KFP API at {host}" in result.output
    result = runner.invoke(app, ["pipeline", "submit", *common])
    assert result.exit_code == 2 and "--param corpus_uri=VALUE" in result.output
    result = runner.invoke(
        app, ["pipeline", "submit", *common[:-1], "not-the-token", "--param", f"corpus_uri={CORPUS}"]
    )
    assert result.exit_code == 2 and "401" in result.output and "not-the-token" not in result.output


def test_compiled_bytes_do_not_depend_on_oyaml_being_imported(tmp_path: Path) -> None:
    """opensmile imports oyaml, which makes every PyYAML Dumper keep insertion order process-wide."""
    plain = compile_version(
        tmp_path / "plain", GOLDEN_PARAMS, version=GOLDEN_VERSION
    ).pipeline_path.read_bytes()
    import oyaml  # noqa: F401  (the side effect is the point)

    assert yaml.dump({"b": 1, "a": 2}) == "b: 1\na: 2\n", "oyaml's patch is active in this process"
    patched = compile_version(
        tmp_path / "oyaml", GOLDEN_PARAMS, version=GOLDEN_VERSION
    ).pipeline_path.read_bytes()
    assert patched == plain
    assert yaml.dump({"b": 1, "a": 2}) == "b: 1\na: 2\n", "compiling leaves the process's YAML as it found it"


def test_compile_takes_the_cluster_section_of_the_given_params(tmp_path: Path) -> None:
    """`sermtl pipeline compile --params X`: X's cluster settings shape the DAG, not the repository's."""
    raw = yaml.safe_load(GOLDEN_PARAMS.read_text())
    raw["cluster"] = {"gpu": {"enabled": False}, "retry": {"count": 4}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    version = compile_version(tmp_path / "out", params, version="sermtl-no-gpu")
    spec = next(yaml.safe_load_all(version.pipeline_path.read_text()))
    train = spec["deploymentSpec"]["executors"]["exec-train-system-fold"]["container"]
    assert "accelerator" not in train.get("resources", {})
    assert spec["root"]["dag"]["tasks"]["plan-study"]["retryPolicy"]["maxRetryCount"] == 4


def test_default_images_are_the_ones_built_from_this_commit(tmp_path: Path, monkeypatch) -> None:
    """No image named in params or env: the tag infra/docker/image-tag.sh gives, <version>-<commit>."""
    monkeypatch.delenv("SERMTL_IMAGE", raising=False)
    monkeypatch.delenv("SERMTL_CUDA_IMAGE", raising=False)
    monkeypatch.setenv("SERMTL_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    raw = yaml.safe_load(GOLDEN_PARAMS.read_text())
    raw.pop("cluster")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    version = compile_version(tmp_path / "out", params, version="sermtl-images")
    spec = next(yaml.safe_load_all(version.pipeline_path.read_text()))
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    tag = f"{metadata.version('sermtl')}-0123456"
    assert images.pop("exec-train-system-fold") == f"ghcr.io/sermtl/sermtl:{tag}-cuda"
    assert set(images.values()) == {f"ghcr.io/sermtl/sermtl:{tag}"}
