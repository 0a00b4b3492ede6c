"""Data validation of an ingested corpus with great-expectations (GX Core 1.x): ingestion's manifest.parquet
and audio store are what every later stage trusts, so the contract is a GX suite whose Data Docs (for
people) and summary.json (for the CLI, DVC and the KFP component) name the offending rows."""

import logging
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before any submodule can import GX
# GX narrates its internals at INFO (from import on); under the KFP executor, whose root logger is at
# INFO, that buries the report.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

from sermtl.data.validate.checkpoint import DATA_DOCS_DIR  # noqa: E402
from sermtl.data.validate.checks import (  # noqa: E402
    RATING_MAX,
    RATING_MIN,
    SAMPLE_COUNT_TOLERANCE,
    SHA256_RE,
    Check,
    build_checks,
    rating_grid,
)
from sermtl.data.validate.stage import (  # noqa: E402
    SUMMARY_FILE,
    VALIDATION_OUTPUT,
    ValidationInputError,
    validate,
)
from sermtl.data.validate.summary import MAX_EXAMPLES, Failure, ValidationSummary  # noqa: E402
from sermtl.data.validate.tables import STORE_DTYPE, TABLE_KEYS, build_tables  # noqa: E402

__all__ = [
    "DATA_DOCS_DIR",
    "MAX_EXAMPLES",
    "RATING_MAX",
    "RATING_MIN",
    "SAMPLE_COUNT_TOLERANCE",
    "SHA256_RE",
    "STORE_DTYPE",
    "SUMMARY_FILE",
    "TABLE_KEYS",
    "VALIDATION_OUTPUT",
    "Check",
    "Failure",
    "ValidationInputError",
    "ValidationSummary",
    "build_checks",
    "build_tables",
    "rating_grid",
    "validate",
]
