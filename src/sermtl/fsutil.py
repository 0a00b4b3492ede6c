"""Atomic output helpers: a failed step must leave earlier results intact and nothing half-written.

An output folder is only ever replaced when it is ours: missing, empty, or a previous output of the same
command. Each command's output carries a marker file (`OUTPUT_MARKER`, naming the command and the sermtl
version); outputs of an earlier sermtl, which have none, are recognised by their known files. Anything else
(a regular file, a folder with other content, a folder that is, holds or lies inside an input of the
command) is refused with `OutputFolderError` before any work is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Hidden, so corpus listings skip it (sermtl.data.corpus) and `.dvcignore` keeps it out of DVC's hashes.
OUTPUT_MARKER = ".sermtl-output.json"
MARKER_FORMAT = 1
# `.<name>.tmp-<pid>` / `.<name>.old-<pid>`: the staging names of atomic_directory and atomic_write_text.
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
_SHOWN_NAMES = 4


class OutputFolderError(ValueError):
    """An output path that is not this command's to replace, or cannot be written; names the path and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output folder.

    `files`: top-level names it may write; `patterns`: regular expressions of further names it may write
    (e.g. `sermtl train`'s seed sub-runs seed<s>). `signatures`: sets of names that identify an output of an
    earlier sermtl, written before the marker existed, or restored without it (one set fully present is
    enough); empty: only a folder carrying the command's marker is recognised (`sermtl synth`: a real
    corpus looks the same).
    """

    command: str
    files: frozenset[str] = frozenset()
    signatures: tuple[frozenset[str], ...] = ()
    hint: str = ""  # added to the refusal of an unmarked folder
    patterns: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        command: str,
        files: Iterable[str],
        *signatures: Iterable[str],
        hint: str = "",
        patterns: Iterable[str] = (),
    ) -> OutputKind:
        return cls(command, frozenset(files), tuple(frozenset(s) for s in signatures), hint, tuple(patterns))

    def writes(self, name: str) -> bool:
        """Whether `name` is one of the top-level names this command may write."""
        return name in self.files or any(re.fullmatch(pattern, name) for pattern in self.patterns)


def _version() -> str:
    from sermtl import __version__

    return __version__


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(os.fspath(path)))  # `..` folded, symlinks kept


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    shown = ", ".join(listed[:_SHOWN_NAMES])
    return shown + (f" and {len(listed) - _SHOWN_NAMES} more" if len(listed) > _SHOWN_NAMES else "")


def _check_inputs(out_dir: Path, shown: Path | str, inputs: Iterable[tuple[str, Path | str | None]]) -> None:
    real_out = out_dir.resolve()
    for label, given in inputs:
        if given is None or str(given).startswith("s3://") or str(given) == "":
            continue
        real_in = _absolute(given).resolve()
        if real_out == real_in:
            relation = f"is the {label} itself ({given})"
        elif real_out in real_in.parents:
            relation = f"contains the {label} {given}"
        elif real_in in real_out.parents:
            relation = f"lies inside the {label} {given}"
        else:
            continue
        raise OutputFolderError(
            shown,
            f"output folder {relation}; an output folder must not be, hold or lie inside an input of the "
            "command, choose another one",
        )


def _check_writable(out_dir: Path, shown: Path | str) -> None:
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputFolderError(shown, f"cannot create the output folder: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputFolderError(shown, f"cannot create the output folder: no write permission in {ancestor}")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputFolderError(shown, "output folder is read-only: no write permission")


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of a command's output folder; None if there is none or it cannot be read."""
    try:
        payload = json.loads((Path(directory) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def write_marker(directory: Path, kind: OutputKind, files: Iterable[str] | None = None) -> None:
    """Mark `directory` as an output of `kind.command` (deterministic content: no time, no pid)."""
    payload: dict[str, Any] = {"format": MARKER_FORMAT, "command": kind.command, "sermtl_version": _version()}
    if files is not None:
        payload["files"] = sorted(set(files) - {OUTPUT_MARKER})
    write_json(Path(directory) / OUTPUT_MARKER, payload)


def check_output_dir(
    out_dir: Path | str, kind: OutputKind, inputs: Iterable[tuple[str, Path | str | None]] = ()
) -> None:
    """Raise OutputFolderError unless `out_dir` may be replaced by (or written to as) `kind.command`'s output.

    Allowed: a missing path, an empty folder, a folder marked by the same command holding only names it
    writes, or an unmarked folder of an earlier sermtl (a signature present, nothing but known names).
    `inputs` are (label, path) pairs of the command's inputs (s3:// and None skipped): the output may not
    be, hold or lie inside any of them. Staging leftovers (`.<name>.tmp-<pid>`) inside are not content.
    """
    shown = out_dir
    out_dir = _absolute(out_dir)
    if out_dir.parent == out_dir:
        raise OutputFolderError(shown, "the filesystem root cannot be an output folder")
    _check_inputs(out_dir, shown, inputs)
    if out_dir.is_symlink():
        raise OutputFolderError(
            shown, "is a symbolic link; give the folder it points to as the output folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(
            shown, "exists and is not a folder; refusing to replace it (remove it or choose another output)"
        )
    _check_writable(out_dir, shown)
    if not out_dir.exists():
        return
    try:
        entries = {name for name in os.listdir(out_dir) if not _STAGING_RE.match(name)}
    except OSError as exc:
        raise OutputFolderError(shown, f"cannot list the output folder ({exc.strerror or exc})") from exc
    if not entries:
        return
    command = f"`sermtl {kind.command}`"
    refusal = "refusing to replace it; move it away or choose another output folder"
    if OUTPUT_MARKER in entries:
        marker = read_marker(out_dir)
        if marker is None:
            raise OutputFolderError(shown, f"holds an unreadable {OUTPUT_MARKER}; {refusal}")
        if marker.get("command") != kind.command:
            raise OutputFolderError(
                shown, f"holds the output of `sermtl {marker.get('command')}`, not of {command}; {refusal}"
            )
        listed = marker.get("files") if isinstance(marker.get("files"), list) else []
        foreign = {
            name for name in entries - {OUTPUT_MARKER} - {str(n) for n in listed} if not kind.writes(name)
        }
        if foreign:
            raise OutputFolderError(
                shown,
                f"an output of {command}, but it also holds {_names(foreign)}, "
                f"which {command} did not write; " + refusal.replace("move it", "move them"),
            )
        return
    if any(signature <= entries for signature in kind.signatures) and all(kind.writes(n) for n in entries):
        return  # written by a sermtl from before the marker
    what = "an output of" if kind.signatures else f"marked ({OUTPUT_MARKER}) as an output of"
    hint = f" ({kind.hint})" if kind.hint else ""
    raise OutputFolderError(
        shown, f"is not empty and not {what} {command}: it holds {_names(entries)}{hint}; {refusal}"
    )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` / `.<name>.old-<pid>` beside `target` left by a killed or failed run.

    Ours (the same pid, e.g. a restarted container) and those of processes no longer alive go; those of
    a live process (a concurrent run) stay. Returns what was removed.
    """
    target = _absolute(target)
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        match = _STAGING_RE.match(name)
        if not match or match["name"] != target.name:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        path = target.parent / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not (path.exists() or path.is_symlink()):
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(out_dir: Path, kind: OutputKind | None = None) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces `out_dir`, on error it is removed.

    With `kind`, `out_dir` must pass `check_output_dir` (callers check earlier too, with their inputs, so
    nothing is refused after the work) and the new folder gets the command's marker. Stale staging folders
    of `out_dir` are removed first. A folder that cannot be created or swapped in raises OutputFolderError,
    leaving no temp dir behind.
    """
    shown = out_dir
    out_dir = _absolute(out_dir)
    if kind is not None:
        check_output_dir(shown, kind)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(shown, f"cannot create {out_dir.parent} ({exc.strerror or exc})") from exc
    remove_stale_staging(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputFolderError(shown, f"cannot write in {out_dir.parent} ({exc.strerror or exc})") from exc
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind, os.listdir(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_directory(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputFolderError(shown, f"cannot replace the output folder ({exc.strerror or exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, target: Path) -> None:
    """Swap `new` in place of `target` with renames only, so readers never see a partial directory."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    if old.exists():
        shutil.rmtree(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the previous result back
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, produce: Callable[[Path], object]) -> None:
    """The one way a file is written: produce(tmp) writes a sibling temporary file (same suffix, so writers
    that go by it still do), which then replaces `path` in one rename; a failure leaves `path` untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise OutputFolderError(
            path.parent, f"cannot create the output folder ({exc.strerror or exc})"
        ) from exc
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        produce(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_report_files(
    out_dir: Path, markdown: tuple[str, str], html: tuple[str, str], json_file: tuple[str, Any]
) -> dict[str, Path]:
    """One report as Markdown, HTML and JSON, given as (file name, content), each written atomically and
    the JSON last: a reader that finds the JSON also finds the others of the same run. Other files in
    out_dir are left alone. Returns {"markdown", "html", "json"} -> path."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / markdown[0], "html": out_dir / html[0], "json": out_dir / json_file[0]}
    atomic_write_text(paths["markdown"], markdown[1])
    atomic_write_text(paths["html"], html[1])
    write_json(paths["json"], json_file[1])
    return paths
