"""Registration gate, promotion, rollback and the promotion lock, against a real MLflow server whose
backend store is a real PostgreSQL server and whose artifacts go to the real SeaweedFS S3 server.

Studies are fabricated (tests/study_builder.py) with the same seed, so every study has the same
utterances and labels and only the proposed system's accuracy differs; their significance reports are
the real evaluate.significance. One registration logs the real ensemble (mlops.serving) of tiny untrained
networks and loads it back; the others log a trivial stand-in pyfunc to keep the file fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sermtl.evaluate import gate
from sermtl.evaluate.metrics import uar
from sermtl.evaluate.results import load_runs
from sermtl.evaluate.significance import (
    P_VALUE_KEYS,
    TESTS,
    Comparison,
    SignificanceReport,
    significance_tests,
)
from sermtl.mlops import model_logging, registry, tracking
from sermtl.params import GateParams, Params
from sermtl.schema import DIMENSIONS
from tests.study_builder import write_study

PARAMS = Params()
PROPOSED = PARAMS.eval.proposed_system
BASELINES = [s for s in PARAMS.systems if s != PROPOSED]
REPO = Path(__file__).resolve().parents[1]


# --- the gate on constructed reports (no server) ---------------------------------------------------------


def _report(flags: dict[tuple[str, str], str], test: str = "resampling", baselines=("b1", "b2")):
    """A report whose `test` says 'better'/'worse' where `flags` says so; every other test says nothing."""
    comparisons = []
    for baseline in baselines:
        for dimension in DIMENSIONS:
            flag = flags.get((baseline, dimension), "")
            p = 0.001 if flag else 0.4
            difference = {"better": 0.1, "worse": -0.1}.get(flag, 0.01)
            comparisons.append(
                Comparison(
                    baseline=baseline,
                    dimension=dimension,
                    n=120,
                    uar_proposed=0.5 + difference,
                    uar_baseline=0.5,
                    difference=difference,
                    ci_low=difference - 0.05,
                    ci_high=difference + 0.05,
                    cohens_h=0.0,
                    discordant_proposed=10,
                    discordant_baseline=10,
                    odds_ratio=1.0,
                    z=0.0,
                    p=dict.fromkeys(P_VALUE_KEYS, p),
                    p_adjusted={k: (p if k == test else 0.4) for k in P_VALUE_KEYS},
                    better={t: t == test and flag == "better" for t in TESTS},
                    worse={t: t == test and flag == "worse" for t in TESTS},
                )
            )
    return SignificanceReport(
        proposed=PROPOSED,
        baselines=list(baselines),
        dimensions=list(DIMENSIONS),
        subset="all",
        n=dict.fromkeys(DIMENSIONS, 120),
        params={"alpha": 0.05, "correction": "holm", "resampling": "bootstrap"},
        comparisons=comparisons,
    )


def test_gate_passes_when_significantly_better_than_every_baseline():
    report = _report({("b1", "arousal"): "better", ("b2", "valence"): "better", ("b2", "arousal"): "better"})
    decision = gate.gate_decision(report, GateParams())
    assert decision.passed
    assert decision.wins == {"b1": ["arousal"], "b2": [d for d in DIMENSIONS if d in ("valence", "arousal")]}
    assert decision.losses == {"b1": [], "b2": []}
    assert decision.p_values["b1"]["arousal"] == 0.001 and decision.p_values["b1"]["valence"] == 0.4
    assert gate.gate_decision(report.to_dict(), GateParams()) == decision  # significance.json works too


def test_gate_fails_naming_the_baseline_without_a_win():
    decision = gate.gate_decision(_report({("b1", "arousal"): "better"}), GateParams())
    assert not decision.passed
    assert any("vs b2" in r and "0 dimension(s)" in r and "at least 1" in r for r in decision.reasons)
    strict = gate.gate_decision(
        _report({("b1", "arousal"): "better", ("b2", "arousal"): "better", ("b2", "dominance"): "better"}),
        GateParams(min_dimensions_better=2),
    )
    assert not strict.passed
    assert [r for r in strict.reasons if "needs at least 2" in r] == [
        "vs b1: significantly better on 1 dimension(s) (arousal); needs at least 2"
    ]


def test_gate_counts_significantly_worse_comparisons():
    flags = {("b1", "arousal"): "better", ("b2", "arousal"): "better", ("b1", "valence"): "worse"}
    failed = gate.gate_decision(_report(flags), GateParams(max_comparisons_worse=0))
    assert not failed.passed
    assert any("significantly worse in 1 comparison(s) (b1/valence)" in r for r in failed.reasons)
    assert failed.losses["b1"] == ["valence"]
    assert gate.gate_decision(_report(flags), GateParams(max_comparisons_worse=1)).passed


def test_gate_reads_only_the_configured_test():
    report = _report({("b1", "arousal"): "better", ("b2", "arousal"): "better"}, test="mcnemar")
    assert gate.gate_decision(report, GateParams(test="mcnemar")).passed
    resampling = gate.gate_decision(report, GateParams(test="resampling"))
    assert not resampling.passed and resampling.test == "resampling"


def test_postgres_binaries_missing_is_a_clear_error(monkeypatch):
    import sermtl_localstack.postgres as localstack

    monkeypatch.setattr(localstack.shutil, "which", lambda name: None)
    monkeypatch.setattr(localstack.glob, "glob", lambda pattern: [])
    with pytest.raises(FileNotFoundError, match=r"PostgreSQL server binaries \(initdb, pg_ctl, postgres\)"):
        localstack.PostgresServer().start()


# --- studies on the server ---------------------------------------------------------------------------------


def _accuracy(proposed: float, baselines: float) -> dict[str, float]:
    return {system: proposed if system == PROPOSED else baselines for system in PARAMS.systems}


# label -> (proposed accuracy, baseline accuracy). Same seed: same utterances and labels; a more accurate
# proposed system is right on a superset of the utterances (the draws are coupled).
STUDIES = {
    "good": (0.85, 0.35),
    "better": (0.88, 0.35),
    "best": (0.90, 0.35),
    "worse": (0.60, 0.35),  # passes its own gate, far below `good`
    "bad": (0.40, 0.80),  # fails the gate
}


def _tiny_networks(train_dir: Path) -> None:
    """Untrained but real fold networks (the training contract's model/ folders), for the real ensemble."""
    import torch

    from sermtl.model.network import ModelConfig, build_model
    from sermtl.train.run_files import write_model_dir as _write_model_dir
    from sermtl.train.trainer import MTL_NETWORK

    config = ModelConfig(
        tasks=list(PARAMS.eval.dimensions),
        sample_rate=PARAMS.data.sample_rate,
        frame_samples=320,
        hop_samples=320,
        conv_channels=4,
        conv_kernel=8,
        conv_pool=2,
        rnn_hidden=8,
        rnn_layers=1,
    )
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    for fold in range(len(PARAMS.data.sessions)):
        _write_model_dir(
            train_dir / PROPOSED / f"fold{fold}",
            PROPOSED,
            50,
            list(PARAMS.eval.dimensions),
            {MTL_NETWORK: (config, state)},
            seed=0,
        )


@pytest.fixture(scope="module")
def server(pg_mlflow_server, tmp_path_factory):
    """The PostgreSQL-backed server; clients get only its URI (no S3 credentials needed).

    While it boots, the studies are fabricated and tested (`study_data`), so the two overlap.
    """
    data = _study_data(tmp_path_factory)
    pg_mlflow_server.wait_ready()
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = pg_mlflow_server.tracking_uri
    pg_mlflow_server.study_data = data
    yield pg_mlflow_server
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _study_data(tmp_path_factory) -> dict[str, SimpleNamespace]:
    out = {}
    for label, (proposed, baselines) in STUDIES.items():
        train_dir = tmp_path_factory.mktemp(f"train-{label}")
        write_study(train_dir, PARAMS, _accuracy(proposed, baselines), per_fold=40, seed=0)
        report = significance_tests(load_runs(train_dir, PARAMS)[0], PARAMS)
        out[label] = SimpleNamespace(train_dir=train_dir, report=report)
    _tiny_networks(out["good"].train_dir)
    return out


@pytest.fixture(scope="module")
def studies(server) -> dict[str, SimpleNamespace]:
    """One fabricated, tracked study per label: train dir, real significance report, study run."""
    out = {}
    for label, data in server.study_data.items():
        run_id = tracking.start_study(
            f"study-{label}",
            PARAMS,
            data_version="md5-registry-tests",
            pipeline_run_id=f"kfp-{label}",
            experiment="registry-tests",
        )
        tracking.end_study(run_id)
        out[label] = SimpleNamespace(train_dir=data.train_dir, report=data.report, run_id=run_id)
    return out


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float], params=None) -> pd.DataFrame:
        return pd.DataFrame({"arousal_class": np.ones(len(model_input), dtype=np.int64)})


