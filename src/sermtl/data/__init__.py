"""The corpus side of the pipeline: reading IEMOCAP (local or S3), the audio store, ingest, validate, the
synthetic corpus and the leave-one-session-out folds."""
