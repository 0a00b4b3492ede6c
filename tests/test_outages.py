"""MLflow outages and credentials, against a real `mlflow server` (sqlite backend, artifacts in a folder)
on loopback, reached through a URI with user-info, MLFLOW_TRACKING_USERNAME/PASSWORD set as well (a plain
server ignores basic auth, so it still works).

- nothing listening: every MLflow command fails within the retry budget, exit 4, one line naming the
  server without its credentials; so does a pipeline step (ServiceUnreachable);
- the server killed while `sermtl results` logs the study: the same, and after the server is back the
  next study marks the runs the dead server could not be told about FAILED;
- the whole chain (results, significance logging, compare, registration of the real ensemble, promote,
  registry) writes the password nowhere: not in the files, the artifact store, the backend store, the
  MLflow records or the output.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sermtl_localstack import MlflowServer, free_port
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.errors import ServiceUnreachable
from sermtl.evaluate.compare import log_significance
from sermtl.evaluate.results import load_runs
from sermtl.evaluate.significance import significance_tests
from sermtl.mlops import fold_run, procinfo, registry, tracking, tracking_server
from sermtl.params import Params
from tests.study_builder import write_study

REPO = Path(__file__).resolve().parents[1]
USER, SECRET = "sermtl-user", "s3cr3t-pw-XYZ"
SECRETS = (SECRET.encode(), base64.b64encode(f"{USER}:{SECRET}".encode()))  # as written, as a header
BASE = Params()
PROPOSED = BASE.eval.proposed_system
ACCURACY = {PROPOSED: 0.85, "mtl_mean": 0.35}
MODEL = "ser-outages"


def make_params(budget_s: float) -> Params:
    return dataclasses.replace(
        BASE,
        systems={name: BASE.systems[name] for name in ACCURACY},
        data=dataclasses.replace(BASE.data, sessions=[1, 2]),
        significance=dataclasses.replace(BASE.significance, resamples=2000, unit="utterance"),
        registry=dataclasses.replace(BASE.registry, model_name=MODEL),
        tracking=dataclasses.replace(BASE.tracking, retry_budget_s=budget_s),
    )


def params_file(folder: Path, budget_s: float) -> Path:
    path = folder / f"params-{budget_s:g}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(make_params(budget_s))))
    return path


def with_credentials(uri: str) -> str:
    return uri.replace("http://", f"http://{USER}:{SECRET}@", 1)


def credentials_env(monkeypatch, uri: str, experiment: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials(uri))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, experiment)
    # the children's plots are most of the logging time and nothing here reads them
    monkeypatch.setattr(fold_run, "_write_plots", lambda *args, **kwargs: None)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-outages"))
    mlflow_server.start(wait=False)  # boots while the study is fabricated
    yield mlflow_server
    mlflow_server.stop()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_study(root, make_params(5), ACCURACY, per_fold=40, seed=0)
    return root


def test_retry_policy_fits_the_budget():
    for budget in (1, 2, 5, 20, 60, 600):
        policy = tracking.retry_policy(budget)
        assert policy.backoff_s <= budget and 1 <= policy.max_retries <= tracking.MAX_RETRIES_LIMIT
        assert policy.timeout_s >= tracking.MIN_TIMEOUT_S
        assert policy.env()["MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER"] == "false"
    assert tracking.retry_policy(20).max_retries == 4  # waits 0, 2, 4, 8 s (+ jitter): 15.5 s at most


def test_nothing_listening_fails_fast_exit_4_naming_the_server(train_dir, tmp_path, monkeypatch):
    port = free_port()
    target = f"http://127.0.0.1:{port}"
    credentials_env(monkeypatch, target, "outages-nothing")
    path = params_file(tmp_path, 2)
    expected = (
        f"error: could not reach MLflow at {target}: connection refused; gave up after 2 attempts "
        "(tracking.retry_budget_s = 2 s)"
    )
    runner = CliRunner()
    commands = {
        "results": ["results", "--train-dir", str(train_dir), "--out", str(tmp_path / "results")],
        "compare": ["compare", "--out", str(tmp_path / "comparison")],
        "promote": ["promote", MODEL, "--reason", "outage drill"],
        "rollback": ["rollback", MODEL, "--reason", "outage drill"],
        "registry": ["registry", MODEL],
    }
    for command, args in commands.items():
        started = time.monotonic()
        result = runner.invoke(app, [*args, "--params", str(path)])
        elapsed = time.monotonic() - started
        assert result.exit_code == 4, (command, result.output)
        assert error_lines(result.output) == [expected], (command, result.output)
        assert SECRET not in result.output and "Traceback" not in result.output
        assert elapsed < 15, (command, elapsed)
        print(f"\nnothing listening: `sermtl {command}` exit 4 in {elapsed:.1f} s")

    # a pipeline step (what the KFP components call): the same error, as an exception
    from sermtl.pipeline_runner import collect_step

    started = time.monotonic()
    with pytest.raises(ServiceUnreachable) as raised:
        collect_step(
            [str(run) for run in sorted(train_dir.glob("*/fold*"))],
            tmp_path / "store",
            path.read_text(),
            tmp_path / "collect",
            tmp_path / "collect.html",
            tmp_path / "collect.md",
            pipeline_run_id="kfp-outage",
        )
    assert str(raised.value) == expected.removeprefix("error: ")
    assert time.monotonic() - started < 15
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") is None  # the policy is undone afterwards


class _Page(list):
    token = None


class _FakeClient:
    """search_runs over fixed runs; records what is marked."""

    def __init__(self, runs: list[SimpleNamespace]) -> None:
        self.runs, self.terminated, self.tagged = runs, {}, {}

    def search_runs(self, experiment_ids, filter_string="", max_results=1000, page_token=None):
        assert filter_string == "attributes.status = 'RUNNING'"
        return _Page(self.runs)

    def set_terminated(self, run_id, status):
        self.terminated[run_id] = status

    def set_tag(self, run_id, key, value):
        self.tagged[(run_id, key)] = value


def _run(run_id: str, name: str = "study", **tags: str) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, run_name=name), data=SimpleNamespace(tags=tags)
    )


def test_orphaned_runs_are_only_those_nobody_will_end(monkeypatch):
    me = procinfo.current()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: its pid is gone
    dead = dataclasses.replace(me, pid=child.pid, started="1")
    assert procinfo.is_gone(dead) and not procinfo.is_gone(me)
    assert not procinfo.is_gone(dataclasses.replace(dead, host="elsewhere"))  # cannot know: not ours
    assert not procinfo.is_gone(dataclasses.replace(dead, machine=""))
    parent = procinfo.ProcessId(me.host, os.getppid(), "1", me.machine)
    assert procinfo.is_gone(parent)  # that pid runs, but a process started at another time: reused

    prefix = tracking.TAG_PROCESS
    runs = [
        _run("dead", **dead.to_tags(prefix)),
        _run("child-of-dead", "s/fold0", **{tracking.TAG_PARENT: "dead"}),
        _run("alive", **me.to_tags(prefix)),  # a study this very process still has open
        _run("abandoned", **me.to_tags(prefix)),
        _run("elsewhere", **dataclasses.replace(dead, host="other-host").to_tags(prefix)),
        _run("kfp-retry", "study-kfp-1", **{tracking.TAG_PIPELINE_RUN: "kfp-1"}),
        _run("kfp-other-step", "registration", **{tracking.TAG_PIPELINE_RUN: "kfp-1"}),
    ]
    monkeypatch.setattr(tracking_server, "_ABANDONED", {"abandoned"})
    client = _FakeClient(runs)
    marked = tracking.fail_orphaned_runs(client, "1", run_name="study-kfp-1", pipeline_run_id="kfp-1")
    assert set(marked) == {"dead", "child-of-dead", "abandoned", "kfp-retry"}
    assert set(client.terminated.values()) == {"FAILED"} and set(client.terminated) == set(marked)
    why = {run_id: value for (run_id, _), value in client.tagged.items()}
    assert f"(pid {dead.pid} on {me.host}) is gone" in why["dead"]
    assert "parent run dead" in why["child-of-dead"] and "pipeline run kfp-1" in why["kfp-retry"]
    assert not tracking_server._ABANDONED


RESULTS_HOOKED = r"""
import sys, time
from pathlib import Path
from sermtl import cli
from sermtl.mlops import fold_run

