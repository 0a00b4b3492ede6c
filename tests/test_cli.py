"""The `sermtl` command line: every subcommand has --help, and synth/ingest/validate chain end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sermtl.cli import app

SUBCOMMANDS = ["synth", "ingest", "validate"]


def test_top_level_help_lists_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "--params" in result.output


def test_installed_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "sermtl.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "ingest" in result.stdout


def test_synth_ingest_validate_chain(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synth: {utterances: 60, seed: 3, mean_duration_s: 0.8}\n")
    runner = CliRunner()
    corpus, store, checks = tmp_path / "IEMOCAP_full_release", tmp_path / "store", tmp_path / "validation"
    result = runner.invoke(app, ["synth", "--out", str(corpus), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "wrote 60 utterances" in result.output
    result = runner.invoke(
        app, ["ingest", "--source", str(corpus), "--out", str(store), "--params", str(params)]
    )
    assert result.exit_code == 0 and "kept 60, dropped 0" in result.output
    result = runner.invoke(
        app, ["ingest", "--source", str(corpus), "--out", str(store), "--params", str(params)]
    )
    assert "up to date, skipped" in result.output
    result = runner.invoke(
        app, ["validate", "--ingest", str(store), "--out", str(checks), "--params", str(params)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((checks / "summary.json").read_text())["success"] is True

    strict = tmp_path / "strict.yaml"
    strict.write_text("data:\n  speakers_per_session: 3\n")
    result = runner.invoke(
        app, ["validate", "--ingest", str(store), "--out", str(checks), "--params", str(strict)]
    )
    assert result.exit_code == 1
    assert "speakers" in result.output


def test_bad_params_file_is_exit_2_with_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  sampel_rate: 16000\n")
    result = CliRunner().invoke(app, ["ingest", "--out", str(tmp_path / "o"), "--params", str(params)])
    assert result.exit_code == 2 and "sampel_rate" in result.output


def test_choices_come_from_the_parameter_types_and_bad_ones_stop_before_any_work(tmp_path):
    """--device and --subset list the values the params types allow, and click refuses others (exit 2)
    before params.yaml is even read (no such file here)."""
    from sermtl.params import DEVICES, SUBSETS

    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "<" + "|".join(DEVICES) + ">" in shown
    assert (
        "<" + "|".join(SUBSETS) + ">" in runner.invoke(app, ["compare", "--help"], terminal_width=200).output
    )
    missing = str(tmp_path / "no-params.yaml")
    wide = {"COLUMNS": "200"}
    bad = runner.invoke(
        app, ["train", "--system", "x", "--fold", "0", "--device", "gpu", "--params", missing], env=wide
    )
    assert bad.exit_code == 2 and "'gpu' is not one of 'auto', 'cpu', 'cuda'" in bad.output
    bad = runner.invoke(app, ["compare", "--subset", "scripted", "--params", missing], env=wide)
    assert bad.exit_code == 2 and "'scripted' is not one of 'all', 'improvised'" in bad.output


def test_a_bad_endpoint_option_is_exit_2_naming_it_and_nothing_is_written(tmp_path):
    out = tmp_path / "o"
    args = ["ingest", "--out", str(out), "--source", str(tmp_path), "--endpoint-url", "localhost:8333"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--endpoint-url: must be an http(s):// URL (got 'localhost:8333')" in result.output
    assert not out.exists()