@pytest.fixture(scope="module")
def constant_model_dir(tmp_path_factory) -> Path:
    """A saved trivial pyfunc, made once: what the stand-in uploads."""
    folder = tmp_path_factory.mktemp("constant-model") / "model"
    mlflow.pyfunc.save_model(folder, python_model=_Constant(), pip_requirements=["mlflow"])
    return folder


def _stand_in_ensemble(model_dir: Path):
    """Stand-in for model_logging.log_ensemble_model: uploads a trivial pyfunc as a LoggedModel of the run
    (the real one is exercised once, in the first registration test)."""

    def log_ensemble_model(train_dir, system, folds, params, *, run_id, tracking_uri=None):
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        client = tracking.client(tracking_uri)
        experiment = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment, name="ensemble", source_run_id=run_id)
        client.log_model_artifacts(logged.model_id, str(model_dir))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        return f"models:/{logged.model_id}"

    return log_ensemble_model


@pytest.fixture
def fake_serving(monkeypatch, constant_model_dir):
    from sermtl.mlops import model_logging

    monkeypatch.setattr(model_logging, "log_ensemble_model", _stand_in_ensemble(constant_model_dir))


@pytest.fixture
def name() -> str:
    return f"ser-{uuid.uuid4().hex[:8]}"


def _params(model_name: str, **promotion) -> Params:
    return dataclasses.replace(
        PARAMS,
        registry=dataclasses.replace(
            PARAMS.registry,
            model_name=model_name,
            promotion=dataclasses.replace(PARAMS.registry.promotion, **promotion),
        ),
    )


