"""Read a corpus from a local folder or an s3:// prefix through one interface.

Paths handed around are always relative to the corpus root with posix separators, and never
allowed to leave it: a symlink or key that resolves outside the root is an error, not a file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from sermtl.errors import ServiceUnreachable, redact_uri

# Throttling and dropped connections are retried; a store that does not answer fails in seconds.
S3_MAX_ATTEMPTS = 4
S3_CONNECT_TIMEOUT_S = 5


class CorpusError(ValueError):
    """The corpus cannot be ingested as given; the message names the offending file or line."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative, posix
    size: int
    version: str  # mtime or ETag: changes when the content may have changed


class CorpusSource(Protocol):
    uri: str

    def list_files(self) -> list[SourceFile]: ...

    def read_bytes(self, path: str) -> bytes: ...


def _check_relative(path: str, where: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or path != pure.as_posix():
        raise CorpusError(f"{where}: path {path!r} escapes or is not normalised under the corpus root")
    return path


class LocalSource:
    def __init__(self, root: Path | str) -> None:
        self.uri = str(root)
        given = Path(root)
        if not given.is_dir():
            raise CorpusError(f"{given}: corpus folder not found")
        self.root = given.resolve()
        self._checked_dirs: set[Path] = set()

    def _inside(self, real: str) -> bool:
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def list_files(self) -> list[SourceFile]:
        files: list[SourceFile] = []
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            rel_dir = os.path.relpath(dirpath, self.root)
            if not self._inside(real_dir):
                raise CorpusError(
                    f"{rel_dir}: symlinked folder resolves to {real_dir}, outside the corpus root"
                )
            if real_dir in seen_dirs:  # a symlink loop or a folder linked twice
                dirnames.clear()
                continue
            seen_dirs.add(real_dir)
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                # Folders were checked above, so only a symlinked file can lead elsewhere.
                real = os.path.realpath(full) if os.path.islink(full) else full
                if real is not full and not self._inside(real):
                    raise CorpusError(
                        f"{rel}: symlink resolves to {real}, outside the corpus root {self.root}"
                    )
                if not os.path.isfile(real):
                    continue
                stat = os.stat(real)
                files.append(SourceFile(rel, stat.st_size, str(stat.st_mtime_ns)))
        return files

    def read_bytes(self, path: str) -> bytes:
        _check_relative(path, self.uri)
        full = self.root / path
        if full.parent not in self._checked_dirs or full.is_symlink():
            real = os.path.realpath(full)
            if not self._inside(real):
                raise CorpusError(f"{path}: resolves to {real}, outside the corpus root {self.root}")
            if not full.is_symlink():
                self._checked_dirs.add(full.parent)
        return full.read_bytes()


class S3Source:
    """An s3://bucket/prefix corpus; endpoint_url selects an S3-compatible store."""

    def __init__(self, uri: str, endpoint_url: str = "") -> None:
        import boto3
        from botocore.config import Config

        if not uri.startswith("s3://"):
            raise CorpusError(f"{uri}: not an s3:// URI")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise CorpusError(f"{uri}: no bucket in the S3 URI")
        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint or None,
            config=Config(
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "adaptive"},
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                read_timeout=60,
            ),
        )

    def _call(self, what: str, call: Any) -> Any:
        """Run one S3 request; connection failures and refusals become one clear error each."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
        )

        try:
            return call()
        except ConnectionError as exc:  # connect/read timeouts, refused or unresolvable endpoints
            raise ServiceUnreachable("S3", self.endpoint or "AWS S3", str(exc)) from exc
        except NoCredentialsError as exc:
            raise CorpusError(
                f"{self.uri}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            ) from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise CorpusError(
                f"{self.uri}: {what} refused by S3 at {redact_uri(self.endpoint) or 'AWS'}: "
                f"{error.get('Code', '?')} {error.get('Message', '')}".rstrip()
            ) from exc
        except BotoCoreError as exc:
            raise CorpusError(f"{self.uri}: {what} failed: {exc}") from exc

    def list_files(self) -> list[SourceFile]:
        files: list[SourceFile] = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            "listing", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                rel = _check_relative(key[len(self.prefix) :], f"s3://{self.bucket}/{key}")
                files.append(SourceFile(rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        if not files:
            raise CorpusError(f"{self.uri}: no objects under this prefix")
        return sorted(files, key=lambda f: f.path)

    def read_bytes(self, path: str) -> bytes:
        _check_relative(path, self.uri)
        key = self.prefix + path
        return self._call(
            f"reading {path}", lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        )


def open_source(uri: str, endpoint_url: str = "") -> CorpusSource:
    if uri.startswith("s3://"):
        return S3Source(uri, endpoint_url)
    return LocalSource(uri)


def listing_fingerprint(files: list[SourceFile]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.path}\0{f.size}\0{f.version}\n".encode())
    return digest.hexdigest()
