"""A DVC remote on S3 (the session's real SeaweedFS server): `dvc push` from one clone, `dvc pull` into a
second fresh clone that has neither the data nor a cache, then the data stages are up to date there.

The clones come from a bare repository holding the working tree's files (tracked and new, not ignored) in
one commit, as tests/test_dvc.py's fresh_clone; the demo corpus is regenerated as there (`sermtl synth` is
deterministic, so it is exactly the version data.dvc tracks).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from test_dvc import copy_working_tree

from sermtl.fsutil import OUTPUT_MARKER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dvc"


def sh(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc_env() -> dict[str, str]:
    """No AWS_* from the test session (the s3_server fixture exports them): the remote's endpoint and keys
    must come from the DVC config alone."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare repository: what `git clone` gives a user of the project as it is in the working tree."""
    env = dvc_env()
    work = copy_working_tree(tmp_path / "work")
    sh("git", "init", "-q", "-b", "main", cwd=work, env=env)
    sh("git", "add", "-A", cwd=work, env=env)
    sh("git", "commit", "-qm", "project", cwd=work, env=env)
    sh("git", "clone", "-q", "--bare", str(work), str(tmp_path / "origin.git"), cwd=tmp_path, env=env)
    shutil.rmtree(work)
    return tmp_path / "origin.git"


def clone(origin: Path, path: Path, env: dict[str, str]) -> Path:
    sh("git", "clone", "-q", str(origin), str(path), cwd=origin.parent, env=env)
    return path


def file_digests(folder: Path) -> dict[str, str]:
    """What DVC tracks under `folder`: every file but the output markers, which .dvcignore leaves out."""
    return {
        str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != OUTPUT_MARKER
    }


def test_dvc_push_to_s3_then_pull_into_a_fresh_clone(origin: Path, s3_server, tmp_path: Path):
    import boto3

    env = dvc_env()
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    try:
        s3.head_bucket(Bucket=BUCKET)
    except s3.exceptions.ClientError:
        s3.create_bucket(Bucket=BUCKET)
    prefix = f"remote-{uuid.uuid4().hex[:8]}"  # a remote of its own in the session's server
    url = f"s3://{BUCKET}/{prefix}"

    # --- clone A: the data, a remote, push ---
    a = clone(origin, tmp_path / "a", env)
    sh("sermtl", "synth", "--out", "data/IEMOCAP_full_release", cwd=a, env=env)
    sh("dvc", "add", "data", cwd=a, env=env)
    assert sh("git", "status", "--porcelain", cwd=a, env=env) == ""  # exactly the version data.dvc tracks
    tracked = yaml.safe_load((a / "data.dvc").read_text())["outs"][0]

    sh("dvc", "remote", "add", "-d", "storage", url, cwd=a, env=env)
    sh("dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url, cwd=a, env=env)
    sh("dvc", "remote", "modify", "--local", "storage", "access_key_id", s3_server.access_key, cwd=a, env=env)
    sh(
        "dvc",
        "remote",
        "modify",
        "--local",
        "storage",
        "secret_access_key",
        s3_server.secret_key,
        cwd=a,
        env=env,
    )
    config = (a / ".dvc/config").read_text()
    assert url in config and s3_server.endpoint_url in config
    for secret in ("access_key_id", "secret_access_key", s3_server.access_key, s3_server.secret_key):
        assert secret not in config, f"{secret} in the committed .dvc/config"
    local = (a / ".dvc/config.local").read_text()
    assert s3_server.access_key in local and s3_server.secret_key in local
    assert sh("git", "status", "--porcelain", cwd=a, env=env).split() == ["M", ".dvc/config"]
    sh("git", "check-ignore", "-q", ".dvc/config.local", cwd=a, env=env)

    sh("dvc", "repro", "validate", cwd=a, env=env)  # ingest + validate: their outputs are pushed too
    sh("dvc", "push", cwd=a, env=env)
    assert "in sync" in sh("dvc", "status", "--cloud", cwd=a, env=env)

    # The objects are in the bucket, content-addressed (DVC 3 layout: files/md5/<2 chars>/<rest>).
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        keys |= {item["Key"].removeprefix(f"{prefix}/") for item in page.get("Contents", [])}
    md5 = tracked["md5"]
    assert f"files/md5/{md5[:2]}/{md5[2:]}" in keys  # the manifest of data/
    data_files = file_digests(a / "data")
    assert len(data_files) == tracked["nfiles"]
    missing = [
        name for name, digest in data_files.items() if f"files/md5/{digest[:2]}/{digest[2:]}" not in keys
    ]
    assert not missing, missing[:5]

    sh("git", "add", ".dvc/config", "dvc.lock", cwd=a, env=env)
    sh("git", "commit", "-qm", "DVC remote on S3", cwd=a, env=env)
    sh("git", "push", "-q", "origin", "HEAD", cwd=a, env=env)

    # --- clone B: nothing but git; the remote comes with it, the keys do not ---
    b = clone(origin, tmp_path / "b", env)
    assert not (b / "data").exists() and not (b / ".dvc/cache").exists()
    assert not (b / ".dvc/config.local").exists()
    assert url in (b / ".dvc/config").read_text()
    sh("dvc", "remote", "modify", "--local", "storage", "access_key_id", s3_server.access_key, cwd=b, env=env)
    sh(
        "dvc",
        "remote",
        "modify",
        "--local",
        "storage",
        "secret_access_key",
        s3_server.secret_key,
        cwd=b,
        env=env,
    )
    # What has been pushed: the data and the data stages' outputs. (A bare `dvc pull` would also ask for the
    # training stages' outputs, never produced here, and exit 1 naming them; `--allow-missing` skips them.)
    sh("dvc", "pull", "data.dvc", "ingest", "validate", cwd=b, env=env)
    sh("dvc", "pull", "--allow-missing", cwd=b, env=env)

    # data/ is back with the md5 data.dvc records, byte for byte the pushed files.
    assert file_digests(b / "data") == data_files
    assert "up to date" in sh("dvc", "status", "data.dvc", cwd=b, env=env)
    assert sh("git", "status", "--porcelain", cwd=b, env=env) == ""
    # The pulled stage outputs match their dependencies: nothing to re-run.
    assert "up to date" in sh("dvc", "status", "ingest", "validate", cwd=b, env=env)
    output = sh("dvc", "repro", "validate", cwd=b, env=env)
    assert "Stage 'ingest' didn't change, skipping" in output
    assert "Stage 'validate' didn't change, skipping" in output
    assert (b / "artifacts/validation/summary.json").is_file()
