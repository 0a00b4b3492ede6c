"""The train stage: one (system, fold) run with its seeds, checkpoints and predictions."""