def _register(studies, label: str, model_name: str) -> str:
    study = studies[label]
    result = registry.register_study_model(study.run_id, study.train_dir, study.report, _params(model_name))
    assert result.version is not None, result.decision.reasons
    return result.version


def _client():
    return tracking.client()


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_registration_logs_the_ensemble_tags_the_version_and_sets_challenger(server, studies, name):
    study = studies["good"]
    params = _params(name)
    started = time.monotonic()
    result = registry.register_study_model(study.run_id, study.train_dir, study.report, params)
    assert result.decision.passed and result.version == "1" and not result.reused
    client = _client()
    version = client.get_model_version_by_alias(name, registry.CHALLENGER)
    assert version.version == "1"
    tags = version.tags
    assert tags[registry.TAG_STUDY_RUN] == study.run_id
    assert tags[registry.TAG_GATE_PASSED] == "true" and tags[registry.TAG_GATE_TEST] == "resampling"
    assert tags["sermtl.data_version"] == "md5-registry-tests"
    assert tags["sermtl.pipeline_run_id"] == "kfp-good"
    study_tags = client.get_run(study.run_id).data.tags  # provenance comes from the study run
    assert tags["sermtl.git_commit"] == study_tags["sermtl.git_commit"] and tags["sermtl.git_commit"]
    assert tags["sermtl.system"] == PROPOSED
    oof = pd.concat(
        pd.read_parquet(study.train_dir / PROPOSED / f"fold{k}" / "predictions.parquet") for k in range(5)
    )
    for dimension in DIMENSIONS:
        rows = oof[oof["dimension"] == dimension]
        assert float(tags[f"sermtl.uar.{dimension}"]) == pytest.approx(uar(rows["label"], rows["prediction"]))
        for baseline in BASELINES:
            p = study.report.comparison(baseline, dimension).p_adjusted["resampling"]
            assert float(tags[f"sermtl.p.{baseline}.{dimension}"]) == pytest.approx(p, rel=1e-5)
    assert float(tags["sermtl.uar.mean"]) > 0.8
    run_id = tags[registry.TAG_REGISTRATION_RUN]
    run = client.get_run(run_id)
    assert version.run_id == run_id
    assert run.info.run_name == "registration" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == study.run_id
    assert {registry.ARTIFACT_OOF, registry.ARTIFACT_SIGNIFICANCE, registry.ARTIFACT_GATE} <= _artifacts(
        client, run_id
    )
    logged_oof = pd.read_parquet(client.download_artifacts(run_id, registry.ARTIFACT_OOF))
    assert len(logged_oof) == len(oof) and set(logged_oof["system"]) == {PROPOSED}
    study_tags = client.get_run(study.run_id).data.tags
    assert study_tags[registry.TAG_GATE_PASSED] == "true"
    assert study_tags[registry.TAG_REGISTERED_VERSION] == "1"
    assert registry.ARTIFACT_STUDY_GATE in _artifacts(client, study.run_id)

    # the registered model is the real ensemble: it loads from the registry and predicts from audio
    model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHALLENGER}")
    waveform = np.sin(np.linspace(0, 200, PARAMS.data.sample_rate // 2)).astype(np.float32) * 0.1
    predicted = model.predict(waveform)
    assert len(predicted) == 1 and set(predicted["arousal_class"]) <= {0, 1, 2}

    again = registry.register_study_model(study.run_id, study.train_dir, study.report, params)
    assert again.reused and again.version == "1"
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    print(f"\nregistration with the real ensemble: {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_failed_gate_registers_nothing_and_records_why(server, studies, name, fake_serving):
    study = studies["bad"]
    result = registry.register_study_model(study.run_id, study.train_dir, study.report, _params(name))
    assert result.version is None and not result.decision.passed
    client = _client()
    assert client.search_registered_models(f"name = '{name}'") == []
    tags = client.get_run(study.run_id).data.tags
    assert tags[registry.TAG_GATE_PASSED] == "false"
    assert tags[registry.TAG_REGISTERED_VERSION] == "none"
    reasons = json.loads(tags[registry.TAG_GATE_REASONS])
    for baseline in BASELINES:
        assert any(r.startswith(f"vs {baseline}: significantly better on 0 dimension(s)") for r in reasons)
    assert any("significantly worse in" in r for r in reasons)
    gate = json.loads(Path(client.download_artifacts(study.run_id, registry.ARTIFACT_STUDY_GATE)).read_text())
    assert gate["passed"] is False and gate["model"] == name and gate["reasons"] == reasons


@pytest.mark.slow
def test_promotion_lifecycle_refusal_of_a_worse_challenger_and_rollback_walk(
    server, studies, name, fake_serving
):
    params = _params(name)
    client = _client()
    first = _register(studies, "good", name)
    result = registry.promote(name, params=params, actor="alice", reason="first model")
    assert result.promoted and result.version == first and result.champion_before is None
    assert result.evidence["reasons"] == ["no champion yet"]
    model = client.get_registered_model(name)
    assert model.aliases == {registry.CHAMPION: first}  # `challenger` is gone once promoted
    assert model.tags[registry.TAG_CHAMPION_BY] == "alice"
    tags = client.get_model_version(name, first).tags
    assert tags[registry.TAG_PROMOTED_BY] == "alice" and tags[registry.TAG_PROMOTION_REASON] == "first model"
    assert tags[registry.TAG_PROMOTED_AT].endswith("Z") and tags[registry.TAG_PROMOTION_FORCED] == "false"

    worse = _register(studies, "worse", name)
    not_shown = (
        r"arousal: challenger - champion UAR -0\.\d+, 95% interval \[-0\.\d+, -0\.\d+\] by speaker: its"
    )
    with pytest.raises(registry.PromotionRefused, match=not_shown) as refused:
        registry.promote(name, params=params, actor="bob", reason="newer study")
    assert refused.value.kind == "rule" and not refused.value.conflict
    evidence = refused.value.result.evidence
    assert evidence["worse"] == list(PARAMS.eval.dimensions) and evidence["non_inferior"] == []
    assert (evidence["rule"], evidence["margin"], evidence["unit"]) == ("not_worse", 0.01, "speaker")
    assert all(high < -0.01 for _, high in evidence["intervals"].values())
    assert evidence["utterances"] == {"challenger": 200, "champion": 200, "paired": 200}
    assert evidence["mean_uar"]["challenger"] < evidence["mean_uar"]["champion"]
    model = client.get_registered_model(name)
    assert model.aliases == {registry.CHAMPION: first, registry.CHALLENGER: worse}
    refusal = json.loads(client.get_model_version(name, worse).tags[registry.TAG_LAST_REFUSAL])
    assert refusal["by"] == "bob" and refusal["kind"] == "rule"
    assert registry.TAG_PROMOTED_BY not in client.get_model_version(name, worse).tags

    with pytest.raises(registry.PromotionRefused, match=r"200 utterances .* 200; 200 are common .* 1000 are"):
        registry.promote(name, worse, params=params, actor="bob", reason="try", min_paired=1000)

    better = _register(studies, "better", name)
    result = registry.promote(name, params=params, actor="carol", reason="better model")
    assert result.version == better and result.champion_before == first
    assert result.evidence["rule_passed"] and result.evidence["worse"] == []
    model = client.get_registered_model(name)
    assert model.aliases[registry.CHAMPION] == better
    assert model.aliases[registry.PREVIOUS_CHAMPION] == first
    evidence_uri = client.get_model_version(name, better).tags[registry.TAG_PROMOTION_EVIDENCE_ARTIFACT]
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(evidence_uri)).read_text())
    assert logged["evidence"]["champion"] == first and logged["actor"] == "carol"
    intervals = logged["evidence"]["intervals"]  # non-inferiority, registry.promotion.margin 0.01
    assert logged["evidence"]["margin"] == 0.01 and all(low >= -0.01 for low, _ in intervals.values())
    audit = registry.registry_state(name).audit[-1]["evidence"]
    assert (audit["rule"], audit["margin"], audit["intervals"]) == ("not_worse", 0.01, intervals)
    assert audit["reasons"][0].startswith(
        "non-inferior on every dimension: lower bounds of the 95% intervals"
    )

    best = _register(studies, "best", name)
    registry.promote(name, params=params, actor="carol", reason="best model")
    model = client.get_registered_model(name)
    assert model.aliases == {registry.CHAMPION: best, registry.PREVIOUS_CHAMPION: better}
    assert json.loads(model.tags[registry.TAG_HISTORY]) == [first, better]

    # rollbacks walk back through the history, then refuse
    back = registry.rollback(name, actor="ops", reason="latency regression")
    assert (back.version, back.champion_before) == (better, best)
    model = client.get_registered_model(name)
    assert model.aliases[registry.CHAMPION] == better and model.aliases[registry.PREVIOUS_CHAMPION] == first
    assert (
        model.tags[registry.TAG_CHAMPION_ACTION] == "rollback"
        and model.tags[registry.TAG_CHAMPION_BY] == "ops"
    )
    demoted = json.loads(client.get_model_version(name, best).tags[registry.TAG_ROLLED_BACK])
    assert demoted["reason"] == "latency regression" and demoted["version"] == better
    assert registry.rollback(name, actor="ops", reason="again").version == first
    assert client.get_registered_model(name).aliases == {registry.CHAMPION: first}
    with pytest.raises(registry.PromotionRefused, match="nothing to roll back to") as refused:
        registry.rollback(name, actor="ops", reason="once more")
    assert refused.value.kind == "no_history"

    state = registry.registry_state(name)
    assert state.champion == first and state.challenger is None and state.history == []
    assert [(e["action"], e["version"], e["actor"]) for e in state.audit] == [
        ("promote", first, "alice"),
        ("promote", better, "carol"),
        ("promote", best, "carol"),
        ("rollback", better, "ops"),
        ("rollback", first, "ops"),
    ]
    assert [v.gate for v in state.versions] == ["passed"] * 4
    table = state.table()
    assert f"champion: {first}; challenger: none" in table and "latency regression" in table


@pytest.mark.slow
def test_forced_promotion_of_a_failed_gate_version_needs_a_reason(server, studies, name, fake_serving):
    params = _params(name)
    client = _client()
    good = _register(studies, "good", name)
    registry.promote(name, params=params, actor="alice", reason="first")
    # a version registered by hand, its gate failed: no out-of-fold predictions either
    experiment = tracking.ensure_experiment("registry-tests")
    run = client.create_run(experiment, run_name="manual")
    uri = model_logging.log_ensemble_model(None, PROPOSED, [], params, run_id=run.info.run_id)  # the stand-in
    with tracking.fluent_tracking_uri(tracking.tracking_uri()):
        manual = mlflow.register_model(
            uri,
            name,
            tags={registry.TAG_GATE_PASSED: "false", registry.TAG_GATE_REASONS: '["vs mtl_mean: no win"]'},
        ).version

    with pytest.raises(registry.PromotionRefused, match="did not pass the registration gate") as refused:
        registry.promote(name, manual, params=params, actor="dave", reason="hotfix")
    assert refused.value.kind == "gate" and "vs mtl_mean: no win" in str(refused.value)
    with pytest.raises(registry.PromotionRefused, match="non-empty reason") as refused:
        registry.promote(name, manual, params=params, actor="dave", force=True, reason="  ")
    assert refused.value.kind == "input"
    assert client.get_registered_model(name).aliases[registry.CHAMPION] == good

    result = registry.promote(name, manual, params=params, actor="dave", force=True, reason="hotfix INC-42")
    assert result.promoted and result.forced
    assert result.evidence["gate_passed"] is False and result.evidence["rule_passed"] is False
    assert "no out-of-fold predictions" in result.evidence["reasons"][0]
    tags = client.get_model_version(name, manual).tags
    assert tags[registry.TAG_PROMOTION_FORCED] == "true"
    assert tags[registry.TAG_PROMOTION_REASON] == "hotfix INC-42"
    state = registry.registry_state(name)
    assert state.champion == manual and state.aliases[registry.PREVIOUS_CHAMPION] == good
    assert state.audit[-1]["forced"] is True and state.audit[-1]["reason"] == "hotfix INC-42"


RACER = r"""
import json, sys, time
from pathlib import Path
from sermtl.mlops import registry
from sermtl.params import load_params

name, version, actor, barrier, params_path = sys.argv[1:6]
params = load_params(params_path)
barrier = Path(barrier)
(barrier / f"ready-{actor}").touch()
deadline = time.monotonic() + 120
while not (barrier / "go").exists():
    if time.monotonic() > deadline:
        sys.exit(97)
    time.sleep(0.002)
try:
    result = registry.promote(name, version, params=params, actor=actor, reason=f"race {actor}")
    print(json.dumps({"promoted": True, "version": result.version, "actor": actor}))
except registry.PromotionRefused as exc:
    print(json.dumps({"promoted": False, "kind": exc.kind, "message": str(exc), "actor": actor}))
    sys.exit(1)
"""


@pytest.mark.slow
def test_two_concurrent_promotions_exactly_one_wins(server, studies, name, fake_serving, tmp_path):
    params = _params(name)
    client = _client()
    champion = _register(studies, "good", name)
    registry.promote(name, params=params, actor="setup", reason="setup")
    contenders = {"racer-a": _register(studies, "better", name), "racer-b": _register(studies, "best", name)}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(dataclasses.asdict(params)))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    processes = {
        actor: subprocess.Popen(
            [sys.executable, "-c", RACER, name, version, actor, str(barrier), str(params_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for actor, version in contenders.items()
    }
    try:
        deadline = time.monotonic() + 120
        while not all((barrier / f"ready-{actor}").exists() for actor in processes):
            failed = {a: p.returncode for a, p in processes.items() if p.poll() is not None}
            assert not failed, f"a racer exited before the start: {failed}"
            assert time.monotonic() < deadline, "racers not ready within 120 s"
            time.sleep(0.05)
        (barrier / "go").touch()
        outcomes = {}
        for actor, process in processes.items():
            stdout, stderr = process.communicate(timeout=180)
            assert process.returncode in (0, 1), f"{actor} crashed ({process.returncode}):\n{stderr[-3000:]}"
            outcomes[actor] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    winners = [a for a, o in outcomes.items() if o["promoted"]]
    losers = [a for a, o in outcomes.items() if not o["promoted"]]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    winner, loser = winners[0], losers[0]
    assert outcomes[loser]["kind"] == "stale", outcomes[loser]
    assert f"changed from {champion} to {contenders[winner]} (by {winner})" in outcomes[loser]["message"]

    model = client.get_registered_model(name)
    assert model.aliases[registry.CHAMPION] == contenders[winner]
    assert model.aliases[registry.PREVIOUS_CHAMPION] == champion
    assert model.tags[registry.TAG_CHAMPION_BY] == winner
    assert model.tags[registry.TAG_CHAMPION_VERSION] == contenders[winner]
    assert json.loads(model.tags[registry.TAG_HISTORY]) == [champion]
    audit = registry.registry_state(name).audit
    assert [(e["actor"], e["version"], e["from"]) for e in audit] == [
        ("setup", champion, None),
        (winner, contenders[winner], champion),
    ]
    winner_tags = client.get_model_version(name, contenders[winner]).tags
    assert winner_tags[registry.TAG_PROMOTED_BY] == winner
    assert winner_tags[registry.TAG_PROMOTION_REPLACED] == champion
    loser_tags = client.get_model_version(name, contenders[loser]).tags
    assert registry.TAG_PROMOTED_BY not in loser_tags
    refusal = json.loads(loser_tags[registry.TAG_LAST_REFUSAL])
    assert refusal["by"] == loser and refusal["kind"] == "stale"
    assert client.search_registered_models(f"name = '{registry.lock_name(name)}'") == []  # released


@pytest.mark.slow
def test_a_held_lock_times_out_and_a_stale_lock_is_broken_after_its_expiry(
    server, studies, name, fake_serving
):
    client = _client()
    version = _register(studies, "good", name)
    lock = registry.lock_name(name)
    expires = time.time() + 3.0
    client.create_registered_model(
        lock,
        tags={
            registry.LOCK_OWNER: "crashed-worker",
            registry.LOCK_TOKEN: "dead0token",
            registry.LOCK_PID: "4242",
            registry.LOCK_HOST: "gone-host",
            registry.LOCK_EXPIRES: f"{expires:.3f}",
            registry.LOCK_EXPIRES_AT: registry.common.iso(expires),
        },
    )
    started = time.monotonic()
    with pytest.raises(
        registry.PromotionRefused, match=r"held by crashed-worker \(pid 4242 on gone-host"
    ) as refused:
        registry.promote(name, params=_params(name, lock_timeout_s=0.5), actor="eve", reason="r")
    assert refused.value.kind == "lock_timeout" and refused.value.conflict
    assert time.monotonic() - started >= 0.5
    assert registry.CHAMPION not in client.get_registered_model(name).aliases

    result = registry.promote(name, params=_params(name, lock_timeout_s=20), actor="eve", reason="r")
    assert result.promoted and result.version == version
    assert result.broken_locks == ["dead0token"]
    assert time.time() >= expires  # it waited for the expiry, not less
    marker = client.get_registered_model(f"{lock}{registry.BROKEN_LOCK_INFIX}dead0token")
    assert marker.tags["sermtl.lock.broken_by"] == "eve"
    assert marker.tags["sermtl.lock.stale_owner"] == "crashed-worker"
    assert client.search_registered_models(f"name = '{lock}'") == []


KILLED = r"""
import os, signal, sys
from mlflow.tracking import MlflowClient
from sermtl.mlops import registry
from sermtl.params import load_params

action, name, version, params_path = sys.argv[1:5]
set_alias, set_tag = MlflowClient.set_registered_model_alias, MlflowClient.set_registered_model_tag


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no lock release


def alias(self, model, alias, v):  # a promotion dies at its commit point, history already written
    if model == name and alias == registry.CHAMPION:
        die()
    return set_alias(self, model, alias, v)


def tag(self, model, key, value):  # a rollback dies just after its commit point
    if model == name and key == registry.TAG_HISTORY:
        die()
    return set_tag(self, model, key, value)


params = load_params(params_path)
if action == "promote":
    MlflowClient.set_registered_model_alias = alias
    registry.promote(name, version, params=params, actor="doomed", reason="killed mid-way")
else:
    MlflowClient.set_registered_model_tag = tag
    registry.rollback(name, actor="doomed", reason="killed mid-way")
"""


def _killed(action: str, name: str, version: str, params_path: Path, server) -> int:
    """Run a promotion or rollback in a process SIGKILLed between its writes; returns its pid."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED, action, name, version, str(params_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    return process.pid


@pytest.mark.slow
def test_killed_promotion_and_rollback_no_lock_wait_no_repeated_history(
    server, studies, name, fake_serving, tmp_path
):
    params = _params(name)  # lock_timeout_s 60: an expiry wait would be about a minute
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(dataclasses.asdict(params)))
    client = _client()
    first = _register(studies, "good", name)
    registry.promote(name, params=params, actor="setup", reason="first")
    second = _register(studies, "better", name)

    pid = _killed("promote", name, second, params_path, server)
    lock = client.get_registered_model(registry.lock_name(name)).tags
    assert lock[registry.LOCK_PID] == str(pid) and lock[registry.LOCK_OWNER] == "doomed"
    model = client.get_registered_model(name)  # history written, champion not moved
    assert model.aliases[registry.CHAMPION] == first and json.loads(model.tags[registry.TAG_HISTORY]) == [
        first
    ]

    started = time.monotonic()
    result = registry.promote(name, second, params=params, actor="ops", reason="again after the kill")
    assert result.promoted and time.monotonic() - started < 20  # the dead holder's lock broken at once
    assert result.broken_locks == [lock[registry.LOCK_TOKEN]]
    marker = client.get_registered_model(f"{registry.lock_name(name)}.broken-{lock[registry.LOCK_TOKEN]}")
    assert f"its holder (pid {pid} on " in marker.tags["sermtl.lock.broken_because"]
    model = client.get_registered_model(name)
    assert json.loads(model.tags[registry.TAG_HISTORY]) == [first]  # not [first, first]
    assert model.aliases == {registry.CHAMPION: second, registry.PREVIOUS_CHAMPION: first}

    # a rollback killed after moving the alias: the next change repairs and audits it, never loses v1
    _killed("rollback", name, "-", params_path, server)
    with pytest.raises(registry.PromotionRefused, match="nothing to roll back to") as refused:
        registry.rollback(name, actor="ops", reason="check")
    assert refused.value.kind == "no_history"
    model = client.get_registered_model(name)
    assert model.aliases == {registry.CHAMPION: first}  # not also its own previous_champion
    assert json.loads(model.tags[registry.TAG_HISTORY]) == []
    audit = registry.registry_state(name).audit
    assert [(e["action"], e["version"], e["from"]) for e in audit] == [
        ("promote", first, None),
        ("promote", second, first),
        ("repair", first, second),
    ]
    assert client.search_registered_models(f"name = '{registry.lock_name(name)}'") == []


@pytest.mark.slow
def test_cli_promote_rollback_and_registry(server, studies, name, fake_serving, tmp_path):
    from sermtl.cli import app

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(dataclasses.asdict(_params(name))))
    first = _register(studies, "good", name)
    runner = CliRunner()

    done = runner.invoke(
        app, ["promote", name, "--reason", "first", "--actor", "cli", "--params", str(params_path)]
    )
    assert done.exit_code == 0, done.output
    assert f"{name} version {first} is now champion (first champion)" in done.output

    again = runner.invoke(
        app, ["promote", name, "--version", first, "--reason", "r", "--params", str(params_path)]
    )
    assert again.exit_code == 1 and "already the champion" in again.output
    missing = runner.invoke(app, ["promote", name, "--reason", "r", "--params", str(params_path)])
    assert missing.exit_code == 1 and "no `challenger` alias" in missing.output
    back = runner.invoke(app, ["rollback", name, "--reason", "test", "--params", str(params_path)])
    assert back.exit_code == 1 and "nothing to roll back to" in back.output

    # the audit must say why: no reason is bad input (exit 2), checked before anything changes
    audit_before = registry.registry_state(name).audit
    for args in (
        ["promote", name, "--version", first],
        ["promote", name, "--version", first, "--force"],
        ["promote", name, "--version", first, "--reason", "  "],
        ["rollback", name],
    ):
        result = runner.invoke(app, [*args, "--params", str(params_path)])
        assert result.exit_code == 2, (args, result.output)
        assert "needs a non-empty reason" in result.output and "Traceback" not in result.output
    for call in (
        lambda: registry.promote(name, first, params=_params(name), actor="lib"),
        lambda: registry.rollback(name, actor="lib", reason=""),
    ):
        with pytest.raises(registry.PromotionRefused, match="needs a non-empty reason") as refused:
            call()
        assert refused.value.kind == "input"
    assert registry.registry_state(name).audit == audit_before

    state = runner.invoke(app, ["registry", name])
    assert state.exit_code == 0, state.output
    assert "champion: 1; challenger: none" in state.output and "cli" in state.output
    unknown = runner.invoke(app, ["registry", f"{name}-nope"])
    assert unknown.exit_code == 2 and "no registered model named" in unknown.output
