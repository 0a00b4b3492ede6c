"""`--out` is never someone else's: each command, through the real CLI, refuses before any work to replace
what it did not write (an input, a regular file, foreign content), replaces its own earlier output, clears
stale staging folders and turns write failures into one clear error (exit 2) with nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_builder import balanced_utts, build_corpus
from study_builder import write_study
from typer.testing import CliRunner

from sermtl import fsutil
from sermtl.cli import app
from sermtl.fsutil import OUTPUT_MARKER
from sermtl.params import Params

RESULTS_ACCURACY = dict.fromkeys(Params().systems, 0.6)


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        "data:\n  max_drop_fraction: 1.0\n  synth: {utterances: 60, seed: 3, mean_duration_s: 0.8}\n"
    )
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return build_corpus(tmp_path / "c" / "IEMOCAP_full_release", balanced_utts())


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(result, *fragments: str) -> str:
    """Exit 2, one `error:` line naming the path and why, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def ingest(corpus: Path, out: Path, params: Path, *extra: str):
    return invoke("ingest", "--source", corpus, "--out", out, "--params", params, *extra)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_ingest_out_containing_the_source_is_refused(tmp_path, corpus, params):
    before = tree(tmp_path / "c")
    line = refused(ingest(corpus, tmp_path / "c", params), str(tmp_path / "c"), "contains the source corpus")
    assert str(corpus) in line
    assert tree(tmp_path / "c") == before
    assert staging_left(tmp_path) == []


def test_ingest_out_inside_or_equal_to_the_source_is_refused(tmp_path, corpus, params):
    before = tree(corpus)
    refused(ingest(corpus, corpus, params), "is the source corpus itself")
    refused(ingest(corpus, corpus / "store", params), "lies inside the source corpus")
    assert tree(corpus) == before


def test_validate_out_equal_to_ingest_is_refused(tmp_path, corpus, params):
    store = tmp_path / "S"
    assert ingest(corpus, store, params).exit_code == 0
    before = tree(store)
    refused(
        invoke("validate", "--ingest", store, "--out", store, "--params", params),
        str(store),
        "is the ingest folder itself",
    )
    assert tree(store) == before
    assert staging_left(tmp_path) == []


def test_results_out_with_foreign_content_is_refused(tmp_path, params):
    write_study(tmp_path / "train", Params(), RESULTS_ACCURACY, per_fold=6)
    out = tmp_path / "r"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine")
    args = ("results", "--train-dir", tmp_path / "train", "--out", out, "--no-track", "--params", params)
    refused(invoke(*args), str(out), "notes", "not an output of `sermtl results`")
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    assert staging_left(tmp_path) == []
    # Its own previous output (marked, or unmarked from an earlier sermtl) is replaced.
    (out / "notes" / "todo.txt").unlink()
    (out / "notes").rmdir()
    assert invoke(*args).exit_code == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "results"
    assert invoke(*args).exit_code == 0
    (out / OUTPUT_MARKER).unlink()
    assert invoke(*args).exit_code == 0
    assert staging_left(tmp_path) == []


def test_results_out_equal_to_the_store_is_refused(tmp_path, params):
    write_study(tmp_path / "train", Params(), RESULTS_ACCURACY, per_fold=6)
    store = tmp_path / "store"
    for name in ("manifest.parquet", "store.json", "audio.pcm16", "report.json"):
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_text(name)
    before = tree(store)
    result = invoke(
        "results", "--train-dir", tmp_path / "train", "--store", store, "--out", store, "--no-track",
        "--params", params,
    )  # fmt: skip
    refused(result, "is the ingest folder itself")
    assert tree(store) == before


@pytest.mark.parametrize("command", ["ingest", "validate", "synth"])
def test_out_that_is_a_regular_file_is_refused(tmp_path, corpus, params, command):
    target = tmp_path / "out.txt"
    target.write_text("precious")
    if command == "ingest":
        result = ingest(corpus, target, params)
    elif command == "validate":
        store = tmp_path / "S"
        assert ingest(corpus, store, params).exit_code == 0
        result = invoke("validate", "--ingest", store, "--out", target, "--params", params)
    else:
        result = invoke("synth", "--out", target, "--params", params)
    refused(result, str(target), "is not a folder")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_synth_over_a_folder_it_did_not_write_is_refused(tmp_path, params):
    real = tmp_path / "IEMOCAP_full_release"
    build_corpus(real, balanced_utts(per_speaker=1))
    (real / "Documentation").mkdir()
    (real / "README.txt").write_text("IEMOCAP")
    before = tree(real)
    refused(invoke("synth", "--out", real, "--params", params), str(real), "real corpus")
    assert tree(real) == before
    # Even a copy holding nothing but the sessions, as a synthetic corpus would: no marker, not ours.
    stripped = build_corpus(tmp_path / "stripped", balanced_utts(per_speaker=1))
    refused(invoke("synth", "--out", stripped, "--params", params), "not marked")
    assert staging_left(tmp_path) == []


