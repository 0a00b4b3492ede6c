"""The served model: request parsing (fast, no server), then the ensemble of two tiny really trained fold
networks logged into a run on a real `mlflow server`, registered as @champion, loaded back with
`mlflow.pyfunc.load_model`, and served by the real scoring server (`mlflow models serve`) over HTTP."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

from sermtl import serving, tracking
from sermtl.localstack import LOOPBACK, MlflowServer, free_port, mlflow_command, stop_process_group
from sermtl.metrics import PROBABILITY_COLUMNS
from sermtl.params import params_from_dict
from sermtl.schema import DIMENSIONS
from sermtl.serving import InvalidAudioError, parse_input

RATE = 16000
MAX_S = 2.0  # serving.max_duration_s of these tests: "too long" stays a small request
SYSTEM = "mtl_attention"
FOLDS = 2
MODEL_NAME = "sermtl-ser-test"
# A tiny network (as tests/test_training.py) trained one epoch: a few seconds per fold on 2 cores.
TINY_PARAMS = {
    "profile": "paper",
    "features": {"frame_ms": 20, "hop_ms": 20, "max_frames": 10},
    "model": {"conv_channels": 4, "conv_kernel": 8, "conv_pool": 4, "rnn_hidden": 8, "rnn_layers": 1},
    "train": {"learning_rate": 0.01, "batch_size": 16, "max_epochs": 1, "device": "cpu", "seed": 0},
    "serving": {"max_duration_s": MAX_S, "return_attention": False},
}


def tone(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    voiced = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse(model_input):
    return parse_input(model_input, sample_rate=RATE, max_duration_s=MAX_S)


# --- parsing, no server -------------------------------------------------------------------------------

WAVE = tone(0.5)
PCM = (WAVE * 32767).astype(np.int16)


@pytest.mark.parametrize(
    ("name", "model_input", "lengths"),
    [
        ("float32", WAVE, [8000]),
        ("float64 list", WAVE.astype(np.float64).tolist(), [8000]),
        ("2-D batch", np.stack([WAVE, WAVE]), [8000, 8000]),
        ("ragged list", [WAVE, WAVE[:100]], [8000, 100]),
        ("DataFrame waveform", pd.DataFrame({"waveform": [WAVE, WAVE[:5].tolist()]}), [8000, 5]),
        ("Series", pd.Series([WAVE, WAVE[:7]]), [8000, 7]),
        ("column vector", WAVE.reshape(-1, 1), [8000]),
        ("batch of column vectors", [WAVE.reshape(-1, 1), WAVE[:9].reshape(1, -1)], [8000, 9]),
        ("dict waveform", {"waveform": np.stack([WAVE, WAVE])}, [8000, 8000]),
        ("wav bytes", wav_bytes(PCM), [8000]),
        ("base64 wav", b64(wav_bytes(PCM)), [8000]),
        ("list of wav", [wav_bytes(PCM), b64(wav_bytes(PCM[:300]))], [8000, 300]),
        ("DataFrame wav", pd.DataFrame({"wav": [b64(wav_bytes(PCM)), wav_bytes(PCM[:50])]}), [8000, 50]),
        ("JSON string array", np.array([b64(wav_bytes(PCM))]), [8000]),
        ("dict wav", {"wav": [wav_bytes(PCM)]}, [8000]),
        ("float wav", wav_bytes(WAVE, subtype="FLOAT"), [8000]),
    ],
)
def test_accepted_inputs(name, model_input, lengths):
    waveforms = parse(model_input)
    assert [w.size for w in waveforms] == lengths
    assert all(w.dtype == np.float32 and w.ndim == 1 and w.flags.c_contiguous for w in waveforms)
    assert all(np.abs(w).max() <= 1.0 for w in waveforms)


def test_int16_pcm_and_its_wav_file_give_the_same_samples():
    from_pcm = parse(PCM)[0]
    np.testing.assert_array_equal(from_pcm, PCM.astype(np.float32) / 32768)
    np.testing.assert_array_equal(parse(wav_bytes(PCM))[0], from_pcm)
    np.testing.assert_allclose(from_pcm, WAVE, atol=1e-4)


def test_a_wav_file_is_never_squeezed_through_a_fixed_width_bytes_array():
    silent_tail = wav_bytes(np.zeros(400, np.int16))  # ends with zero bytes, which dtype S would drop
    assert parse([silent_tail])[0].size == 400
    with pytest.raises(InvalidAudioError, match="dtype S"):
        parse(np.array([silent_tail]))


@pytest.mark.parametrize(
    ("name", "model_input", "message"),
    [
        ("nothing", None, "empty request"),
        ("empty list", [], "empty request"),
        ("empty waveform", np.array([], np.float32), r"empty waveform \(0 samples\)"),
        ("empty wav", b"", r"empty wav file \(0 bytes\)"),
        ("int64", np.arange(100), "integer dtype int64"),
        ("int32", np.zeros(100, np.int32), "integer dtype int32"),
        ("uint8", np.zeros(100, np.uint8), "integer dtype uint8"),
        ("bool", np.ones(100, bool), "dtype bool"),
        ("complex", np.zeros(100, np.complex64), "dtype complex64"),
        ("NaN", np.array([0.0, np.nan, 0.1]), r"1 NaN, 0 infinite; first at sample 1"),
        ("inf", np.array([0.0, 0.2, -np.inf]), r"0 NaN, 1 infinite"),
        ("too long", np.zeros(int(2.5 * RATE), np.float32), r"2\.50 s long .* the limit is 2 s"),
        ("too long wav", wav_bytes(np.zeros(int(2.5 * RATE), np.int16)), "the limit is 2 s"),
        ("int16 as float", PCM.astype(np.float32), "looks like int16 PCM passed as float"),
        (
            "wrong rate",
            wav_bytes(PCM, rate=8000),
            "wav sample rate is 8000 Hz but this model expects 16000 Hz",
        ),
        ("stereo wav", wav_bytes(np.stack([PCM, PCM], axis=1)), "2 channels; this model takes mono"),
        ("3-D array", np.zeros((2, 1, 100), np.float32), r"shape \(2, 1, 100\)"),
        ("stereo array", np.stack([WAVE, WAVE], axis=1), r"\(8000, 2\) looks like \(samples, channels\)"),
        ("garbage bytes", b"RIFF? no, just some bytes", "not a readable audio file"),
        ("not base64", "this is %%% not base64", "must be base64"),
        ("scalar", np.float64(0.5), "a single number is not a waveform"),
        ("both columns", pd.DataFrame({"wav": ["x"], "waveform": [[0.1]]}), "not both"),
        ("unknown columns", pd.DataFrame({"a": ["x"], "b": ["y"]}), r"got columns \['a', 'b'\]"),
        ("unknown key", {"audio": [0.1]}, "got \\['audio'\\]"),
        ("text as samples", {"waveform": "UklGRg=="}, "send wav files under 'wav'"),
        ("number as wav", pd.DataFrame({"wav": [1.0]}), "input 0: the 'wav' column holds wav files"),
        ("ragged nesting", [[0.1, [0.2]]], "not an array of samples"),
        ("bad batch member", [WAVE, np.arange(3)], "input 1: samples of integer dtype int64"),
        ("unsupported type", object(), "unsupported input of type object"),
    ],
)
def test_refused_inputs_name_the_problem(name, model_input, message):
    with pytest.raises(InvalidAudioError, match=message) as caught:
        parse(model_input)
    # An MlflowException with INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server), and a ValueError.
    assert isinstance(caught.value, MlflowException) and isinstance(caught.value, ValueError)
    assert caught.value.error_code == ErrorCode.Name(ErrorCode.INVALID_PARAMETER_VALUE)
    assert caught.value.get_http_status_code() == 400


def test_a_refused_request_is_not_echoed_back_in_full():
    error = InvalidAudioError("input: wav has 2 channels")
    error.message = f"Failed to predict data '{'A' * 100_000}'. \nError: {error.message}"  # as MLflow does
    assert error.message.endswith("...'. \nError: input: wav has 2 channels")
    assert len(error.message) < 300 and "wav has 2 channels" in error.serialize_as_json()


def test_return_attention_param():
    assert serving.return_attention_param(None, False) is False
    assert serving.return_attention_param(None, True) is True
    assert serving.return_attention_param({"return_attention": True}, False) is True
    assert serving.return_attention_param({"return_attention": "false"}, True) is False
    with pytest.raises(InvalidAudioError, match="true or false"):
        serving.return_attention_param({"return_attention": 3}, False)
    with pytest.raises(InvalidAudioError, match="unknown param"):
        serving.return_attention_param({"temperature": 1}, False)


class StubPredictor:
    sample_rate = RATE

    def __init__(self, probabilities: dict[str, list[float]], attention: list[float]) -> None:
        self.probabilities = probabilities
        self.attention = np.asarray(attention, np.float32)

    def predict(self, waveform: np.ndarray) -> dict:
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        return {
            d: {"class": int(np.argmax(p)), "probabilities": p, "attention": self.attention}
            for d, p in self.probabilities.items()
        }


def test_ensemble_averages_probabilities_and_attention_over_members():
    first = StubPredictor({d: [0.6, 0.3, 0.1] for d in DIMENSIONS}, [0.5, 0.5, 0.0])
    second = StubPredictor({d: [0.0, 0.45, 0.55] for d in DIMENSIONS}, [0.0, 0.5, 0.5])
    model = serving.SerEnsemblePyfunc()
    config = {"sample_rate": RATE, "max_duration_s": MAX_S, "dimensions": ["arousal", "valence", "dominance"]}
    model.configure([first, second], {**config, "folds": [0, 1]})
    out = model.predict(None, [WAVE, WAVE[:10]])
    # Each member alone says "low" resp. "high"; the mean (0.3, 0.375, 0.325) says "medium".
    assert list(out.columns) == serving.output_columns(DIMENSIONS)  # valence, arousal, dominance
    assert len(out) == 2 and (out["arousal_class"] == 1).all()
    assert out["arousal_prob_medium"].iloc[0] == pytest.approx(0.375)
    with_attention = model.predict(None, WAVE, params={"return_attention": True})
    assert list(with_attention.columns) == serving.output_columns(DIMENSIONS) + serving.attention_columns(
        DIMENSIONS
    )
    assert with_attention["valence_attention"].iloc[0] == pytest.approx([0.25, 0.5, 0.25])
    with pytest.raises(InvalidAudioError, match="looks like int16 PCM"):
        model.predict(None, PCM.astype(np.float64))
    with pytest.raises(MlflowException, match="expects 8000 Hz"):
        slow = StubPredictor({}, [])
        slow.sample_rate = 8000
        model.configure([first, slow], {**config, "folds": [0, 1]})


def test_ensemble_members_are_checked_before_logging(tmp_path):
    params = params_from_dict(TINY_PARAMS)
    with pytest.raises(ValueError, match="only neural systems can be served"):
        serving.ensemble_members(tmp_path, "egemaps_linear", 5, params)
    with pytest.raises(ValueError, match="unknown system 'nope'"):
        serving.ensemble_members(tmp_path, "nope", 5, params)
    with pytest.raises(FileNotFoundError, match=r"mtl_attention/fold0/model/config\.json: missing"):
        serving.ensemble_members(tmp_path, SYSTEM, 2, params)
    with pytest.raises(ValueError, match="distinct non-negative"):
        serving.ensemble_members(tmp_path, SYSTEM, [1, 1], params)
    with pytest.raises(ValueError, match="at least one fold"):
        serving.ensemble_members(tmp_path, SYSTEM, [], params)


def test_signature_has_no_input_schema_and_the_attention_param():
    signature = serving.serving_signature(["arousal"], return_attention=True)
    assert signature.inputs is None
    assert [c.name for c in signature.outputs.inputs] == [
        "arousal_class",
        *(f"arousal_{c}" for c in PROBABILITY_COLUMNS),
        "arousal_attention",
    ]
    assert not signature.outputs.inputs[-1].required
    (param,) = signature.params.params
    assert (param.name, param.default) == ("return_attention", True)


# --- logged, registered, served -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Booting (~10-20 s) overlaps the training of the fold networks; fixtures that need it wait."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start(wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    from sermtl.ingest import ingest
    from sermtl.synth import synthesize
    from sermtl.training import train_fold

    root = tmp_path_factory.mktemp("serving")
    synthesize(root / "IEMOCAP_full_release", utterances=60, mean_duration_s=0.8)
    ingest(str(root / "IEMOCAP_full_release"), root / "store", params_from_dict({}), progress=False)
    params = params_from_dict(TINY_PARAMS)
    for fold in range(FOLDS):
        train_fold(
            root / "store", SYSTEM, fold, root / "train" / SYSTEM / f"fold{fold}", params, progress=False
        )
    return root / "train"


@pytest.fixture(scope="module")
def registered(mlflow_server, train_dir) -> dict:
    uri = mlflow_server.wait_ready().tracking_uri
    params = params_from_dict(TINY_PARAMS)
    parent = tracking.start_study("serving-study", params, experiment="sermtl-serving", tracking_uri=uri)
    started = time.monotonic()
    model_uri = serving.log_ensemble_model(train_dir, SYSTEM, FOLDS, params, run_id=parent, tracking_uri=uri)
    log_s = time.monotonic() - started
    version = tracking.register_model(model_uri, MODEL_NAME, alias="champion", tracking_uri=uri)
    return {"uri": uri, "parent": parent, "model_uri": model_uri, "version": version, "log_s": log_s}


def _members(train_dir: Path) -> list:
    from sermtl.training import load_predictor

    return [load_predictor(train_dir / SYSTEM / f"fold{k}" / "model") for k in range(FOLDS)]


def _expected(train_dir: Path, waveform: np.ndarray) -> dict[str, np.ndarray]:
    results = [member.predict(waveform) for member in _members(train_dir)]
    return {d: np.mean([r[d]["probabilities"] for r in results], axis=0) for d in DIMENSIONS}


def _assert_matches(row: dict, expected: dict[str, np.ndarray]) -> None:
    for dimension, probabilities in expected.items():
        assert row[f"{dimension}_class"] == int(np.argmax(probabilities))
        got = [row[f"{dimension}_{column}"] for column in PROBABILITY_COLUMNS]
        assert got == pytest.approx(list(probabilities), abs=1e-6)


@pytest.mark.slow
def test_logged_ensemble_loads_and_predicts_like_its_members(registered, train_dir, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    client = tracking.client(registered["uri"])
    run = client.get_run(registered["parent"])
    assert run.info.status == "RUNNING"  # logging into the study's run did not end it
    logged = client.get_logged_model(registered["model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == registered["parent"] and logged.name == "ensemble"
    assert logged.tags[tracking.TAG_SYSTEM] == SYSTEM
    assert registered["model_uri"] in {f"models:/{o.model_id}" for o in run.outputs.model_outputs}
    alias = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert alias.version == registered["version"]

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    meta = model.metadata
    assert meta.get_input_schema() is None
    assert meta.metadata["sermtl.folds"] == list(range(FOLDS))
    assert [p.name for p in meta.get_params_schema().params] == ["return_attention"]
    ensemble = model.unwrap_python_model()  # configured from serving.json
    assert isinstance(ensemble, serving.SerEnsemblePyfunc) and len(ensemble.predictors) == FOLDS
    assert (ensemble.sample_rate, ensemble.max_duration_s, ensemble.return_attention) == (RATE, MAX_S, False)

    waveform = PCM.astype(np.float32) / 32768  # exactly what the wav file below decodes to
    expected = _expected(train_dir, waveform)
    from_waveform = model.predict(waveform)
    assert list(from_waveform.columns) == serving.output_columns(DIMENSIONS)
    _assert_matches(from_waveform.iloc[0].to_dict(), expected)
    from_wav = model.predict(pd.DataFrame({"wav": [b64(wav_bytes(PCM))]}))
    pd.testing.assert_frame_equal(from_wav, from_waveform)
    _assert_matches(model.predict(wav_bytes(PCM)).iloc[0].to_dict(), expected)

    batch = model.predict(pd.DataFrame({"waveform": [waveform, tone(1.3, seed=1)]}))
    assert len(batch) == 2
    _assert_matches(batch.iloc[0].to_dict(), expected)

    with_attention = model.predict(waveform, params={"return_attention": True})
    frames = int(np.ceil(waveform.size / (0.02 * RATE)))
    for dimension in DIMENSIONS:
        weights = np.asarray(with_attention[f"{dimension}_attention"].iloc[0])
        assert weights.size == frames and weights.sum() == pytest.approx(1.0, abs=1e-4)

    with pytest.raises(MlflowException, match="wav sample rate is 8000 Hz"):
        model.predict(wav_bytes(PCM, rate=8000))


class ScoringServer:
    """`mlflow models serve` of a registered model, in its own process group, on loopback."""

    def __init__(self, model_uri: str, tracking_uri: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = directory / "scoring-server.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
        # The server execs `uvicorn` by name: the venv's bin must be on PATH (as in an activated venv).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [*mlflow_command(), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        command += ["-h", LOOPBACK, "-p", str(self.port), "-w", "1"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=directory,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 180.0) -> ScoringServer:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"scoring server exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return self
            time.sleep(0.25)
        raise TimeoutError(f"scoring server not ready in {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def invoke(self, payload: dict | str):
        import requests

        body = payload if isinstance(payload, str) else json.dumps(payload)
        return requests.post(
            f"{self.url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60
        )


@pytest.mark.slow
def test_scoring_server_over_http(registered, train_dir, tmp_path):
    started = time.monotonic()
    server = ScoringServer(f"models:/{MODEL_NAME}@champion", registered["uri"], tmp_path)
    try:
        server.wait_ready()
        boot_s = time.monotonic() - started
        waveform = PCM.astype(np.float32) / 32768
        expected = _expected(train_dir, waveform)
        wav = b64(wav_bytes(PCM))

        def ok(payload) -> list[dict]:
            response = server.invoke(payload)
            assert response.status_code == 200, response.text[:2000]
            return response.json()["predictions"]

        (row,) = ok({"inputs": waveform.tolist()})
        _assert_matches(row, expected)
        assert set(row) == set(serving.output_columns(DIMENSIONS))
        assert len(ok({"inputs": [waveform.tolist(), waveform.tolist()]})) == 2
        ragged = {"dataframe_split": {"columns": ["waveform"], "data": [[waveform.tolist()], [[0.1] * 900]]}}
        assert len(ok(ragged)) == 2
        (from_wav,) = ok({"dataframe_split": {"columns": ["wav"], "data": [[wav]]}})
        _assert_matches(from_wav, expected)
        (from_wav_inputs,) = ok({"inputs": wav})
        _assert_matches(from_wav_inputs, expected)
        assert len(ok({"inputs": {"wav": [wav, wav]}})) == 2
        (with_attention,) = ok({"inputs": waveform.tolist(), "params": {"return_attention": True}})
        assert len(with_attention["arousal_attention"]) == int(np.ceil(waveform.size / (0.02 * RATE)))
        assert (
            "arousal_attention"
            not in ok({"inputs": waveform.tolist(), "params": {"return_attention": False}})[0]
        )

        too_long = np.zeros(int(2.5 * RATE)).tolist()
        bad = {
            "empty": ({"inputs": []}, "empty"),
            "int64 values": ({"inputs": list(range(-500, 500))}, "integer dtype int64"),
            "NaN": ('{"inputs": [0.0, NaN, 0.5]}', "1 NaN"),
            "too long": ({"inputs": too_long}, "the limit is 2 s"),
            "int16 as float": (
                {"inputs": PCM.astype(float).tolist()},
                "looks like int16 PCM passed as float",
            ),
            "wrong rate": (
                {"inputs": b64(wav_bytes(PCM, rate=8000))},
                "8000 Hz but this model expects 16000 Hz",
            ),
            "stereo": ({"inputs": b64(wav_bytes(np.stack([PCM, PCM], 1)))}, "2 channels"),
            "garbage": (
                {"dataframe_split": {"columns": ["wav"], "data": [[b64(b"junk" * 50)]]}},
                "not a readable",
            ),
            "not base64": ({"dataframe_split": {"columns": ["wav"], "data": [["%%%"]]}}, "must be base64"),
            "bad param": (
                {"inputs": waveform.tolist(), "params": {"return_attention": "maybe"}},
                "return_attention",
            ),
        }
        for name, (payload, message) in bad.items():
            response = server.invoke(payload)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:500])
            body = response.json()
            assert body["error_code"] == "INVALID_PARAMETER_VALUE", (name, body)
            assert message in body["message"], (name, body["message"][-500:])
            assert len(body["message"]) < 1000, (name, "the request is echoed back in full")
            print(f"\n{name}: HTTP {response.status_code} ...{body['message'][-160:]!r}", end="")
        # Still serving, and still right.
        (row,) = ok({"inputs": waveform.tolist()})
        _assert_matches(row, expected)
        print(f"\nensemble logged in {registered['log_s']:.1f}s; scoring server ready in {boot_s:.1f}s")
    finally:
        stop_process_group(server.process)
