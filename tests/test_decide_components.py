"""The decision components (significance, gate, register) called as plain Python on a fabricated study."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Model
from study_builder import write_study

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # components/ is a top-level package of the repo
    sys.path.insert(0, str(REPO_ROOT))

# The module, not its `test_significance` component: pytest would try to collect that name.
from components import SERMTL_IMAGE, decide  # noqa: E402
from sermtl.params import Params  # noqa: E402
from sermtl.pipeline_runner import STUDY_FILE, collect_step  # noqa: E402
from sermtl.schema import SIGNIFICANCE_JSON  # noqa: E402

ACCURACY = {
    "mtl_attention": 0.9,
    "mtl_mean": 0.5,
    "stl_attention": 0.5,
    "stl_mean": 0.5,
    "egemaps_linear": 0.5,
}


def params_yaml(**gate: int) -> str:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["significance"]["resamples"] = 2000
    raw["registry"]["gate"].update(gate)
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The collect step's output for a study where the proposed system is far better (untracked)."""
    root = tmp_path_factory.mktemp("study")
    write_study(root / "train", dataclasses.replace(Params()), ACCURACY, per_fold=60)
    runs = [str(p) for p in sorted((root / "train").glob("*/fold*"))]
    results = root / "study_results"
    collect_step(
        runs,
        root / "no-store",
        params_yaml(),
        results,
        root / "report.html",
        root / "table.md",
        track=False,
        proposed_dir=root / "proposed_runs",
    )
    return Dataset(name="study_results", uri=str(results))


def significance_outputs(tmp_path: Path) -> dict:
    return {
        "significance": Dataset(name="significance", uri=str(tmp_path / "significance")),
        "significance_report": HTML(name="significance_report", uri=str(tmp_path / "report")),
        "significance_table": Markdown(name="significance_table", uri=str(tmp_path / "table")),
        "significance_metrics": Metrics(name="significance_metrics", uri=str(tmp_path / "metrics")),
    }


def test_decision_components_use_the_project_image() -> None:
    for component in (decide.test_significance, decide.registration_gate, decide.register_model):
        container = component.component_spec.implementation.container
        assert container.image == SERMTL_IMAGE
        assert "from sermtl.pipeline_runner import" in " ".join(container.command)


def test_collect_records_the_study_and_copies_the_proposed_runs(study: Dataset) -> None:
    record = json.loads((Path(study.path) / STUDY_FILE).read_text())
    assert record["study_run_id"] == "" and "data_version" in record
    proposed = Path(study.path).parent / "proposed_runs" / "mtl_attention"
    assert sorted(p.name for p in proposed.iterdir()) == [f"fold{k}" for k in range(5)]
    assert not any(p.is_symlink() for p in proposed.rglob("*")), "a copy, not links into the loop's outputs"


def test_significance_component_writes_report_and_metrics(study: Dataset, tmp_path: Path) -> None:
    outputs = significance_outputs(tmp_path)
    decide.test_significance.python_func(study_results=study, params_yaml=params_yaml(), **outputs)
    report = json.loads((Path(outputs["significance"].path) / SIGNIFICANCE_JSON).read_text())
    assert report["proposed"] == "mtl_attention" and len(report["comparisons"]) == 4 * 3
    assert Path(outputs["significance_report"].path).read_text().lstrip().lower().startswith("<!doctype html")
    assert "mtl_mean" in Path(outputs["significance_table"].path).read_text()
    metrics = outputs["significance_metrics"].metadata
    assert metrics["p_resampling_mtl_mean_arousal"] < 0.05 < metrics["uar_difference_mtl_mean_arousal"] + 0.05


@pytest.mark.parametrize(("gate", "expected"), [({}, "passed"), ({"min_dimensions_better": 4}, "failed")])
def test_gate_component_decides_by_params(
    study: Dataset, tmp_path: Path, gate: dict, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = significance_outputs(tmp_path)
    decide.test_significance.python_func(study_results=study, params_yaml=params_yaml(**gate), **outputs)
    decision = decide.registration_gate.python_func(
        significance=outputs["significance"], study_results=study, params_yaml=params_yaml(**gate)
    )
    assert decision == expected
    printed = capsys.readouterr().out
    assert "vs egemaps_linear" in printed
    if expected == "failed":
        assert "needs at least 4" in printed


def test_register_component_refuses_an_untracked_study(study: Dataset, tmp_path: Path) -> None:
    outputs = significance_outputs(tmp_path)
    decide.test_significance.python_func(study_results=study, params_yaml=params_yaml(), **outputs)
    runs = Model(name="proposed_runs", uri=str(Path(study.path).parent / "proposed_runs"))
    with pytest.raises(RuntimeError, match="not tracked in MLflow: nothing to register"):
        decide.register_model.python_func(
            proposed_runs=runs,
            significance=outputs["significance"],
            study_results=study,
            params_yaml=params_yaml(),
        )
