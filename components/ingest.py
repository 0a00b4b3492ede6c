"""Ingest components: fingerprint the raw corpus (local folder or s3://), then build the training audio store
+ manifest from it."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def fingerprint_corpus(corpus_uri: str, params_yaml: str) -> str:
    """`listing:<sha256>` of the corpus' file listing (paths, sizes, ETags or mtimes), read on every run:
    it is part of ingest's cache key, so a corpus changed in place at the same URI is ingested again."""
    from sermtl.pipeline_runner import fingerprint_step

    return fingerprint_step(corpus_uri, params_yaml)


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def ingest_corpus(
    corpus_uri: str,
    params_yaml: str,
    data_version: str,
    corpus_fingerprint: str,
    corpus_store: Output[Dataset],
) -> None:
    """Build the corpus store with sermtl.ingest; kept/dropped counts go onto the artifact metadata.

    data_version (as the run names it, may be empty) and corpus_fingerprint (fingerprint_corpus) are
    inputs so that KFP's cache key for this step includes the corpus version; both are recorded too.
    """
    from sermtl.pipeline_runner import ingest_step

    corpus_store.metadata.update(
        ingest_step(
            corpus_uri,
            params_yaml,
            corpus_store.path,
            data_version=data_version,
            corpus_fingerprint=corpus_fingerprint,
        )
    )