def test_rerunning_each_command_over_its_own_output_works(tmp_path, params):
    corpus, store, checks = tmp_path / "IEMOCAP_full_release", tmp_path / "S", tmp_path / "V"
    for _ in range(2):
        result = invoke("synth", "--out", corpus, "--params", params)
        assert result.exit_code == 0, result.output
    assert json.loads((corpus / OUTPUT_MARKER).read_text())["command"] == "synth"
    for extra in ((), ("--force",)):
        result = ingest(corpus, store, params, *extra)
        assert result.exit_code == 0, result.output
        assert "hidden files skipped 0" in result.output  # the corpus marker is bookkeeping, not content
    assert json.loads((store / OUTPUT_MARKER).read_text())["command"] == "ingest"
    for _ in range(2):
        result = invoke("validate", "--ingest", store, "--out", checks, "--params", params)
        assert result.exit_code in (0, 1), result.output
        assert (checks / "summary.json").is_file()
    # Outputs of an earlier sermtl have no marker (as DVC restores them: .dvcignore leaves it out).
    (store / OUTPUT_MARKER).unlink()
    (checks / OUTPUT_MARKER).unlink()
    assert ingest(corpus, store, params, "--force").exit_code == 0
    assert invoke("validate", "--ingest", store, "--out", checks, "--params", params).exit_code in (0, 1)
    assert staging_left(tmp_path) == []


def test_stale_staging_folders_are_removed_on_the_next_run(tmp_path, corpus, params):
    store = tmp_path / "S"
    assert ingest(corpus, store, params).exit_code == 0
    dead = dead_pid()
    stale = [tmp_path / f".S.tmp-{dead}", tmp_path / f".S.old-{dead}", tmp_path / f".S.tmp-{os.getpid()}"]
    for path in stale:
        path.mkdir()
        (path / "audio.pcm16").write_bytes(b"\0" * 4096)
    result = ingest(corpus, store, params, "--force")
    assert result.exit_code == 0, result.output
    assert staging_left(tmp_path) == []


def test_unwritable_parent_is_a_clear_error_and_leaves_no_staging(tmp_path, corpus, params):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    out = tmp_path / "blocker" / "S"
    refused(ingest(corpus, out, params), str(out), "is a file, not a folder")
    refused(invoke("synth", "--out", out, "--params", params), str(out))
    assert staging_left(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_parent_is_a_clear_error_and_leaves_no_staging(tmp_path, corpus, params):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        refused(ingest(corpus, parent / "S", params), str(parent / "S"), "no write permission")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_failed_swap_is_a_clear_error_and_leaves_the_old_output(tmp_path, corpus, params, monkeypatch):
    """An immutable output folder cannot be renamed, even by root: simulated at the rename."""
    store = tmp_path / "S"
    assert ingest(corpus, store, params).exit_code == 0
    before = tree(store)
    real_replace = os.replace

    def immutable(source, target):
        if Path(source) == store:
            raise PermissionError(1, "Operation not permitted", str(source))
        real_replace(source, target)

    monkeypatch.setattr(fsutil.os, "replace", immutable)
    refused(ingest(corpus, store, params, "--force"), str(store), "cannot replace the output folder")
    assert tree(store) == before
    assert staging_left(tmp_path) == []


def test_train_out_equal_to_the_store_is_refused(tmp_path, corpus, params):
    store = tmp_path / "S"
    assert ingest(corpus, store, params).exit_code == 0
    before = tree(store)
    for system in ("mtl_attention", "egemaps_linear"):
        result = invoke(
            "train", "--system", system, "--fold", "0", "--store", store, "--out", store, "--params", params
        )
        refused(result, str(store), "is the store itself")
    assert tree(store) == before
