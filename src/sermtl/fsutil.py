"""Atomic output helpers: a failed step must leave earlier results intact and nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces `out_dir`, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, out_dir)


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


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
