"""Output folders are never someone else's: the guard, the marker, stale staging and write failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sermtl import fsutil
from sermtl.fsutil import (
    OUTPUT_MARKER,
    OutputFolderError,
    OutputKind,
    atomic_directory,
    atomic_write_text,
    check_output_dir,
    read_marker,
    remove_stale_staging,
    write_marker,
)

KIND = OutputKind.of(
    "ingest", ["manifest.parquet", "store.json", "report.json"], ["store.json", "manifest.parquet"]
)
OTHER = OutputKind.of("validate", ["summary.json"], ["summary.json"])
MARKED_ONLY = OutputKind.of("synth", ["Session1"], hint="it may be a real corpus")


def dead_pid() -> int:
    """The pid of a process that has exited (reaped), so no process holds it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_output(directory: Path, kind: OutputKind = KIND) -> Path:
    with atomic_directory(directory, kind) as staging:
        for name in sorted(kind.files):
            (staging / name).write_text(name)
    return directory


# ---------------------------------------------------------------------------------------------- the guard


def test_missing_and_empty_folders_are_allowed(tmp_path):
    check_output_dir(tmp_path / "missing" / "deeper", KIND)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", KIND)


def test_own_marked_output_is_allowed_and_marker_lists_the_files(tmp_path):
    out = write_output(tmp_path / "out")
    marker = read_marker(out)
    assert marker["command"] == "ingest" and marker["sermtl_version"]
    assert marker["files"] == sorted(KIND.files)
    check_output_dir(out, KIND)
    write_output(out)  # replaced again
    assert sorted(p.name for p in out.iterdir()) == sorted([*KIND.files, OUTPUT_MARKER])
    assert hidden(tmp_path) == []


def test_marker_content_is_deterministic(tmp_path):
    first, second = write_output(tmp_path / "a"), write_output(tmp_path / "b")
    assert (first / OUTPUT_MARKER).read_bytes() == (second / OUTPUT_MARKER).read_bytes()


