"""Running the suite: one great-expectations Checkpoint over every table, in an ephemeral context whose
only Data Docs site is a folder of the staging directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from sermtl.data.validate.checks import Check

DATA_DOCS_DIR = "data_docs"
TABLES_DIR = "_tables"  # derived tables as parquet, inside the staging dir while GX runs
_PARTIAL_UNEXPECTED = 20  # rows GX keeps per failed expectation (Data Docs show them)


def run_checkpoint(
    tables: dict[str, pd.DataFrame], checks: list[Check], staging: Path
) -> list[tuple[Check, Any]]:
    """Run every table's suite through one Checkpoint; Data Docs are rendered into `staging/data_docs`."""
    import great_expectations as gx

    table_dir = staging / TABLES_DIR
    table_dir.mkdir(parents=True)
    context = _context(staging)
    source = context.data_sources.add_pandas("ingest")

    definitions = []
    for table_name, frame in tables.items():
        expectations = [c.expectation for c in checks if c.table == table_name]
        if not expectations:
            continue
        # Parquet assets, not dataframe assets: a Checkpoint hands the same batch parameters to all
        # its validation definitions, so in-memory dataframes would need one Checkpoint per table.
        path = table_dir / f"{table_name}.parquet"
        frame.to_parquet(path, index=False)
        batch = source.add_parquet_asset(table_name, path=path).add_batch_definition_whole_dataframe("all")
        # Add the suite complete: adding expectations one by one re-serialises it every time.
        suite = context.suites.add(gx.ExpectationSuite(name=table_name, expectations=expectations))
        definitions.append(
            context.validation_definitions.add(
                gx.ValidationDefinition(name=table_name, data=batch, suite=suite)
            )
        )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="ingest_validation",
            validation_definitions=definitions,
            # No UpdateDataDocsAction: it rebuilds the whole site once per validation definition
            # (7 builds, ~4 s); one build after the run renders the same pages.
            actions=[],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": _PARTIAL_UNEXPECTED},
        )
    )
    result = checkpoint.run(run_id=gx.RunIdentifier(run_name="sermtl-validate"))
    context.build_data_docs()

    paired = _paired(tables, checks, result)
    shutil.rmtree(table_dir)
    if not (staging / DATA_DOCS_DIR / "index.html").is_file():
        raise RuntimeError(f"great-expectations rendered no Data Docs into {staging / DATA_DOCS_DIR}")
    return paired


def _context(staging: Path) -> Any:
    """A great-expectations context whose only Data Docs site is `staging/data_docs`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Ephemeral (in-memory stores): a file context re-reads its YAML config for every stored object,
    # which cost seconds per run. Its only Data Docs site is a folder of the staging directory.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DATA_DOCS_DIR: {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(staging / DATA_DOCS_DIR),
                },
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _paired(tables: dict[str, pd.DataFrame], checks: list[Check], result: Any) -> list[tuple[Check, Any]]:
    """Each result with its check, table by table in `tables` order."""
    # Results come back grouped by suite; pair them with their checks by the unique name in meta.
    by_key = {(c.table, c.name): c for c in checks}
    if len(by_key) != len(checks):
        raise RuntimeError("expectation names must be unique per table")
    results = {v.suite_name: v.results for v in result.run_results.values()}
    return [
        (by_key[(name, res.expectation_config.meta["name"])], res)
        for name in tables
        for res in results.get(name, [])
    ]
