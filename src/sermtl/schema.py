"""Column contract of the utterance manifest written by ingestion and read by every later stage."""

from __future__ import annotations

from pathlib import Path

from sermtl.fsutil import OutputKind

DIMENSIONS: tuple[str, ...] = ("valence", "arousal", "dominance")
CLASS_NAMES: tuple[str, ...] = ("low", "medium", "high")
CATEGORIES: tuple[str, ...] = ("neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx")

# name -> pandas dtype. Order is the on-disk column order.
MANIFEST_COLUMNS: dict[str, str] = {
    "utterance_id": "string",  # Ses01F_impro01_F000
    "session": "int64",  # 1..5
    "dialog": "string",  # Ses01F_impro01 (utterance id without its last "_" segment)
    "speaker": "string",  # Ses01_F: session + letter that starts the last id segment
    "gender": "string",  # F or M (that same letter)
    "improvised": "bool",  # impro* dialogs; script* dialogs are False
    "category": "string",  # neu, hap, ..., xxx (no agreement), never relabelled
    "valence": "float64",  # header bracket order is [V, A, D]
    "arousal": "float64",
    "dominance": "float64",
    "valence_class": "int64",  # 0 low, 1 medium, 2 high (thresholds in params.yaml)
    "arousal_class": "int64",
    "dominance_class": "int64",
    "start_s": "float64",  # turn boundaries inside the dialog recording
    "end_s": "float64",
    "wav_path": "string",  # relative to the corpus root, posix separators
    "duration_s": "float64",  # of the source wav
    "source_sample_rate": "int64",
    "sha256": "string",  # of the source wav bytes
    "offset": "int64",  # first sample in the audio store
    "num_samples": "int64",  # samples in the audio store (at data.sample_rate)
    "rms_dbfs": "float64",  # per-utterance audio statistics of the source signal
    "peak": "float64",
    "clipped_fraction": "float64",
    "nonfinite_count": "int64",
}

MANIFEST_FILE = "manifest.parquet"
REPORT_FILE = "report.json"
AUDIO_FILE = "audio.pcm16"
STORE_META_FILE = "store.json"

# A training run directory, one per (system, fold): artifacts/train/<system>/fold<k>/, holding the seed
# ensemble's outputs and, for a neural system, one sub-run per seed of train.seeds: fold<k>/seed<s>/ (a run
# directory with the same files, of that seed alone; see sermtl.train.training)
DEFAULT_TRAIN_DIR = Path("artifacts/train")
SEED_RUN_PREFIX = "seed"
SEED_RUN_PATTERN = rf"{SEED_RUN_PREFIX}[0-9]+"
PREDICTIONS_FILE = (
    "predictions.parquet"  # sermtl.evaluate.metrics.PREDICTION_COLUMNS, test utterances x dimensions
)
RUN_METRICS_FILE = "metrics.json"  # final metrics of the fold (see sermtl.train.training)
HISTORY_FILE = "history.json"  # per-epoch metrics (neural systems)
ATTENTION_FILE = "attention.npz"  # attention weights of a few test utterances (attention systems)
MODEL_DIR = "model"  # what is needed to rebuild the trained predictor
CHECKPOINT_FILE = "checkpoint.pt"  # latest epoch, for resumption after a kill
# What `sermtl train` may write into a run directory (sermtl.fsutil.check_output_dir); a run directory of an
# earlier sermtl, without the marker, is known by its metrics.json or checkpoint.pt.
TRAIN_RUN_OUTPUT = OutputKind.of(
    "train",
    (PREDICTIONS_FILE, RUN_METRICS_FILE, HISTORY_FILE, ATTENTION_FILE, MODEL_DIR, CHECKPOINT_FILE),
    (RUN_METRICS_FILE,),
    (CHECKPOINT_FILE,),
    patterns=(SEED_RUN_PATTERN,),
)


def run_dir(train_dir: str | Path, system: str, fold: int) -> Path:
    """The one place the run-folder layout is spelled: <train_dir>/<system>/fold<k>."""
    return Path(train_dir) / system / f"fold{fold}"


# Output of `sermtl significance` (evaluate.significance): paired tests of the proposed system vs baselines.
SIGNIFICANCE_JSON = "significance.json"  # SignificanceReport.to_dict(), read by the registration gate
SIGNIFICANCE_MARKDOWN = "significance.md"
SIGNIFICANCE_HTML = "significance.html"  # self-contained, with an inline PNG forest plot
