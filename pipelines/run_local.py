"""Run the sermtl Kubeflow DAG on this machine with kfp's local SubprocessRunner.

No cluster and no Docker engine are needed: each component body runs in a subprocess of the
current interpreter (which has sermtl installed), artifacts land under
``<outputs>/pipeline_root/sermtl-<timestamp>/<task>/<output>``, and the paths of this run are
recorded in ``<outputs>/last_run.json``.

    python -m pipelines.run_local [--params params.yaml] [--corpus PATH|s3://...] [--outputs local_outputs]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

LAST_RUN_FILE = "last_run.json"
# KFP names an output file after the output ("validation_report", no suffix); browsers want ".html".
REPORT_COPY = "validation_report.html"
PIPELINE_ROOT_DIR = "pipeline_root"
TASK_OUTPUTS = {  # pipeline output -> (task, output) that produced it; for finding files after a failure
    "corpus_store": ("ingest-corpus", "corpus_store"),
    "validation_report": ("validate-corpus", "validation_report"),
    "validation_summary": ("validate-corpus", "validation_summary"),
    "validation_docs": ("validate-corpus", "validation_docs"),
    "study_results": ("collect-study", "study_results"),
    "results_report": ("collect-study", "results_report"),
    "results_table": ("collect-study", "results_table"),
    "significance": ("test-significance", "significance"),
    "significance_report": ("test-significance", "significance_report"),
    "significance_table": ("test-significance", "significance_table"),
}
RESULTS_COPY = "results.html"
SIGNIFICANCE_COPY = "significance.html"
COMPARISON_DIR = "comparison"
# kfp.local's ParallelExecutor runs at most this many ParallelFor iterations at once (its fixed default).
LOCAL_PARALLEL_TASKS = 2
# Telemetry stays off in the task subprocesses, which inherit this process's environment.
QUIET_ENV = {"GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


def task_threads() -> int:
    """Threads per task for torch and the BLAS: the cores shared by the tasks kfp runs at once.

    kfp's local runner runs LOCAL_PARALLEL_TASKS iterations of a ParallelFor at a time; each trainer
    would otherwise start one thread per core, and oversubscribed small kernels run several times slower.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // LOCAL_PARALLEL_TASKS)


def ensure_corpus(corpus_uri: str, params: Any) -> str:
    """Return the corpus URI to ingest, generating a synthetic corpus where a local one is missing.

    s3:// URIs are passed through untouched; a local path is made absolute (the task subprocesses
    and a later reader of last_run.json need not share this working directory).
    """
    if corpus_uri.startswith("s3://"):
        return corpus_uri
    path = Path(corpus_uri).expanduser().resolve()
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        from sermtl.data.synth import synthesize

        synth = params.data.synth
        print(f"corpus {path} not found: generating a synthetic corpus ({synth.utterances} utterances)")
        synthesize(path, **dataclasses.asdict(synth))
    return str(path)