flag, go_on = Path(sys.argv[1]), Path(sys.argv[2])
log_metrics = fold_run.log_metrics
fold_run._write_plots = lambda *args, **kwargs: None


def after_the_first_child_exists(*args, **kwargs):
    if not flag.exists():
        flag.touch()  # the study run and its first child run exist: the test kills the server now
        deadline = time.monotonic() + 120
        while not go_on.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return log_metrics(*args, **kwargs)


fold_run.log_metrics = after_the_first_child_exists
sys.argv = ["sermtl", *sys.argv[3:]]
cli.main()
"""


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}):\n{process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{path} not created within {timeout_s} s"
        time.sleep(0.05)


def _runs(uri: str, experiment: str) -> dict[str, object]:
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    return {run.info.run_id: run for run in client.search_runs([found.experiment_id])}


@pytest.mark.slow
def test_server_killed_mid_study_exit_4_then_its_runs_end_failed(server, train_dir, tmp_path, monkeypatch):
    experiment = "outages-killed"
    uri = server.wait_ready().tracking_uri
    path = params_file(tmp_path, 5)
    flag, go_on = tmp_path / "first-child", tmp_path / "go-on"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": with_credentials(uri),
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": SECRET,
        tracking.EXPERIMENT_ENV: experiment,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    args = ["results", "--train-dir", str(train_dir), "--out", str(tmp_path / "r1"), "--params", str(path)]
    process = subprocess.Popen(
        [sys.executable, "-c", RESULTS_HOOKED, str(flag), str(go_on), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(flag, process)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        killed = time.monotonic()
        go_on.touch()
        stdout, stderr = process.communicate(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 4, stderr[-3000:]
    assert elapsed < 30  # budget 5 s: one call's retries, then quick, failed attempts to mark the runs
    errors = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: could not reach MLflow at {uri}: "), stderr
    assert "(tracking.retry_budget_s = 5 s)" in errors[0]
    assert "Traceback" not in stderr and SECRET not in stdout + stderr
    print(f"\nserver killed mid-study: `sermtl results` exit 4, {elapsed:.1f} s after the kill")

    # the dead server could not be told: its runs are still RUNNING once it is back ...
    server.start()
    before = _runs(uri, experiment)
    assert {run.info.status for run in before.values()} == {"RUNNING"} and len(before) == 2, before
    # ... until the next study in the experiment, which marks them FAILED (their process is gone)
    credentials_env(monkeypatch, uri, experiment)
    again = CliRunner().invoke(
        app, ["results", "--train-dir", str(train_dir), "--out", str(tmp_path / "r2"), "--params", str(path)]
    )
    assert again.exit_code == 0, again.output
    after = _runs(uri, experiment)
    for run_id in before:
        run = after[run_id]
        assert run.info.status == "FAILED", run
        why = run.data.tags[tracking.TAG_ORPHANED]
        parent = run.data.tags.get(tracking.TAG_PARENT)
        assert f"(pid {process.pid} on " in why or f"parent run {parent}" in why, why
    new = [run for run_id, run in after.items() if run_id not in before]
    assert len(new) == 1 + len(ACCURACY) * 2 and {run.info.status for run in new} == {"FINISHED"}


def _assert_nowhere(folders: list[Path], texts: list[str]) -> int:
    """No secret in any file under `folders` (bytes: parquet, png, sqlite too) or in `texts`."""
    checked = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(secret in data for secret in SECRETS), path
                checked += 1
    for text in texts:
        assert not any(secret.decode() in text for secret in SECRETS), text[-2000:]
    return checked


def _records(uri: str, experiment: str) -> list[str]:
    """Every MLflow record of the experiment and the model as text: runs (params, tags, metric keys),
    the experiment's tags, logged models, registered models and versions (tags, descriptions)."""
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    out = [json.dumps(found.tags), found.artifact_location]
    for run in client.search_runs([found.experiment_id]):
        out += [json.dumps(run.data.params), json.dumps(run.data.tags), " ".join(run.data.metrics)]
        out.append(run.info.artifact_uri)
    for logged in client.search_logged_models([found.experiment_id]):
        out += [json.dumps(logged.tags), json.dumps(logged.params), logged.artifact_location]
    for model in client.search_registered_models():
        out += [json.dumps(model.tags), model.description or "", json.dumps(model.aliases)]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            out += [json.dumps(version.tags), version.description or "", version.source or ""]
    return out


