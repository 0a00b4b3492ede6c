"""The Kubeflow components called as plain Python (``.python_func``) on a tiny synthetic corpus.

Artifacts are built by hand: for a local path, kfp 2.17's ``Artifact.path`` is the ``uri`` itself,
so ``Dataset(uri=str(dir)).path == str(dir)``, exactly as the local runner hands them over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # components/ and pipelines/ are top-level packages of the repo
    sys.path.insert(0, str(REPO_ROOT))

from components import SERMTL_IMAGE  # noqa: E402
from components.ingest import ingest_corpus  # noqa: E402
from components.validate import validate_corpus  # noqa: E402
from sermtl.pipeline_runner import ValidationFailed, render_report, validation_metrics  # noqa: E402
from sermtl.schema import AUDIO_FILE, MANIFEST_FILE, REPORT_FILE  # noqa: E402

TINY_UTTERANCES = 60
TINY_MEAN_DURATION_S = 0.8


def tiny_params_yaml(corpus: Path, **data_overrides: object) -> str:
    """params.yaml of the repository with the corpus and the synthetic-corpus size made tiny."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["corpus"] = str(corpus)
    raw["data"]["synth"].update(utterances=TINY_UTTERANCES, mean_duration_s=TINY_MEAN_DURATION_S)
    raw["data"].update(data_overrides)
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sermtl.synth import synthesize

    corpus = tmp_path_factory.mktemp("corpus") / "IEMOCAP_full_release"
    synthesize(corpus, utterances=TINY_UTTERANCES, seed=0, mean_duration_s=TINY_MEAN_DURATION_S)
    return corpus


@pytest.fixture(scope="module")
def ingested(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The ingest component's output artifact, produced once for the module."""
    store = Dataset(name="corpus_store", uri=str(tmp_path_factory.mktemp("ingest") / "corpus_store"))
    ingest_corpus.python_func(
        corpus_uri=str(tiny_corpus), params_yaml=tiny_params_yaml(tiny_corpus), corpus_store=store
    )
    return store


def test_components_use_the_project_image_without_installs() -> None:
    for component in (ingest_corpus, validate_corpus):
        container = component.component_spec.implementation.container
        assert container.image == SERMTL_IMAGE
        command = " ".join(container.command)
        assert "pip install" not in command, "the image carries sermtl and kfp: nothing to install"
        assert "from sermtl.pipeline_runner import" in command


def test_ingest_component_writes_store_and_metadata(ingested: Dataset, tiny_corpus: Path) -> None:
    store = Path(ingested.path)
    assert ingested.path == ingested.uri
    for name in (MANIFEST_FILE, AUDIO_FILE, REPORT_FILE):
        assert (store / name).is_file(), name
    meta = ingested.metadata
    assert meta["kept"] == meta["utterances"] == TINY_UTTERANCES
    assert meta["dropped"] == 0 and meta["drops_by_reason"] == {}
    assert meta["source"] == str(tiny_corpus)
    assert meta["sample_rate"] == 16000
    assert "drops" not in meta, "per-file drop examples stay in report.json, not on the artifact"
    json.dumps(meta)  # artifact metadata must be JSON-serialisable
    report = json.loads((store / REPORT_FILE).read_text())
    assert report["kept"] == meta["kept"]


def test_validate_component_passes_on_tiny_corpus(
    ingested: Dataset, tiny_corpus: Path, tmp_path: Path
) -> None:
    report = HTML(name="validation_report", uri=str(tmp_path / "validation_report"))
    summary = Metrics(name="validation_summary", uri=str(tmp_path / "validation_summary"))
    docs = Artifact(name="validation_docs", uri=str(tmp_path / "validation_docs"))
    validate_corpus.python_func(
        corpus_store=ingested,
        params_yaml=tiny_params_yaml(tiny_corpus),
        validation_report=report,
        validation_summary=summary,
        validation_docs=docs,
    )
    page = Path(report.path).read_text()
    assert page.startswith("<!DOCTYPE html>") and "passed" in page
    assert "<script" not in page, "the report is one self-contained file"
    assert summary.metadata["success"] == 1.0
    assert summary.metadata["failed_expectations"] == 0.0
    assert summary.metadata["evaluated_expectations"] > 0
    assert all(isinstance(v, float) for v in summary.metadata.values())
    assert (Path(docs.path) / "summary.json").is_file()
    assert (Path(docs.path) / "data_docs" / "index.html").is_file()


def test_validate_component_raises_on_failing_corpus(
    ingested: Dataset, tiny_corpus: Path, tmp_path: Path
) -> None:
    # The store holds 2 speakers per session; expecting 3 must fail and stop the DAG.
    report = HTML(name="validation_report", uri=str(tmp_path / "validation_report"))
    summary = Metrics(name="validation_summary", uri=str(tmp_path / "validation_summary"))
    docs = Artifact(name="validation_docs", uri=str(tmp_path / "validation_docs"))
    with pytest.raises(RuntimeError, match="validation failed") as caught:
        validate_corpus.python_func(
            corpus_store=ingested,
            params_yaml=tiny_params_yaml(tiny_corpus, speakers_per_session=3),
            validation_report=report,
            validation_summary=summary,
            validation_docs=docs,
        )
    assert isinstance(caught.value, ValidationFailed)
    assert "speaker" in str(caught.value).lower()
    page = Path(report.path).read_text()
    assert "FAILED" in page, "the report is written before raising, for inspection"
    assert summary.metadata == {}, "a failed task publishes no metrics"


def test_validation_metrics_and_report_without_summary_details() -> None:
    assert validation_metrics(True, {}) == {
        "success": 1.0,
        "evaluated_expectations": 0.0,
        "failed_expectations": 0.0,
    }
    page = render_report(False, {"success": 0.0}, "x < y & z", {"a": 1}, None)
    assert "FAILED" in page and "x &lt; y &amp; z" in page
