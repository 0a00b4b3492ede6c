"""params.yaml is the single source of parameters: typos, wrong types and nonsensical values are errors
naming the file, the key path and what is allowed, before any stage writes anything."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sermtl.cli import app
from sermtl.params import Params, ParamsError, load_params, params_from_dict, params_from_yaml

ROOT = Path(__file__).resolve().parents[1]
REPO_PARAMS = (ROOT / "params.yaml").read_text()


def test_repository_params_load_with_every_section():
    params = load_params(ROOT / "params.yaml")
    assert params.data.thresholds.low_max == 2.0 and params.data.thresholds.high_min == 4.0
    assert params.data.sessions == [1, 2, 3, 4, 5]
    assert params.profile == "demo" and params.features.frame_ms == 20
    assert set(params.systems) == {"mtl_attention", "mtl_mean", "stl_attention", "stl_mean", "egemaps_linear"}
    assert params.eval.proposed_system in params.systems
    assert params.extra == {}


def test_golden_params_and_the_defaults_load():
    assert load_params(ROOT / "tests" / "golden" / "params.yaml").profile == "paper"
    assert params_from_dict({}) == Params()
    # What dataclasses.asdict writes (tests dump parameters that way) reads back as the same parameters.
    assert params_from_yaml(yaml.safe_dump(dataclasses.asdict(Params()))) == Params()


def test_paper_profile_keeps_sections_as_written_and_demo_overrides_them():
    paper = params_from_yaml(REPO_PARAMS.replace("profile: demo", "profile: paper", 1))
    demo = params_from_yaml(REPO_PARAMS)
    assert (paper.features.hop_ms, paper.features.max_frames, paper.model.conv_channels) == (10, 500, 40)
    assert (paper.model.rnn_hidden, paper.train.learning_rate, paper.train.batch_size) == (128, 1e-4, 16)
    assert demo.features.hop_ms != paper.features.hop_ms and demo.model.rnn_hidden < paper.model.rnn_hidden
    assert demo.model.rnn == paper.model.rnn and demo.train.optimizer == paper.train.optimizer  # untouched
    assert paper.train.seeds == [0, 1, 2] and demo.train.seeds == [0]  # the demo trains one seed, to be fast
    assert demo.model.loss_weights == paper.model.loss_weights


def test_unknown_profile_is_an_error():
    with pytest.raises(
        ParamsError, match=r"^params.yaml: profile: unknown profile 'fast' \(expected one of: paper, demo\)$"
    ):
        params_from_yaml("profile: fast\nprofiles:\n  demo: {}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "data: {sample_rat: 16000}",
            r"params.yaml: data.sample_rat: unknown key; did you mean `sample_rate`\? "
            r"\(expected one of: corpus, ",
        ),
        ("data: {sample_rate: fast}", r"params.yaml: data.sample_rate: expected int, got 'fast'"),
        ("data: {sessions: 5}", r"params.yaml: data.sessions: expected a list"),
        ("data: {thresholds: {low_max: true}}", r"data.thresholds.low_max: expected float, got True"),
        ("data: {synth: {null_labels: 1}}", r"params.yaml: data.synth.null_labels: expected bool, got 1"),
        ("validation: [1, 2]", r"params.yaml: validation: expected a mapping"),
        ("systems: {mtl: {pooling: max, kindd: neural}}", r"params.yaml: systems.mtl.kindd: unknown key"),
        (
            "systems: {mtl: {pooling: max}}",
            r"params.yaml: systems.mtl.pooling: must be one of attention, mean \(got 'max'\)",
        ),
        ("train: {device: tpu}", r"params.yaml: train.device: must be one of auto, cpu, cuda \(got 'tpu'\)"),
        ("data: {corpus: [unclosed", r"params.yaml: not valid YAML: expected ',' or ']'.* \(line 1, column"),
        ("train: {seed: 1}\ntrain: {seed: 2}", r"not valid YAML: key 'train' is written twice .*\(line 2,"),
        ("- data", r"params.yaml: expected a mapping of sections at the top level, got list"),
    ],
)
def test_bad_params_name_the_key(text, message):
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(text)


@pytest.mark.parametrize("where", ["", "profiles:\n  demo:\n    "])
def test_a_params_file_with_the_old_promotion_tolerance_is_told_to_rename_it(where):
    text = where + "registry: {promotion: {rule: not_worse, tolerance: 0.0}}"
    prefix = "profiles.demo." if where else ""
    message = (
        rf"^params.yaml: {prefix}registry.promotion.tolerance: no longer a key: replaced by "
        r"registry.promotion.margin, with another meaning: .* rename the key to `margin` and review its "
        r"value \(default 0.01, one UAR point\)$"
    )
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(text)


@pytest.mark.parametrize("where", ["", "profiles:\n  demo:\n    "])
def test_a_params_file_with_the_old_train_seed_is_told_to_list_seeds(where):
    prefix = "profiles.demo." if where else ""
    message = (
        rf"^params.yaml: {prefix}train.seed: no longer a key: replaced by train.seeds, a list of seeds "
        r"\(write `seeds: \[0\]` for one run as before\)$"
    )
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(where + "train: {seed: 0}")


# --- ranges: one case per checked field (the key, a bad value, what the message says is allowed) --------

RANGES = [
    ("train.batch_size", -4, "an integer >= 1"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.max_epochs", 0, "an integer >= 1"),
    ("train.early_stopping_patience", 0, "an integer >= 1"),
    ("train.learning_rate", -0.001, "a number > 0"),
    ("train.learning_rate", 0, "a number > 0"),
    ("train.learning_rate", float("nan"), "a number > 0"),
    ("train.learning_rate", float("inf"), "a number > 0"),
    ("train.num_workers", -1, "an integer >= 0"),
    ("train.optimizer", "sgd", "one of adam, adamw"),
    ("data.sample_rate", 0, r"an integer in \[8000, 96000\]"),
    ("data.speakers_per_session", 0, "an integer >= 1"),
    ("data.max_drop_fraction", 1.5, r"a number in \[0, 1\]"),
    ("data.max_drop_fraction", -0.1, r"a number in \[0, 1\]"),
    ("data.thresholds.low_max", 0.5, r"a number in \[1, 5\]"),
    ("data.thresholds.high_min", 5.5, r"a number in \[1, 5\]"),
    ("data.synth.utterances", 10, r"an integer in \[60, 200000\]"),
    ("data.synth.seed", -1, "an integer >= 0"),
    ("data.synth.mean_duration_s", 0, r"a number in \[0.8, 12\]"),
    ("data.synth.cue_span", 0, r"a number in \(0, 1\]"),
    ("data.synth.cue_span", 1.5, r"a number in \(0, 1\]"),
    ("data.synth.cue_sharing", -0.1, r"a number in \[0, 1\]"),
    ("data.synth.cue_sharing", 1.01, r"a number in \[0, 1\]"),
    ("data.corpus", " ", "a folder or s3:// URI"),
    ("data.s3_endpoint_url", "localhost:8333", r"an http\(s\):// URL, or empty"),
    ("validation.rating_step", 0, r"a number in \(0, 4\]"),
    ("validation.min_duration_s", 0, "a number > 0"),
    ("validation.max_duration_s", -1, "a number > 0"),
    ("validation.silence_rms_dbfs", 3, "a number <= 0"),
    ("validation.clipping_fraction", 2, r"a number in \[0, 1\]"),
    ("validation.max_bad_audio_fraction", -1, r"a number in \[0, 1\]"),
    ("validation.max_unannotated_fraction", 1.01, r"a number in \[0, 1\]"),
    ("validation.min_class_count_per_fold", -1, "an integer >= 0"),
    ("features.frame_ms", 0, "an integer >= 1"),
    ("features.hop_ms", -10, "an integer >= 1"),
    ("features.max_frames", 0, "an integer >= 1"),
    ("model.conv_channels", 0, "an integer >= 1"),
    ("model.conv_kernel", 0, "an integer >= 1"),
    ("model.conv_pool", 0, "an integer >= 1"),
    ("model.rnn", "transformer", "one of gru, lstm"),
    ("model.rnn_hidden", 0, "an integer >= 1"),
    ("model.rnn_layers", 0, "an integer >= 1"),
    ("model.dropout", 2, r"a number in \[0, 1\)"),
    ("model.dropout", 1.0, r"a number in \[0, 1\)"),
    ("model.dropout", -0.1, r"a number in \[0, 1\)"),
    ("significance.resampling", "jackknife", "one of bootstrap, permutation"),
    ("significance.resamples", 0, "an integer >= 1"),
    ("significance.confidence", 1, r"a number in \(0, 1\)"),
    ("significance.confidence", 0, r"a number in \(0, 1\)"),
    ("significance.alpha", 0, r"a number in \(0, 1\)"),
    ("significance.alpha", 1.5, r"a number in \(0, 1\)"),
    ("significance.correction", "bonferroni", "one of holm, none"),
    ("significance.subset", "scripted", "one of all, improvised"),
    ("significance.seed", -3, "an integer >= 0"),
    ("registry.model_name", "my model", "a name of letters, digits.*"),
    ("registry.gate.test", "ttest", "one of resampling, mcnemar, ztest"),
    ("registry.gate.min_dimensions_better", -1, "an integer >= 0"),
    ("registry.gate.max_comparisons_worse", -1, "an integer >= 0"),
    ("registry.promotion.rule", "always", "one of not_worse, better"),
    ("registry.promotion.margin", -0.1, r"a number in \[0, 1\]"),
    ("registry.promotion.margin", 1.5, r"a number in \[0, 1\]"),
    ("registry.promotion.lock_timeout_s", -1, "a number >= 0"),
    ("train.grad_clip_norm", -1.0, "a number >= 0"),
    ("serving.max_duration_s", 0, "a number > 0"),
    ("serving.max_total_duration_s", -1, "a number > 0"),
    ("serving.max_request_bytes", 0, "an integer >= 1"),
    ("serving.min_duration_s", 0, "a number > 0"),
    ("tracking.retry_budget_s", 0, "a number > 0"),
    ("cluster.gpu.limit", 0, "an integer >= 1"),
    ("cluster.retry.count", -1, "an integer >= 0"),
    ("cluster.retry.backoff_s", -1, "an integer >= 0"),
    ("cluster.retry.backoff_factor", 0.5, "a number >= 1"),
    ("cluster.retry.backoff_max_s", -1, "an integer >= 0"),
    ("cluster.images.cpu", "my image", "an image reference without spaces, or empty"),
    ("cluster.steps.train.retries", -2, "an integer >= -1"),
    ("cluster.secrets.s3.name", "Sermtl_S3", r"a Kubernetes object name \(lowercase\), or empty"),
]


def nested(path: str, value: object) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    raw: object = value
    for key in reversed(path.split(".")):
        raw = {key: raw}
    return raw  # type: ignore[return-value]


@pytest.mark.parametrize(("path", "value", "allowed"), RANGES, ids=[f"{p}={v}" for p, v, _ in RANGES])
def test_nonsensical_values_name_the_key_and_the_allowed_range(path, value, allowed):
    message = rf"^params\.yaml: {re.escape(path)}: must be {allowed} \(got .+\)$"
    with pytest.raises(ParamsError, match=message):
        params_from_yaml(yaml.safe_dump(nested(path, value)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {sessions: []}", r"data.sessions: must list at least 2 item\(s\) \(got \[\]\)"),
        ("data: {sessions: [3]}", r"data.sessions: must list at least 2 item\(s\)"),
        ("data: {sessions: [1, 2, 2]}", r"data.sessions: must list each item once \(got \[1, 2, 2\]\)"),
        ("data: {sessions: [0, 1]}", r"data.sessions\[0\]: must be an integer in \[1, 5\] \(got 0\)"),
        ("data: {sessions: [1, 6]}", r"data.sessions\[1\]: must be an integer in \[1, 5\] \(got 6\)"),
        ("validation: {categories: []}", r"validation.categories: must list at least 1 item"),
        ("train: {seeds: []}", r"train.seeds: must list at least 1 item\(s\) \(got \[\]\)"),
        ("train: {seeds: [0, 1, 0]}", r"train.seeds: must list each item once \(got \[0, 1, 0\]\)"),
        ("train: {seeds: [0, -1]}", r"train.seeds\[1\]: must be an integer >= 0 \(got -1\)"),
        ("train: {seeds: 3}", r"train.seeds: expected a list, got 3"),
        (
            "validation: {allowed_source_sample_rates: [16000, 0]}",
            r"validation.allowed_source_sample_rates\[1\]: must be an integer >= 1 \(got 0\)",
        ),
        ("eval: {dimensions: []}", r"eval.dimensions: must list at least 1 item"),
        ("eval: {dimensions: [arousal, arousal]}", r"eval.dimensions: must list each item once"),
        ("eval: {subsets: [all, all]}", r"eval.subsets: must list each item once"),
        (
            "significance: {baselines: [mtl_mean, mtl_mean]}",
            r"significance.baselines: must list each item once",
        ),
        (
            "model: {loss_weights: {arousal: -1}}",
            r"model.loss_weights.arousal: must be a number >= 0 \(got -1.0\)",
        ),
        (
            "cluster: {gpu: {node_selector: {'a b': x}}}",
            r"cluster.gpu.node_selector.a b: the key must be a node",
        ),
        (
            "cluster: {gpu: {node_selector: {pool: 'a b'}}}",
            r"cluster.gpu.node_selector.pool: must be a label",
        ),
    ],
)
def test_lists_and_mappings_are_checked_item_by_item(text, message):
    with pytest.raises(ParamsError, match=rf"^params.yaml: {message}"):
        params_from_yaml(text)


# --- fields that must agree with each other (checked on the sections as written and on every profile) -----


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "data: {thresholds: {low_max: 4.5}}",
            r"data.thresholds.low_max: must be below data.thresholds.high_min = 4 \(got 4.5\)$",
        ),
        ("data: {thresholds: {low_max: 3, high_min: 3}}", r"data.thresholds.low_max: must be below"),
        (
            "validation: {min_duration_s: 50}",
            r"validation.min_duration_s: must be below validation.max_duration_s = 40 \(got 50\)$",
        ),
        ("features: {frame_ms: 20, hop_ms: 30}", r"features.hop_ms: must be at most features.frame_ms = 20"),
        (
            "features: {frame_ms: 5, hop_ms: 5}\nmodel: {conv_kernel: 40}",
            r"model.conv_kernel: 40 with model.conv_pool = 2 needs frames of 119\+ samples; "
            r"features.frame_ms = 5 at data.sample_rate = 16000 gives 80$",
        ),
        (
            "serving: {max_duration_s: 60, max_total_duration_s: 30}",
            r"serving.max_total_duration_s: must be at least serving.max_duration_s = 60 \(got 30\)$",
        ),
        (
            "serving: {min_duration_s: 90}",
            r"serving.min_duration_s: must be below serving.max_duration_s = 60 \(got 90\)$",
        ),
        ("serving: {min_duration_s: 0.01}", r"serving.min_duration_s: must be one frame or more, .*40 ms"),
        (
            "eval: {proposed_system: mtl_atention}",
            r"eval.proposed_system: must be one of the systems mtl_attention, .* \(got 'mtl_atention'\)$",
        ),
        (
            "significance: {baselines: [mtl_mean, stl_men]}",
            r"significance.baselines\[1\]: must be one of the systems .* other than eval.proposed_system "
            r"\(got 'stl_men'\)$",
        ),
        ("significance: {baselines: [mtl_attention]}", r"significance.baselines\[0\]: .*other than eval"),
        ("systems: {}", r"systems: must define at least one system$"),
        ("systems: {'../x': {kind: neural}}", r"systems.../x: the key must be a name of letters"),
        ("systems: {s: {kind: svm}}", r"systems.s.kind: must be one of neural, egemaps \(got 'svm'\)$"),
        (
            "cluster: {gpu: {tolerations: [{key: a, operator: Exists, value: b}]}}",
            r"cluster.gpu.tolerations\[0\].value: must be empty when operator is Exists",
        ),
        (
            "cluster: {gpu: {tolerations: [{key: '', operator: Equal, value: b}]}}",
            r"cluster.gpu.tolerations\[0\].key: must be set when operator is Equal",
        ),
    ],
)
def test_fields_that_contradict_each_other(text, message):
    with pytest.raises(ParamsError, match=rf"^params.yaml: {message}"):
        params_from_yaml(text)


# --- known names: sections, keys, dimensions; at the top level and in every profile ------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "trian: {batch_size: 4}",
            r"trian: unknown section; did you mean `train`\? \(expected one of: profile, data, validation, ",
        ),
        ("extra: {}", r"extra: unknown section"),
        (
            "model: {loss_weights: {arousal: 1, valance: 2}}",
            r"model.loss_weights.valance: unknown key; did you mean `valence`\? ",
        ),
        (
            "eval: {dimensions: [arousal, valance]}",
            r"eval.dimensions\[1\]: must be one of valence, arousal, ",
        ),
        ("eval: {subsets: [all, improvized]}", r"eval.subsets\[1\]: must be one of all, improvised"),
        # A profile: its keys are named as written, whether it is selected or not.
        (
            "profile: demo\nprofiles:\n  demo: {trian: {}}",
            r"profiles.demo.trian: unknown section; did you mean `train`\? \(expected",
        ),
        ("profile: paper\nprofiles:\n  demo: {trian: {}}", r"profiles.demo.trian: unknown section"),
        ("profiles:\n  fast: {train: {batchsize: 4}}", r"profiles.fast.train.batchsize: unknown key"),
        (
            "profiles:\n  fast: {train: {batch_size: 0}}",
            r"profiles.fast.train.batch_size: must be an integer",
        ),
        ("profiles:\n  fast: {profile: demo}", r"profiles.fast.profile: unknown section"),
        ("profiles:\n  fast: {profiles: {}}", r"profiles.fast.profiles: unknown section"),
        (
            "profiles:\n  fast: {model: {loss_weights: {arousl: 2}}}",
            r"profiles.fast.model.loss_weights.arousl",
        ),
        (
            "profiles:\n  fast: {eval: {dimensions: [valance]}}",
            r"profiles.fast.eval.dimensions\[0\]: must be",
        ),
        ("profiles:\n  fast: {systems: {x: {kind: svm}}}", r"profiles.fast.systems.x.kind: must be one of"),
        ("profiles:\n  fast:", r"profiles.fast: expected a mapping of sections, got None"),
        ("profiles: [demo]", r"profiles: expected a mapping of profile name -> sections"),
        ("profiles:\n  paper: {train: {seed: 1}}", r"profiles.paper: 'paper' is the sections as written"),
        # Only the merge shows these: each part alone is fine.
        (
            "data: {thresholds: {high_min: 3.0}}\nprofiles:\n  fast: {data: {thresholds: {low_max: 3.5}}}",
            r"data.thresholds.low_max: must be below data.thresholds.high_min = 3 \(got 3.5\) "
            r"\(with profiles.fast merged\)$",
        ),
        (
            "profiles:\n  fast: {eval: {proposed_system: mtl}}",
            r"eval.proposed_system: must be one of the systems .* \(got 'mtl'\) \(with profiles.fast ",
        ),
    ],
)
def test_unknown_names_are_errors_in_the_base_and_in_every_profile(text, message):
    with pytest.raises(ParamsError, match=rf"^params.yaml: {message}"):
        params_from_yaml(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trian: {max_epochs: 3}", r"trian: unknown section; did you mean `train`\? \(expected one of: "),
        ("train: {learnig_rate: 0.1}", r"train.learnig_rate: unknown key; did you mean `learning_rate`\? "),
        ("profiles:\n  demo: {modle: {}}", r"profiles.demo.modle: unknown section; did you mean `model`\? "),
        ("profile: dmeo\nprofiles:\n  demo: {}", r"profile: unknown profile 'dmeo'; did you mean `demo`\? "),
        ("train: {zzz: 1}", r"train.zzz: unknown key \(expected one of: "),  # nothing close: no guess
    ],
)
def test_a_typo_names_the_closest_valid_name(text, message):
    with pytest.raises(ParamsError, match=rf"^params.yaml: {message}"):
        params_from_yaml(text)


def test_a_profile_may_add_a_system_and_merge_mappings():
    text = (
        "profile: fast\nsystems: {mtl_attention: {}, mtl_mean: {pooling: mean}}\n"
        "model: {loss_weights: {arousal: 1.0, valence: 1.0, dominance: 0.5}}\n"
        "significance: {baselines: [mtl_mean]}\n"
        "profiles:\n  fast:\n    systems: {tiny: {kind: neural, pooling: mean}}\n"
        "    significance: {baselines: [tiny]}\n    model: {loss_weights: {arousal: 2.0}}\n"
    )
    params = params_from_yaml(text)
    assert "tiny" in params.systems and "mtl_attention" in params.systems
    assert params.significance.baselines == ["tiny"]
    assert params.model.loss_weights == {"arousal": 2.0, "valence": 1.0, "dominance": 0.5}


def test_every_error_is_one_line():
    for text in ("trian: {}", "data: {corpus: [unclosed", "train: {batch_size: -4}", "a: 1\na: 2"):
        with pytest.raises(ParamsError) as caught:
            params_from_yaml(text)
        assert "\n" not in str(caught.value) and str(caught.value).startswith("params.yaml: ")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="parameter file not found"):
        load_params(tmp_path / "params.yaml")


def test_section_hash_changes_only_with_its_section():
    base = params_from_yaml("data: {sample_rate: 16000}\nvalidation: {min_duration_s: 0.3}")
    other_validation = params_from_yaml("data: {sample_rate: 16000}\nvalidation: {min_duration_s: 0.2}")
    other_data = params_from_yaml("data: {sample_rate: 8000}\nvalidation: {min_duration_s: 0.3}")
    assert base.section_hash("data") == other_validation.section_hash("data")
    assert base.section_hash("data") != other_data.section_hash("data")


# --- the CLI and the pipeline steps: one `error:` line, exit 2, nothing written ---------------------------

# The repository's params.yaml with one mistake each: (find, replace with, the key path in the message).
BAD_FILES = {
    "range": (
        "  batch_size: 16\n",
        "  batch_size: -4\n",
        "train.batch_size: must be an integer >= 1 (got -4)",
    ),
    "thresholds": ("low_max: 2.0", "low_max: 4.5", "data.thresholds.low_max: must be below"),
    "section": (
        "\ntrain:\n",
        "\ntrian:\n",
        "trian: unknown section; did you mean `train`? (expected one of: profile, data, ",
    ),
    "profile section": (
        "    train: {learning_rate",
        "    trian: {learning_rate",
        "profiles.demo.trian: unknown",
    ),
    "loss weight": (
        "{arousal: 1.0, valence: 1.0,",
        "{arousal: 1.0, valance: 1.0,",
        "model.loss_weights.valance",
    ),
    "dimension": (
        "dimensions: [arousal, valence,",
        "dimensions: [arousal, valance,",
        "eval.dimensions[1]: must",
    ),
    "proposed": (
        "proposed_system: mtl_attention",
        "proposed_system: mtl_atention",
        "eval.proposed_system: must",
    ),
}


def bad_params_file(tmp_path: Path, case: str) -> tuple[Path, str]:
    find, replace, message = BAD_FILES[case]
    assert REPO_PARAMS.count(find) == 1, find
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.replace(find, replace))
    return path, message


CLI_COMMANDS = {
    "train": [
        "train",
        "--system",
        "mtl_attention",
        "--fold",
        "0",
        "--store",
        "{tmp}/store",
        "--out",
        "{tmp}/run",
    ],
    "validate": ["validate", "--ingest", "{tmp}/store", "--out", "{tmp}/checks"],
    "ingest": ["ingest", "--source", "{tmp}/corpus", "--out", "{tmp}/store"],
    "synth": ["synth", "--out", "{tmp}/corpus"],
}


@pytest.mark.parametrize("command", CLI_COMMANDS)
@pytest.mark.parametrize("case", BAD_FILES)
def test_cli_refuses_bad_params_in_one_line_and_writes_nothing(tmp_path, case, command):
    params, message = bad_params_file(tmp_path, case)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in CLI_COMMANDS[command]]
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {params}: {message}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_pipeline_steps_fail_with_the_params_error_before_any_work(tmp_path):
    from sermtl import pipeline_runner

    sys.path.insert(0, str(ROOT))  # components/ is a top-level package of the repository
    try:
        from components.train import plan_study
    finally:
        sys.path.remove(str(ROOT))
    for case in BAD_FILES:
        params, message = bad_params_file(tmp_path, case)
        text = params.read_text()
        expected = f"params_yaml (pipeline parameter): {message}"
        with pytest.raises(ParamsError) as caught:
            plan_study.python_func(params_yaml=text)
        assert str(caught.value).startswith(expected)
        with pytest.raises(ParamsError) as caught:
            pipeline_runner.train_step(tmp_path / "store", text, "mtl_attention", 0, tmp_path / "run")
        assert str(caught.value).startswith(expected)
        with pytest.raises(ParamsError):
            pipeline_runner.ingest_step(str(tmp_path / "corpus"), text, tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing written"


def test_every_mistyped_or_out_of_range_key_of_a_file_is_named_at_once():
    text = "train: {batch_size: 0, device: tpu}\ndata: {sample_rate: fast}\nmodel: {rnn_hiden: 3}"
    with pytest.raises(ParamsError) as caught:
        params_from_yaml(text)
    lines = str(caught.value).splitlines()
    assert lines == [
        "params.yaml: data.sample_rate: expected int, got 'fast'",
        "params.yaml: model.rnn_hiden: unknown key; did you mean `rnn_hidden`? (expected one of: "
        "conv_channels, conv_kernel, conv_pool, rnn, rnn_hidden, rnn_layers, dropout, frame_log, frame_norm, "
        "loss_weights)",
        "params.yaml: train.batch_size: must be an integer >= 1 (got 0)",
        "params.yaml: train.device: must be one of auto, cpu, cuda (got 'tpu')",
    ]


def test_the_choices_are_the_types_literal_values():
    from sermtl.evaluate.metrics import SUBSETS as METRIC_SUBSETS
    from sermtl.params import DEVICES, SUBSETS, TESTS

    assert DEVICES == ("auto", "cpu", "cuda") and SUBSETS == METRIC_SUBSETS
    assert TESTS == ("resampling", "mcnemar", "ztest")
