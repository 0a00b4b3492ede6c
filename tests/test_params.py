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
    assert params.profile == "demo" and params.features.frame_ms == 20
    assert set(params.systems) == {"mtl_attention", "mtl_mean", "stl_attention", "stl_mean", "egemaps_linear"}
    assert params.eval.proposed_system in params.systems
    assert params.extra == {}


def test_paper_profile_keeps_sections_as_written_and_demo_overrides_them():
    text = (ROOT / "params.yaml").read_text()
    paper = params_from_yaml(text.replace("profile: demo", "profile: paper", 1))
    demo = params_from_yaml(text)
    assert (paper.features.hop_ms, paper.features.max_frames, paper.model.conv_channels) == (10, 500, 40)
    assert (paper.model.rnn_hidden, paper.train.learning_rate, paper.train.batch_size) == (128, 1e-4, 16)
    assert demo.features.hop_ms != paper.features.hop_ms and demo.model.rnn_hidden < paper.model.rnn_hidden
    assert demo.model.rnn == paper.model.rnn and demo.train.seed == paper.train.seed  # untouched keys survive
    assert demo.model.loss_weights == paper.model.loss_weights


def test_unknown_profile_is_an_error():
    with pytest.raises(ParamsError, match=r"params.yaml:profile: unknown profile 'fast'; known: paper, demo"):
        params_from_yaml("profile: fast\nprofiles:\n  demo: {}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {sample_rat: 16000}", r"params.yaml:data: unknown key\(s\) sample_rat"),
        ("data: {sample_rate: fast}", r"params.yaml:data.sample_rate: expected int, got 'fast'"),
        ("data: {sessions: 5}", r"params.yaml:data.sessions: expected a list"),
        ("data: {thresholds: {low_max: true}}", r"data.thresholds.low_max: expected float, got True"),
        ("validation: [1, 2]", r"params.yaml:validation: expected a mapping"),
        ("systems: {mtl: {pooling: max, kindd: neural}}", r"params.yaml:systems.mtl: unknown key\(s\) kindd"),
        (
            "systems: {mtl: {pooling: max}}",
            r"params.yaml:systems.mtl.pooling: 'max' is not one of attention, mean",
        ),
        ("train: {device: tpu}", r"params.yaml:train.device: 'tpu' is not one of auto, cpu, cuda"),
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