def test_names_listed_in_the_marker_are_accepted(tmp_path):
    """A newer sermtl may write a file this one does not know: its marker lists it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "newer.bin").write_text("x")
    write_marker(out, KIND, ["newer.bin"])
    check_output_dir(out, KIND)


def test_output_of_another_command_is_refused(tmp_path):
    out = write_output(tmp_path / "out", OTHER)
    with pytest.raises(OutputFolderError, match=r"output of `sermtl validate`, not of `sermtl ingest`"):
        check_output_dir(out, KIND)


def test_own_output_with_foreign_content_is_refused(tmp_path):
    out = write_output(tmp_path / "out")
    (out / "notes").mkdir()
    with pytest.raises(OutputFolderError, match="also holds notes") as caught:
        check_output_dir(out, KIND)
    assert caught.value.path == str(out)
    assert str(caught.value).startswith(f"{out}: ")


def test_unmarked_output_of_an_earlier_sermtl_is_recognised_by_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("manifest.parquet", "store.json"):
        (out / name).write_text(name)
    check_output_dir(out, KIND)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="not an output of `sermtl ingest`: it holds"):
        check_output_dir(out, KIND)


def test_unmarked_folder_without_the_signature_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # a known name, but not what identifies an ingest folder
    with pytest.raises(OutputFolderError, match="not an output of"):
        check_output_dir(out, KIND)


def test_marker_required_where_there_is_no_signature(tmp_path):
    corpus = tmp_path / "IEMOCAP_full_release"
    (corpus / "Session1").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match=r"not marked \(\.sermtl-output\.json\).*real corpus"):
        check_output_dir(corpus, MARKED_ONLY)


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_unreadable_marker_is_refused(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text(content)
    with pytest.raises(OutputFolderError, match="unreadable"):
        check_output_dir(out, KIND)


def test_regular_file_and_symlink_are_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(OutputFolderError, match="is not a folder"):
        check_output_dir(target, KIND)
    real = write_output(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        check_output_dir(link, KIND)


def test_filesystem_root_is_refused():
    with pytest.raises(OutputFolderError, match="root"):
        check_output_dir(Path("/"), KIND)


def test_staging_leftovers_inside_are_not_content(tmp_path):
    out = tmp_path / "out"
    (out / ".model.tmp-12345").mkdir(parents=True)
    (out / ".metrics.json.tmp-12345").write_text("")
    check_output_dir(out, KIND)


@pytest.mark.parametrize(
    ("out", "source", "relation"),
    [
        ("c", "c/IEMOCAP_full_release", "contains the source corpus"),
        ("c/IEMOCAP_full_release", "c/IEMOCAP_full_release", "is the source corpus itself"),
        ("c/IEMOCAP_full_release/store", "c/IEMOCAP_full_release", "lies inside the source corpus"),
        ("c/../c", "c/IEMOCAP_full_release", "contains the source corpus"),
    ],
)
def test_output_overlapping_an_input_is_refused(tmp_path, monkeypatch, out, source, relation):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c" / "IEMOCAP_full_release" / "Session1").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match=relation):
        check_output_dir(out, KIND, [("source corpus", source)])


def test_overlap_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "store", target_is_directory=True)
    with pytest.raises(OutputFolderError, match="lies inside the ingest folder"):
        check_output_dir(tmp_path / "alias" / "validation", OTHER, [("ingest folder", tmp_path / "store")])


def test_s3_and_missing_inputs_are_skipped(tmp_path):
    check_output_dir(
        tmp_path / "out", KIND, [("source corpus", "s3://bucket/out"), ("store", None), ("x", "")]
    )


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out", KIND)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_parent_and_output_are_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = write_output(tmp_path / "out")
    parent.chmod(0o555)
    out.chmod(0o555)
    try:
        with pytest.raises(OutputFolderError, match="no write permission in"):
            check_output_dir(parent / "out", KIND)
        with pytest.raises(OutputFolderError, match="read-only"):
            check_output_dir(out, KIND)
        with (
            pytest.raises(OutputFolderError, match="no write permission"),
            atomic_directory(parent / "out", KIND),
        ):
            pytest.fail("the body must not run")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
        out.chmod(0o755)


def test_no_write_permission_is_refused_before_work(tmp_path, monkeypatch):
    """What a read-only parent looks like to a non-root user (root is never denied, so it is simulated)."""
    real_access = os.access
    monkeypatch.setattr(
        fsutil.os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode)
    )
    with pytest.raises(OutputFolderError, match=f"no write permission in {tmp_path}"):
        check_output_dir(tmp_path / "out", KIND)


# --------------------------------------------------------------------------------------- atomic_directory


def test_refused_before_the_body_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    ran = []
    with pytest.raises(OutputFolderError), atomic_directory(out, KIND):
        ran.append(True)
    assert ran == [] and (out / "precious.txt").read_text() == "keep me"
    assert hidden(tmp_path) == []


def test_regular_file_is_never_moved_aside(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(OutputFolderError), atomic_directory(target, KIND):
        pass
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_staging_of_dead_processes_and_ours_is_removed(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    stale = [
        tmp_path / f".out.tmp-{dead}",
        tmp_path / f".out.old-{dead}",
        tmp_path / f".out.tmp-{os.getpid()}",
    ]
    for path in stale:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "big.bin").write_bytes(b"\0" * 1024)
    (tmp_path / f".out.old-{dead}.file").write_text("not staging")  # another name entirely
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a live process: a concurrent run, kept
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}"  # another output's staging: not ours to judge
    other.mkdir()
    write_output(out)
    assert not any(path.exists() for path in stale)
    assert live.is_dir() and other.is_dir() and (tmp_path / f".out.old-{dead}.file").exists()


def test_remove_stale_staging_reports_what_it_removed(tmp_path):
    dead = dead_pid()
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}x").mkdir()
    assert remove_stale_staging(tmp_path / "out") == [tmp_path / f".out.tmp-{dead}"]


def test_failing_body_leaves_no_staging_and_the_old_output(tmp_path):
    out = write_output(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out, KIND) as staging:
        (staging / "store.json").write_text("new")
        raise RuntimeError("boom")
    assert (out / "store.json").read_text() == "store.json"
    assert hidden(tmp_path) == []


def test_parent_that_is_a_file_gives_a_clear_error_and_no_staging(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="cannot create"), atomic_directory(tmp_path / "file" / "out"):
        pytest.fail("the body must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_swap_that_fails_removes_the_staging_and_keeps_the_old_output(tmp_path, monkeypatch):
    """An immutable output folder (or one on a read-only mount) cannot be renamed, even by root."""
    out = write_output(tmp_path / "out")
    real_replace = os.replace

    def refuse(source, target):
        if Path(source) == out:
            raise PermissionError(1, "Operation not permitted", str(source))
        real_replace(source, target)

    monkeypatch.setattr(fsutil.os, "replace", refuse)
    with pytest.raises(OutputFolderError, match="cannot replace the output folder") as caught:
        write_output(out)
    assert str(out) in str(caught.value)
    assert hidden(tmp_path) == []
    assert (out / "store.json").read_text() == "store.json"


def test_staging_that_cannot_be_created_gives_a_clear_error(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".out.tmp-"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputFolderError, match="cannot write in"), atomic_directory(tmp_path / "out", KIND):
        pytest.fail("the body must not run")
    assert list(tmp_path.iterdir()) == []


def test_without_a_kind_nothing_is_marked(tmp_path):
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]


def test_atomic_write_text_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="cannot create the output folder"):
        atomic_write_text(tmp_path / "file" / "report.md", "text")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """The one atomic-write helper: a writer that dies half-way leaves the previous file and no temporary."""
    from sermtl.fsutil import atomic_write

    target = tmp_path / "table.parquet"
    target.write_text("previous")

    def dies_half_way(tmp):
        assert tmp.suffix == ".parquet" and tmp.parent == tmp_path  # writers that go by the suffix still do
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, dies_half_way)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
