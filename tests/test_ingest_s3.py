"""Ingesting from an s3:// prefix on a real S3-compatible server gives the same result as from disk."""

from __future__ import annotations

import dataclasses

import boto3
import pandas as pd
import pytest
from corpus_builder import balanced_utts, build_corpus

from sermtl.data.audio import AudioStore
from sermtl.data.ingest import ingest
from sermtl.data.sources import CorpusError
from sermtl.params import Params
from sermtl.schema import MANIFEST_FILE

pytestmark = pytest.mark.slow


def upload(folder, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_s3_ingest_matches_local(s3_server, tmp_path):
    corpus = build_corpus(tmp_path / "IEMOCAP_full_release", balanced_utts())
    (corpus / "Session1/sentences/wav/Ses01F_impro01/._Ses01F_impro01_F000.wav").write_bytes(
        b"\x00\x05\x16\x07"
    )
    upload(corpus, "corpora", "iemocap/IEMOCAP_full_release")
    params = Params(data=dataclasses.replace(Params().data, s3_endpoint_url=s3_server.endpoint_url))
    remote = ingest("s3://corpora/iemocap/IEMOCAP_full_release", tmp_path / "from_s3", params, progress=False)
    local = ingest(str(corpus), tmp_path / "from_disk", params, progress=False)
    assert (remote.kept, remote.dropped, len(remote.hidden_files)) == (30, 0, 1)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "from_s3" / MANIFEST_FILE),
        pd.read_parquet(tmp_path / "from_disk" / MANIFEST_FILE),
    )
    assert (tmp_path / "from_s3" / "audio.pcm16").read_bytes() == (
        tmp_path / "from_disk" / "audio.pcm16"
    ).read_bytes()
    assert local.fingerprint != remote.fingerprint
    assert len(AudioStore(tmp_path / "from_s3")) == 30
    again = ingest("s3://corpora/iemocap/IEMOCAP_full_release", tmp_path / "from_s3", params, progress=False)
    assert again.up_to_date


def test_empty_s3_prefix_is_a_clear_error(s3_server, tmp_path):
    boto3.client("s3").create_bucket(Bucket="empty-corpus")
    with pytest.raises(CorpusError, match="s3://empty-corpus/nothing: no objects under this prefix"):
        ingest("s3://empty-corpus/nothing", tmp_path / "out", Params(), progress=False)
