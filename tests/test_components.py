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

from components import DEFAULT_IMAGE, SERMTL_IMAGE, cuda_variant, decide, resolve_images  # noqa: E402
from components.collect import collect_study  # noqa: E402
from components.ingest import fingerprint_corpus, ingest_corpus  # noqa: E402
from components.train import plan_study, train_system_fold  # noqa: E402
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
    from sermtl.data.synth import synthesize

    corpus = tmp_path_factory.mktemp("corpus") / "IEMOCAP_full_release"
    synthesize(corpus, utterances=TINY_UTTERANCES, seed=0, mean_duration_s=TINY_MEAN_DURATION_S)
    return corpus


@pytest.fixture(scope="module")
def ingested(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The ingest component's output artifact, produced once for the module."""
    store = Dataset(name="corpus_store", uri=str(tmp_path_factory.mktemp("ingest") / "corpus_store"))
    ingest_corpus.python_func(
        corpus_uri=str(tiny_corpus),
        params_yaml=tiny_params_yaml(tiny_corpus),
        data_version="dvc:0123abcd",
        corpus_fingerprint="listing:feedbeef",
        corpus_store=store,
    )
    return store


# Every component (decide's by module: pytest would collect a `test_significance` name as a test).
ALL_COMPONENTS = (
    fingerprint_corpus,
    ingest_corpus,
    validate_corpus,
    plan_study,
    train_system_fold,
    collect_study,
    decide.test_significance,
    decide.registration_gate,
    decide.register_model,
)


def test_components_use_the_project_image_without_installs() -> None:
    for component in ALL_COMPONENTS:
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
    assert meta["data_version"] == "dvc:0123abcd" and meta["corpus_fingerprint"] == "listing:feedbeef"
    json.dumps(meta)  # artifact metadata must be JSON-serialisable
    report = json.loads((store / REPORT_FILE).read_text())
    assert report["kept"] == meta["kept"]


def test_fingerprint_component_changes_with_the_corpus_listing(tmp_path: Path) -> None:
    """The fingerprint keys ingest's cache: a file added or rewritten in place changes it."""
    corpus = tmp_path / "IEMOCAP_full_release"  # only the listing is read: any files will do
    wav = corpus / "Session1" / "sentences" / "wav" / "a.wav"
    wav.parent.mkdir(parents=True)
    wav.write_bytes(b"RIFF0000")
    (corpus / "Session1" / "notes.txt").write_text("x")
    params_yaml = tiny_params_yaml(corpus)
    first = fingerprint_corpus.python_func(corpus_uri=str(corpus), params_yaml=params_yaml)
    assert first.startswith("listing:") and len(first) == len("listing:") + 64
    assert fingerprint_corpus.python_func(corpus_uri=str(corpus), params_yaml=params_yaml) == first
    wav.write_bytes(b"RIFF0001extra")  # same path, other content
    second = fingerprint_corpus.python_func(corpus_uri=str(corpus), params_yaml=params_yaml)
    assert second != first
    (corpus / "Session1" / "extra.txt").write_text("new file")
    assert fingerprint_corpus.python_func(corpus_uri=str(corpus), params_yaml=params_yaml) != second


def test_cuda_image_names() -> None:
    assert cuda_variant("ghcr.io/sermtl/sermtl:0.1.0") == "ghcr.io/sermtl/sermtl:0.1.0-cuda"
    assert cuda_variant("localhost:5000/sermtl") == "localhost:5000/sermtl:latest-cuda"
    with pytest.raises(ValueError, match="pinned by digest"):
        cuda_variant("ghcr.io/sermtl/sermtl@sha256:" + "a" * 64)


def test_image_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """$SERMTL_IMAGE / $SERMTL_CUDA_IMAGE, else params.yaml's cluster.images, else the default."""
    monkeypatch.delenv("SERMTL_IMAGE", raising=False)
    monkeypatch.delenv("SERMTL_CUDA_IMAGE", raising=False)
    assert resolve_images() == (DEFAULT_IMAGE, DEFAULT_IMAGE + "-cuda")
    assert resolve_images("r/s:1") == ("r/s:1", "r/s:1-cuda")
    assert resolve_images("r/s:1", "r/s-gpu:1") == ("r/s:1", "r/s-gpu:1")
    monkeypatch.setenv("SERMTL_IMAGE", "ci/s:2-abc")
    assert resolve_images("r/s:1") == ("ci/s:2-abc", "ci/s:2-abc-cuda")
    monkeypatch.setenv("SERMTL_CUDA_IMAGE", "ci/s-gpu:2")
    assert resolve_images("r/s:1", "r/s-gpu:1") == ("ci/s:2-abc", "ci/s-gpu:2")


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