def _plain(value: Any) -> Any:
    """Undo protobuf's number widening in artifact metadata (every int comes back as a float)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _latest_run_dir(pipeline_root: Path) -> Path | None:
    runs = sorted(p for p in pipeline_root.glob("sermtl-*") if p.is_dir())  # names end in a timestamp
    return runs[-1] if runs else None


def _record_from_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    paths = {name: artifact.path for name, artifact in sorted(outputs.items())}
    store_meta = _plain(dict(outputs["corpus_store"].metadata))
    metrics = _plain(dict(outputs["validation_summary"].metadata))
    return {
        "status": "succeeded",
        "run_dir": str(Path(paths["corpus_store"]).parents[1]),
        **paths,
        "ingest": {k: v for k, v in store_meta.items() if k != "drops"},
        "validation": {**metrics, "success": bool(metrics.get("success", 0))},
    }


def _record_after_failure(pipeline_root: Path, error: Exception) -> dict[str, Any]:
    run_dir = _latest_run_dir(pipeline_root)
    record: dict[str, Any] = {
        "status": "failed",
        "error": str(error),
        "run_dir": str(run_dir) if run_dir else None,
    }
    if run_dir is not None:
        for name, (task, output) in TASK_OUTPUTS.items():
            candidate = run_dir / task / output
            if candidate.exists():
                record[name] = str(candidate)
    return record


def _copy_report(record: dict[str, Any], outputs: Path) -> None:
    for key, name in (
        ("validation_report", REPORT_COPY),
        ("results_report", RESULTS_COPY),
        ("significance_report", SIGNIFICANCE_COPY),
    ):
        report = record.get(key)
        if report and Path(report).is_file():
            copy = outputs / name
            shutil.copyfile(report, copy)
            record[f"{key}_html"] = str(copy)


def _print_record(record: dict[str, Any], last_run: Path) -> None:
    print()
    print(f"sermtl local run {record['status']}")
    print(f"  run folder:        {record.get('run_dir')}")
    for label, key in (
        ("corpus store:", "corpus_store"),
        ("validation report:", "validation_report"),
        ("  same, as .html:", "validation_report_html"),
        ("data docs:", "validation_docs"),
        ("study results:", "study_results"),
        ("results report:", "results_report_html"),
        ("significance:", "significance_report_html"),
        ("comparison:", "comparison_html"),
    ):
        if record.get(key):
            print(f"  {label:<19}{record[key]}")
    ingest = record.get("ingest") or {}
    if ingest:
        print(
            f"  ingest:            kept {ingest.get('kept')}, dropped {ingest.get('dropped')} "
            f"{ingest.get('drops_by_reason') or ''}".rstrip()
        )
    validation = record.get("validation") or {}
    if validation:
        print(f"  validation:        {'passed' if validation.get('success') else 'FAILED'} {validation}")
    if record.get("error"):
        print(f"  error:             {record['error']}")
    for key in ("results_table", "significance_table"):
        table = record.get(key)
        if table and Path(table).is_file():
            print()
            print(Path(table).read_text().rstrip())
    decision = record.get("decision") or {}
    if decision:
        print()
        print(f"comparison of the study (MLflow run {decision.get('study_run_id')}):")
        print(decision.get("comparison", "").rstrip())
        print()
        verdict = "passed" if decision.get("gate_passed") else "FAILED: nothing registered"
        print(f"registration gate {verdict}")
        for reason in decision.get("gate_reasons", []):
            print(f"  - {reason}")
        print()
        print(decision.get("registry", "").rstrip())
        print()
        print("\n".join(decision.get("next_steps", [])))
    print(f"  recorded in:       {last_run}")


def next_steps(gate_passed: bool, model_name: str, significance: dict[str, Any] | None) -> list[str]:
    """What to try after the run: the registry path when the gate passed, else why it could not pass."""
    if gate_passed:
        return [
            "next (from this folder; the local MLflow store is ./mlruns, `uv run mlflow ui` shows it):",
            f"  uv run sermtl registry {model_name}",
            f'  uv run sermtl promote {model_name} --reason "first champion: reviewed the demo study"',
            f"  uv run sermtl serve -m models:/{model_name}@champion -h 127.0.0.1 -p 5001",
        ]
    lines = ["nothing was registered, so promote and serve have nothing to act on yet."]
    comparisons = (significance or {}).get("comparisons") or []
    params = (significance or {}).get("params") or {}
    clusters = min((int(c.get("clusters") or 0) for c in comparisons), default=0)
    unit = str(params.get("unit", ""))
    if comparisons and unit != "utterance" and 0 < clusters <= 20:
        alpha = float(params.get("alpha", 0.05))
        floor = 2.0 / 2**clusters
        lines.append(
            f"  power: the tests resample {clusters} {unit}s, so no p-value can be below 2/2^{clusters} = "
            f"{floor:.4f}, and Holm over {len(comparisons)} comparisons asks the best of them for p <= "
            f"{alpha / len(comparisons):.4f}: a baseline counts as beaten only where nearly every {unit} "
            "favours the proposed system (bench/README.md, `make run`, gives the measured differences)."
        )
    return lines


def _decision(record: dict[str, Any], outputs: Path, params: Any) -> dict[str, Any]:
    """The study as MLflow holds it after the run: comparison table, gate outcome, registry state."""
    from sermtl.evaluate.compare import run_compare
    from sermtl.evaluate.significance import read_report
    from sermtl.mlops.registry import TAG_GATE_PASSED, TAG_GATE_REASONS, RegistryError, registry_state
    from sermtl.mlops.tracking import client
    from sermtl.pipeline_runner import read_study

    study_run_id = read_study(record["study_results"])["study_run_id"]
    if not study_run_id:
        return {}
    comparison, paths = run_compare(study_run_id, out_dir=outputs / COMPARISON_DIR, params=params)
    record["comparison_html"] = str(paths["html"])
    tags = client().get_run(study_run_id).data.tags
    name = params.registry.model_name
    try:
        registry = f"MLflow Model Registry, model {name!r}:\n{registry_state(name).table()}"
    except RegistryError as error:  # nothing registered yet: a normal outcome of a failed gate
        registry = f"MLflow Model Registry: {error}"
    try:
        reasons = json.loads(tags.get(TAG_GATE_REASONS, "[]"))
    except ValueError:  # a reason list too long for one tag is cut; show it as it is
        reasons = [tags[TAG_GATE_REASONS]]
    passed = tags.get(TAG_GATE_PASSED) == "true"
    significance = read_report(record["significance"]).to_dict() if record.get("significance") else None
    return {
        "study_run_id": study_run_id,
        "comparison": comparison.to_markdown(),
        "gate_passed": passed,
        "gate_reasons": reasons,
        "registry": registry,
        "next_steps": next_steps(passed, name, significance),
    }


def run_local(
    params_path: str | Path = "params.yaml",
    corpus: str | None = None,
    outputs_dir: str | Path = "local_outputs",
    *,
    enable_caching: bool = False,
) -> dict[str, Any]:
    """Run the whole DAG locally; return (and write to last_run.json) where the outputs are.

    Raises RuntimeError when a task fails (e.g. validation), after recording what the run left.
    """
    from kfp import local

    from pipelines.sermtl_pipeline import build_pipeline, without_retries
    from sermtl.params import load_params
    from sermtl.pipeline_runner import dvc_data_version

    params_path = Path(params_path)
    params = load_params(params_path)
    params_yaml = params_path.read_text()
    corpus_uri = ensure_corpus(corpus or params.data.corpus, params)

    outputs = Path(outputs_dir).resolve()
    pipeline_root = outputs / PIPELINE_ROOT_DIR
    pipeline_root.mkdir(parents=True, exist_ok=True)
    last_run = outputs / LAST_RUN_FILE
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(task_threads()))

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
        enable_caching=enable_caching,
    )
    print(f"running pipeline 'sermtl' locally: corpus {corpus_uri}, outputs under {pipeline_root}")
    with warnings.catch_warnings():
        # Expected locally: base_image and resource requests only matter on a cluster.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            task = build_pipeline(without_retries(params.cluster))(
                corpus_uri=corpus_uri,
                params_yaml=params_yaml,
                data_version=dvc_data_version(corpus_uri, REPO_ROOT),
            )
        except RuntimeError as error:
            record = {"corpus_uri": corpus_uri, "params": str(params_path.resolve())}
            record.update(_record_after_failure(pipeline_root, error))
            _copy_report(record, outputs)
            _write_record(last_run, record)
            _print_record(record, last_run)
            raise
    record = {"corpus_uri": corpus_uri, "params": str(params_path.resolve())}
    record.update(_record_from_outputs(task.outputs))
    record["decision"] = _decision(record, outputs, params)
    _copy_report(record, outputs)
    _write_record(last_run, record)
    _print_record(record, last_run)
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: exit status 0 when the DAG succeeded, 1 when a task failed."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run_local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", default="params.yaml", help="params.yaml to run with")
    parser.add_argument("--corpus", default=None, help="corpus folder or s3:// prefix (default: data.corpus)")
    parser.add_argument(
        "--outputs", default="local_outputs", help="folder for pipeline_root and last_run.json"
    )
    parser.add_argument("--cache", action="store_true", help="reuse outputs of identical earlier tasks")
    args = parser.parse_args(argv)
    try:
        run_local(args.params, args.corpus, args.outputs, enable_caching=args.cache)
    except RuntimeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
