"""params.yaml is the single source of parameters: typos and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sermtl.params import ParamsError, load_params, params_from_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load_with_every_section():
    params = load_params(ROOT / "params.yaml")
    assert params.data.thresholds.low_max == 2.0 and params.data.thresholds.high_min == 4.0
    assert params.data.sessions == [1, 2, 3, 4, 5]
    assert params.features.frame_ms == 40 and params.features.hop_ms == 10
    assert {"model", "train", "eval"} <= set(params.extra)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {sample_rat: 16000}", r"params.yaml:data: unknown key\(s\) sample_rat"),
        ("data: {sample_rate: fast}", r"params.yaml:data.sample_rate: expected int, got 'fast'"),
        ("data: {sessions: 5}", r"params.yaml:data.sessions: expected a list"),
        ("data: {thresholds: {low_max: true}}", r"data.thresholds.low_max: expected float, got True"),
        ("validation: [1, 2]", r"params.yaml:validation: expected a mapping"),
        ("data: {corpus: [unclosed", r"params.yaml: not valid YAML"),
    ],
)
def test_bad_params_name_the_key(text, message):
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(text)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "params.yaml")


def test_section_hash_changes_only_with_its_section():
    base = params_from_yaml("data: {sample_rate: 16000}\nvalidation: {min_duration_s: 0.3}")
    other_validation = params_from_yaml("data: {sample_rate: 16000}\nvalidation: {min_duration_s: 0.2}")
    other_data = params_from_yaml("data: {sample_rate: 8000}\nvalidation: {min_duration_s: 0.3}")
    assert base.section_hash("data") == other_validation.section_hash("data")
    assert base.section_hash("data") != other_data.section_hash("data")