@pytest.mark.slow
def test_credentials_are_written_nowhere(server, train_dir, tmp_path, monkeypatch, capfd):
    from tests.test_registry import _tiny_networks

    experiment = "outages-credentials"
    uri = server.wait_ready().tracking_uri
    credentials_env(monkeypatch, uri, experiment)
    params = make_params(20)
    path = params_file(tmp_path, 20)
    runner = CliRunner()
    outputs = []

    result = runner.invoke(
        app,
        ["results", "--train-dir", str(train_dir), "--out", str(tmp_path / "results"), "--params", str(path)],
    )
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    study = result.output.strip().splitlines()[-1].removeprefix("MLflow study run: ")

    report = significance_tests(load_runs(train_dir, params)[0], params)
    with tracking.mlflow_service(params):
        log_significance(study, report)

    result = runner.invoke(
        app, ["compare", "--study", study, "--out", str(tmp_path / "comparison"), "--params", str(path)]
    )
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "comparison" / "comparison.json").read_text())
    assert written["study"]["tracking_uri"] == uri  # the server, without its user-info

    # registration of the real ensemble (tiny untrained networks): the fluent model logging path too
    registered = tmp_path / "registered"
    shutil.copytree(train_dir / PROPOSED, registered / PROPOSED)
    _tiny_networks(registered)
    with tracking.mlflow_service(params):
        registration = registry.register_study_model(study, registered, report, params)
    assert registration.version == "1", registration.describe()

    for args in (["promote", MODEL, "--reason", "first model"], ["registry", MODEL]):
        result = runner.invoke(app, [*args, "--params", str(path)])
        outputs.append(result.output)
        assert result.exit_code == 0, result.output
    assert "champion: 1" in result.output

    captured = capfd.readouterr()
    folders = [tmp_path, Path(server.directory)]  # outputs, artifact store, sqlite backend, server log
    assert _assert_nowhere(folders, [*outputs, captured.out, captured.err, *_records(uri, experiment)]) > 50
