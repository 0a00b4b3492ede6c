"""Ingest component: raw corpus (local folder or s3://) -> training audio store + manifest."""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Output

from components import SERMTL_IMAGE


@dsl.component(base_image=SERMTL_IMAGE, install_kfp_package=False)
def ingest_corpus(corpus_uri: str, params_yaml: str, corpus_store: Output[Dataset]) -> None:
    """Build the corpus store with sermtl.ingest; kept/dropped counts go onto the artifact metadata."""
    from sermtl.pipeline_runner import ingest_step

    corpus_store.metadata.update(ingest_step(corpus_uri, params_yaml, corpus_store.path))
