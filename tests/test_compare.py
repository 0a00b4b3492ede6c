"""`sermtl compare` against a real `mlflow server` (sqlite backend, artifacts in a folder) on loopback.

Studies are fabricated with tests/study_builder.py and logged by sermtl.mlops.tracking.track_study, then read
back only through MLflow; expected values are computed here from the same prediction files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sermtl_localstack import MlflowServer
from study_builder import write_study
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.evaluate.compare import (
    MARK_ABOVE,
    MARK_BELOW,
    CompareError,
    StudyComparison,
    compare_study,
    find_study,
    log_significance,
)
from sermtl.evaluate.metrics import uar
from sermtl.evaluate.results import collect_results
from sermtl.evaluate.significance import decisive, significance_tests, write_report
from sermtl.mlops import fold_run, tracking
from sermtl.params import Params
from sermtl.schema import PREDICTIONS_FILE

pytestmark = pytest.mark.slow

EXPERIMENT = "compare-tests"
DIMENSIONS = ["arousal", "valence", "dominance"]
# mtl_mean is clearly above the proposed system, egemaps_linear clearly below, stl_mean close to it.
ACCURACY = {"mtl_attention": 0.75, "mtl_mean": 0.97, "stl_mean": 0.72, "egemaps_linear": 0.3}
PER_FOLD = 60


def make_params(systems=tuple(ACCURACY), sessions=(1, 2, 3)) -> Params:
    base = Params()
    return dataclasses.replace(
        base,
        systems={name: base.systems[name] for name in systems},
        data=dataclasses.replace(base.data, sessions=list(sessions)),
        # 3 sessions are 6 speakers: too few for the speaker unit over 9 comparisons (significance.unit)
        significance=dataclasses.replace(base.significance, resamples=2000, unit="utterance"),
    )


# --- server and studies ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-compare"))
    mlflow_server.start(wait=False)  # boots while the study is fabricated
    yield mlflow_server
    mlflow_server.stop()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_study(root, make_params(), ACCURACY, per_fold=PER_FOLD, seed=3)
    return root


def _log_study(
    train_dir: Path, results_dir: Path, params: Params, uri: str, experiment: str, name: str
) -> str:
    table = collect_results(train_dir, results_dir, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tracking.EXPERIMENT_ENV, experiment)
        # The children's plots are most of the logging time and nothing here reads them.
        patch.setattr(fold_run, "_write_plots", lambda *args, **kwargs: None, raising=False)
        return tracking.track_study(
            train_dir, None, results_dir, table, params, "md5-test", "kfp-1", name=name, tracking_uri=uri
        )


@pytest.fixture(scope="module")
def uri(server) -> str:
    return server.wait_ready().tracking_uri


@pytest.fixture(scope="module")
def study(uri, train_dir, tmp_path_factory) -> str:
    """The full study (4 systems x 3 folds), without a significance report."""
    return _log_study(
        train_dir, tmp_path_factory.mktemp("results"), make_params(), uri, EXPERIMENT, "study-a"
    )


@pytest.fixture(scope="module")
def plain(uri, study) -> dict[str, StudyComparison]:
    """Comparisons of the study before any significance report is logged on it (a later test logs one)."""
    return {
        subset: compare_study(study, subset=subset, params=make_params(), tracking_uri=uri)
        for subset in ("all", "improvised")
    }


@pytest.fixture(scope="module")
def predictions(train_dir) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(path) for path in sorted(train_dir.glob(f"*/fold*/{PREDICTIONS_FILE}"))],
        ignore_index=True,
    )


def _artifacts(uri: str, run_id: str, path: str) -> set[str]:
    return {item.path for item in tracking.client(uri).list_artifacts(run_id, path)}


# --- values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["all", "improvised"])
def test_values_equal_those_of_the_predictions(uri, study, plain, predictions, subset):
    comparison = plain[subset]
    assert comparison.study_id == study and comparison.study_name == "study-a"
    assert comparison.data_version == "md5-test" and comparison.pipeline_run_id == "kfp-1"
    tags = tracking.client(uri).get_run(study).data.tags
    assert comparison.git_commit == tags[tracking.TAG_GIT_COMMIT] and comparison.git_commit
    assert comparison.experiment_name == EXPERIMENT and comparison.status == "FINISHED"
    assert comparison.proposed == "mtl_attention"
    assert comparison.systems == list(ACCURACY)  # proposed first, then params.systems order
    assert comparison.dimensions == DIMENSIONS
    table = comparison.table
    assert len(table) == len(ACCURACY) * len(DIMENSIONS)
    assert table["marker"].eq("").all() and table["p_adjusted"].isna().all()
    assert any("no significance report" in note for note in comparison.notes)

    chosen = predictions if subset == "all" else predictions[predictions["improvised"]]
    for row in table.itertuples():
        rows = chosen[(chosen["system"] == row.system) & (chosen["dimension"] == row.dimension)]
        assert row.n == len(rows) and np.sum(row.confusion) == len(rows)
        assert row.pooled_uar == pytest.approx(uar(rows["label"].to_numpy(), rows["prediction"].to_numpy()))
        per_fold = [uar(f["label"].to_numpy(), f["prediction"].to_numpy()) for _, f in rows.groupby("fold")]
        assert row.folds == 3
        assert row.fold_uar_mean == pytest.approx(np.mean(per_fold))
        assert row.fold_uar_std == pytest.approx(np.std(per_fold, ddof=1))
        assert row.ci_low <= row.pooled_uar <= row.ci_high  # equal for a perfect system: no spread
        assert row.ci_high - row.ci_low < 0.3
        assert row.proposed == (row.system == "mtl_attention")

    assert (table["ci_low"] < table["pooled_uar"]).sum() >= len(table) - 3
    seeds = compare_study(study, subset=subset, params=make_params(), tracking_uri=uri).table
    pd.testing.assert_frame_equal(seeds[["ci_low", "ci_high"]], table[["ci_low", "ci_high"]])  # fixed seed

    markdown = comparison.to_markdown()
    assert "| mtl_attention (proposed) |" in markdown and f"{subset} utterances" in markdown
    assert f"tags.mlflow.parentRunId = '{study}'" in markdown
    assert "md5-test" in markdown


# --- significance ----------------------------------------------------------------------------------------


def test_markers_follow_the_logged_significance_report(uri, study, plain, predictions, tmp_path):
    params = make_params()
    parent = study
    assert all(comparison.table["marker"].eq("").all() for comparison in plain.values())  # before
    report = significance_tests(predictions, params)
    write_report(report, tmp_path / "significance")
    log_significance(parent, tmp_path / "significance", tracking_uri=uri)

    assert _artifacts(uri, parent, "significance") == {
        "significance/significance.json",
        "significance/significance.md",
        "significance/significance.html",
    }
    metrics = tracking.client(uri).get_run(parent).data.metrics
    first = report.comparison("egemaps_linear", "arousal")
    assert metrics["significance_egemaps_linear_arousal_p_resampling"] == pytest.approx(
        first.p_adjusted["resampling"]
    )
    assert metrics["significance_egemaps_linear_arousal_difference"] == pytest.approx(first.difference)

    comparison = compare_study(parent, params=params, tracking_uri=uri)
    verdicts = decisive(report, params.registry.gate.test)
    table = comparison.table.set_index(["system", "dimension"])
    for (baseline, dimension), verdict in verdicts.items():
        expected = MARK_ABOVE if verdict.worse else MARK_BELOW if verdict.better else ""
        assert table.loc[(baseline, dimension), "marker"] == expected
    assert set(table.loc["egemaps_linear", "marker"]) == {MARK_BELOW}
    assert set(table.loc["mtl_mean", "marker"]) == {MARK_ABOVE}
    assert set(table.loc["mtl_attention", "marker"]) == {""}
    markdown = comparison.to_markdown()
    assert f" {MARK_BELOW} |" in markdown and f" {MARK_ABOVE} |" in markdown
    assert "by the gate test (resampling" in markdown

    # markers belong to the report's subset only
    improvised = compare_study(parent, subset="improvised", params=params, tracking_uri=uri)
    assert improvised.table["marker"].eq("").all()
    assert any("compares all utterances, not improvised" in note for note in improvised.notes)

    # a report object is accepted too, and replaces the files
    log_significance(parent, report, tracking_uri=uri)
    with pytest.raises(FileNotFoundError, match=r"significance\.md"):
        log_significance(parent, tmp_path, tracking_uri=uri)


# --- finding studies, errors -------------------------------------------------------------------------------


def test_latest_finished_study_is_found(uri, train_dir, tmp_path, monkeypatch):
    small = make_params(systems=["mtl_attention"], sessions=[1, 2])
    experiment = "compare-latest"
    older = _log_study(train_dir, tmp_path / "r1", small, uri, experiment, "older")
    newer = _log_study(train_dir, tmp_path / "r2", small, uri, experiment, "newer")
    with monkeypatch.context() as patch:
        patch.setenv(tracking.EXPERIMENT_ENV, experiment)
        running = tracking.start_study("unfinished", small, tracking_uri=uri)  # newest, not finished
    assert older != newer != running
    assert find_study(experiment=experiment, tracking_uri=uri).info.run_id == newer
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, experiment)
    comparison = compare_study(params=small, tracking_uri=uri)
    assert comparison.study_id == newer and comparison.systems == ["mtl_attention"]
    assert comparison.table["folds"].eq(2).all()
    with pytest.raises(CompareError, match="has no \\(system, fold\\) child runs"):
        compare_study(running, params=small, tracking_uri=uri)
    with pytest.raises(CompareError, match="belongs to experiment 'compare-latest', not 'other'"):
        find_study(newer, experiment="other", tracking_uri=uri)

    tracking.ensure_experiment("compare-empty", tracking_uri=uri)
    with pytest.raises(CompareError, match="no finished study in experiment 'compare-empty'"):
        find_study(experiment="compare-empty", tracking_uri=uri)
    with pytest.raises(CompareError, match="no experiment named 'nowhere'"):
        find_study(experiment="nowhere", tracking_uri=uri)


def test_bad_studies_are_clear_errors(uri, study, train_dir):
    client = tracking.client(uri)
    with pytest.raises(CompareError, match="no run '0123abcd'"):
        compare_study("0123abcd", tracking_uri=uri)
    child = client.search_runs(
        [client.get_run(study).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study}'"
    )[0]
    with pytest.raises(CompareError, match=f"is a child run.*parent run '{study}'"):
        compare_study(child.info.run_id, tracking_uri=uri)
    experiment_id = tracking.ensure_experiment("compare-errors", tracking_uri=uri)
    plain = client.create_run(experiment_id, run_name="not-a-study").info.run_id
    with pytest.raises(CompareError, match="is not a study"):
        compare_study(plain, tracking_uri=uri)

    # a child without its test metrics is named
    parent = tracking.start_study("broken", make_params(), experiment="compare-errors", tracking_uri=uri)
    bare = client.create_run(
        experiment_id,
        run_name="stl_mean/fold0",
        tags={tracking.TAG_PARENT: parent, tracking.TAG_SYSTEM: "stl_mean", tracking.TAG_FOLD: "0"},
    ).info.run_id
    client.log_artifact(bare, str(train_dir / "stl_mean/fold0" / PREDICTIONS_FILE))
    with pytest.raises(
        CompareError, match=rf"stl_mean/fold0 \(run {bare}\) lacks metric 'test_all_arousal_uar'"
    ):
        compare_study(parent, tracking_uri=uri)

    # a parent whose pooled metric disagrees with its children's predictions
    other = tracking.start_study("stale", make_params(), experiment="compare-errors", tracking_uri=uri)
    tracking.log_fold_run(other, train_dir / "stl_mean/fold0", tracking_uri=uri)
    client.log_metric(other, "pooled_stl_mean_all_valence_uar", 0.01)
    with pytest.raises(CompareError, match=r"pooled UAR of stl_mean/valence \(all\).*is 0\.010000"):
        compare_study(other, tracking_uri=uri)
    with pytest.raises(CompareError, match="subset 'scripted'"):
        compare_study(study, subset="scripted", tracking_uri=uri)


# --- the command -----------------------------------------------------------------------------------------


def test_cli_writes_logs_and_prints(uri, study, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tmp_path / "params.yaml"
    params.write_text("profile: paper\nsignificance:\n  resamples: 2000\n")
    out = tmp_path / "comparison"
    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--study", study, "--out", str(out), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "| system | arousal | valence | dominance |" in result.output
    assert "| mtl_attention (proposed) |" in result.output
    assert {p.name for p in out.iterdir()} == {"comparison.md", "comparison.html", "comparison.json"}
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page and "<script" not in page
    written = json.loads((out / "comparison.json").read_text())
    assert written["study"]["study_id"] == study and len(written["rows"]) == len(ACCURACY) * 3
    assert _artifacts(uri, study, "comparison") == {
        "comparison/comparison.md",
        "comparison/comparison.html",
        "comparison/comparison.json",
    }

    result = runner.invoke(
        app,
        [
            *("compare", "--experiment", EXPERIMENT, "--subset", "improvised"),
            *("--out", str(out), "--no-log", "--params", str(params)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "improvised utterances" in result.output and study in result.output

    result = runner.invoke(app, ["compare", "--study", "no-such-run", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "error: no run 'no-such-run'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
