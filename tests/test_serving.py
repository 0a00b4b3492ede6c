"""The served model: request parsing (fast, no server), then the ensemble of two tiny really trained fold
networks logged into a run on a real `mlflow server`, registered as @champion, loaded back with
`mlflow.pyfunc.load_model`, and served by the real scoring server (`mlflow models serve`) over HTTP, and
by `sermtl serve` (the same app behind the request-size limit of sermtl.mlops.scoring)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from sermtl_localstack import LOOPBACK, MlflowServer, free_port, mlflow_command, stop_process_group

from sermtl.evaluate.metrics import PROBABILITY_COLUMNS
from sermtl.mlops import model_logging, serving, tracking
from sermtl.mlops.serving import InvalidAudioError, parse_input
from sermtl.params import params_from_dict
from sermtl.schema import DIMENSIONS

RATE = 16000
MAX_S = 2.0  # serving.max_duration_s of these tests: "too long" stays a small request
MAX_TOTAL_S = 3.0  # serving.max_total_duration_s: two 1.6 s inputs are too much
MIN_S = 0.1  # serving.min_duration_s (ServingParams' default): 1600 samples
MAX_BYTES = 4_000_000  # serving.max_request_bytes of the logged test model
SYSTEM = "mtl_attention"
FOLDS = 2
MODEL_NAME = "sermtl-ser-test"
# A tiny network (as tests/test_training.py) trained one epoch: a few seconds per fold on 2 cores.
TINY_PARAMS = {
    "profile": "paper",
    "features": {"frame_ms": 20, "hop_ms": 20, "max_frames": 10},
    "model": {"conv_channels": 4, "conv_kernel": 8, "conv_pool": 4, "rnn_hidden": 8, "rnn_layers": 1},
    "train": {"learning_rate": 0.01, "batch_size": 16, "max_epochs": 1, "device": "cpu", "seeds": [0]},
    "serving": {
        "max_duration_s": MAX_S,
        "max_total_duration_s": MAX_TOTAL_S,
        "max_request_bytes": MAX_BYTES,
        "return_attention": False,
    },
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
        ("ragged list", [WAVE, WAVE[:1600]], [8000, 1600]),
        ("DataFrame waveform", pd.DataFrame({"waveform": [WAVE, WAVE[:2000].tolist()]}), [8000, 2000]),
        ("Series", pd.Series([WAVE, WAVE[:3000]]), [8000, 3000]),
        ("column vector", WAVE.reshape(-1, 1), [8000]),
        ("batch of column vectors", [WAVE.reshape(-1, 1), WAVE[:1700].reshape(1, -1)], [8000, 1700]),
        ("dict waveform", {"waveform": np.stack([WAVE, WAVE])}, [8000, 8000]),
        ("wav bytes", wav_bytes(PCM), [8000]),
        ("base64 wav", b64(wav_bytes(PCM)), [8000]),
        ("list of wav", [wav_bytes(PCM), b64(wav_bytes(PCM[:1800]))], [8000, 1800]),
        ("DataFrame wav", pd.DataFrame({"wav": [b64(wav_bytes(PCM)), wav_bytes(PCM[:1650])]}), [8000, 1650]),
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
    silent_tail = wav_bytes(np.zeros(1600, np.int16))  # ends with zero bytes, which dtype S would drop
    assert parse([silent_tail])[0].size == 1600
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
        ("NaN", np.r_[0.0, np.nan, np.zeros(2000)], r"1 NaN, 0 infinite; first at sample 1"),
        ("inf", np.r_[np.zeros(2000), -np.inf], r"0 NaN, 1 infinite"),
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


@pytest.mark.parametrize(
    ("name", "model_input"),
    [
        ("one sample", np.array([0.1])),
        ("one sample as a list", [0.1]),
        ("a sample short", WAVE[:1599]),
        ("short int16", PCM[:100]),
        ("short wav", wav_bytes(PCM[:100])),
        ("short batch member", {"waveform": [WAVE, WAVE[:800]]}),
    ],
)
def test_inputs_shorter_than_the_minimum_are_refused_naming_it(name, model_input):
    with pytest.raises(
        InvalidAudioError, match=r"the minimum is 0\.1 s \(serving\.min_duration_s\)"
    ) as caught:
        parse_input(model_input, sample_rate=RATE, max_duration_s=MAX_S, min_duration_s=MIN_S)
    assert "at least 1600 samples" in caught.value.message
    assert caught.value.get_http_status_code() == 400


def test_the_minimum_is_at_least_one_frame_and_inclusive():
    assert parse_input(WAVE[:1600], sample_rate=RATE, min_duration_s=MIN_S)[0].size == 1600  # exactly 0.1 s
    # A front end whose frame (40 ms) is longer than serving.min_duration_s raises the minimum to a frame.
    frame = {"sample_rate": RATE, "min_duration_s": 0.01, "frame_s": 0.04}
    with pytest.raises(
        InvalidAudioError, match=r"the minimum is 0\.04 s \(one frame of the model's front end"
    ):
        parse_input(WAVE[:639], **frame)
    assert parse_input(WAVE[:640], **frame)[0].size == 640


def test_a_request_longer_than_the_total_is_refused_before_any_file_is_decoded(monkeypatch):
    clip = tone(1.5)  # each under MAX_S; three of them over MAX_TOTAL_S
    limits = {"sample_rate": RATE, "max_duration_s": MAX_S, "max_total_duration_s": MAX_TOTAL_S}
    files = [wav_bytes((clip * 32767).astype(np.int16)) for _ in range(3)]
    decoded = []
    real_read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda *a, **k: decoded.append(1) or real_read(*a, **k))
    total = r"4\.50 s of audio in total \(3 inputs, 72000 samples .*the limit is 3 s per request"
    with pytest.raises(InvalidAudioError, match=total + r" \(serving\.max_total_duration_s\)"):
        parse_input({"wav": files}, **limits)
    assert decoded == []  # refused on the headers alone
    with pytest.raises(InvalidAudioError, match=r"3\.10 s of audio in total \(3 inputs"):
        parse_input([clip, clip, clip[:1600]], **limits)  # float samples: 1.5 + 1.5 + 0.1 s
    assert len(parse_input(files[:2], **limits)) == 2 and decoded == [1, 1]  # 3 s: at the limit is fine


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
    out = model.predict(None, [WAVE, WAVE[:1600]])
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


def _fake_fold_models(train_dir: Path, frame_samples: int) -> None:
    """config.json of two fold models, as ensemble_members reads them (no weights: nothing is loaded)."""
    network = {"config": {"sample_rate": RATE, "frame_samples": frame_samples, "hop_samples": 320}}
    for fold in range(FOLDS):
        model_dir = train_dir / SYSTEM / f"fold{fold}" / "model"
        model_dir.mkdir(parents=True)
        description = {
            "format": 1,
            "system": SYSTEM,
            "dimensions": list(DIMENSIONS),
            "networks": {"all": network},
        }
        (model_dir / "config.json").write_text(json.dumps(description))


def test_the_served_model_records_its_limits(tmp_path):
    _fake_fold_models(tmp_path, frame_samples=640)  # 40 ms frames
    _, config = serving.ensemble_members(tmp_path, SYSTEM, FOLDS, params_from_dict(TINY_PARAMS))
    assert {key: config[key] for key in serving.LIMIT_KEYS} == {
        "max_duration_s": MAX_S,
        "min_duration_s": MIN_S,
        "max_total_duration_s": MAX_TOTAL_S,
        "max_request_bytes": MAX_BYTES,
    }
    # serving.min_duration_s below the networks' frame (trained with 40 ms, params now say 5 ms): the
    # frame is the minimum the model records.
    low = params_from_dict(
        {
            **TINY_PARAMS,
            "features": {**TINY_PARAMS["features"], "frame_ms": 5, "hop_ms": 5},
            "serving": {**TINY_PARAMS["serving"], "min_duration_s": 0.01},
        }
    )
    _, config = serving.ensemble_members(tmp_path, SYSTEM, FOLDS, low)
    assert config["min_duration_s"] == pytest.approx(0.04)
    model = serving.SerEnsemblePyfunc()
    model.configure([StubPredictor({}, [])], {**config, "folds": [0]})
    assert model.limits().min_samples == 640 and model.max_request_bytes == MAX_BYTES
    with pytest.raises(InvalidAudioError, match=r"the minimum is 0\.04 s"):
        model.predict(None, WAVE[:600])
    # A serving.json from before the limits: ServingParams' defaults.
    old = {k: v for k, v in config.items() if k not in serving.LIMIT_KEYS or k == "max_duration_s"}
    model.configure([StubPredictor({}, [])], {**old, "folds": [0]})
    assert (model.min_duration_s, model.max_total_duration_s) == (0.1, 120.0)
    assert model.max_request_bytes == 16_000_000
    _fake_fold_models(tmp_path / "long", frame_samples=3 * RATE)  # a frame longer than max_duration_s
    with pytest.raises(ValueError, match=r"3 s frame\) must be .* at most serving\.max_duration_s \(2 s\)"):
        serving.ensemble_members(tmp_path / "long", SYSTEM, FOLDS, params_from_dict(TINY_PARAMS))


def test_fold_models_take_the_minimum_from_their_networks():
    class Network:
        config = type("Config", (), {"sample_rate": RATE, "frame_samples": 3200, "hop_samples": 160})

    predictor = StubPredictor({d: [0.2, 0.3, 0.5] for d in DIMENSIONS}, [1.0])
    predictor.networks = {"all": Network()}
    model = serving.AudioPyfunc()  # as tracking.SerModelPyfunc: members, no serving.json
    model.predictors = [predictor]
    with pytest.raises(InvalidAudioError, match=r"the minimum is 0\.2 s \(one frame"):
        model.predict(None, WAVE[:3000])
    assert len(model.predict(None, WAVE[:3200])) == 1


# --- sermtl serve's request-size limit, as ASGI (no server) --------------------------------------------


def _asgi(app, headers: dict[str, str], chunks: list[bytes]):
    """Run one HTTP request through an ASGI app: (status, body, calls of receive)."""
    import asyncio

    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent, calls = [], []

    async def receive():
        calls.append(1)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(app(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), len(calls)


def test_request_size_limit_answers_413_before_the_app_reads_the_body():
    from sermtl.mlops.scoring import RequestSizeLimit

    seen = []

    async def inner(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = RequestSizeLimit(inner, max_bytes=100)
    # Content-Length over the limit: 413 naming both sizes; the body is read and thrown away, never stored.
    status, body, calls = _asgi(app, {"content-length": "150"}, [b"x" * 50] * 3)
    assert status == 413 and seen == [] and calls == 3
    error = json.loads(body)
    assert error["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert "150 bytes; the limit is 100 bytes (serving.max_request_bytes)" in error["message"]
    # Expect: 100-continue: refused on the headers, before the client sends anything.
    status, _, calls = _asgi(app, {"content-length": "10000000000", "expect": "100-continue"}, [b"x"])
    assert (status, calls, seen) == (413, 0, [])
    # Too long to wait for: refused without reading (the connection is closed).
    status, _, calls = _asgi(
        RequestSizeLimit(inner, 100, drain_max_bytes=1000), {"content-length": "5000"}, [b"x"]
    )
    assert (status, calls, seen) == (413, 0, [])
    # Chunked (no Content-Length): refused once past the limit.
    status, body, _ = _asgi(app, {"transfer-encoding": "chunked"}, [b"x" * 60, b"x" * 60, b"x" * 60])
    assert status == 413 and seen == [] and b"(chunked) is at least 120 bytes; the limit is 100 bytes" in body
    # At the limit: the app gets the whole body, chunked or not.
    assert _asgi(app, {"transfer-encoding": "chunked"}, [b"a" * 60, b"b" * 40])[:2] == (200, b"ok")
    assert _asgi(app, {"content-length": "100"}, [b"c" * 100])[:2] == (200, b"ok")
    assert seen == [b"a" * 60 + b"b" * 40, b"c" * 100]


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
    from sermtl.data.ingest import ingest
    from sermtl.data.synth import synthesize
    from sermtl.train.training import train_fold

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
    model_uri = model_logging.log_ensemble_model(
        train_dir, SYSTEM, FOLDS, params, run_id=parent, tracking_uri=uri
    )
    log_s = time.monotonic() - started
    version = tracking.register_model(model_uri, MODEL_NAME, alias="champion", tracking_uri=uri)
    return {"uri": uri, "parent": parent, "model_uri": model_uri, "version": version, "log_s": log_s}


def _members(train_dir: Path) -> list:
    from sermtl.train.training import load_predictor

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
    """`mlflow models serve` (or `sermtl serve`, with sermtl=True) of a registered model, in its own
    process group, on loopback."""

    def __init__(self, model_uri: str, tracking_uri: str, directory: Path, sermtl: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = directory / "scoring-server.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
        # The server execs `uvicorn` by name: the venv's bin must be on PATH (as in an activated venv).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if sermtl:
            command = [sys.executable, "-m", "sermtl.cli", "serve", "-m", model_uri]
        else:
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

    def invoke(self, payload: dict | str | bytes | Iterator[bytes]):
        """POST /invocations; a generator of bytes is sent chunked (no Content-Length)."""
        import requests

        body = json.dumps(payload) if isinstance(payload, dict) else payload
        return requests.post(
            f"{self.url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60
        )

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (uvicorn workers)."""
        import psutil

        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


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
        # The second input is exactly the minimum, serving.min_duration_s: short, but taken.
        ragged = {"dataframe_split": {"columns": ["waveform"], "data": [[waveform.tolist()], [[0.1] * 1600]]}}
        assert len(ok(ragged)) == 2
        assert len(ok({"inputs": tone(MIN_S).tolist()})) == 1
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
        too_much = [tone(1.6).tolist(), tone(1.6, seed=1).tolist()]  # each under MAX_S, together over
        bad = {
            "one sample": ({"inputs": [0.1]}, "the minimum is 0.1 s (serving.min_duration_s)"),
            "a sample short": ({"inputs": tone(MIN_S)[:-1].tolist()}, "at least 1600 samples"),
            "total": ({"inputs": too_much}, "3.20 s of audio in total"),
            "total limit": (
                {"dataframe_split": {"columns": ["waveform"], "data": [[too_much[0]], [too_much[1]]]}},
                "the limit is 3 s per request (serving.max_total_duration_s)",
            ),
            "empty": ({"inputs": []}, "empty"),
            "int64 values": ({"inputs": list(range(-500, 500))}, "integer dtype int64"),
            "NaN": ('{"inputs": [0.0, NaN' + ", 0.5" * 2000 + "]}", "1 NaN"),
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


@pytest.mark.slow
def test_sermtl_serve_refuses_large_bodies_before_reading_them(registered, train_dir, tmp_path):
    import socket

    started = time.monotonic()
    server = ScoringServer(f"models:/{MODEL_NAME}@champion", registered["uri"], tmp_path, sermtl=True)
    try:
        server.wait_ready()
        boot_s = time.monotonic() - started
        # The limit is the one recorded in the model (serving.max_request_bytes), not a default.
        assert f"request bodies over {MAX_BYTES} bytes are refused with 413" in server.log_path.read_text()
        waveform = PCM.astype(np.float32) / 32768
        expected = _expected(train_dir, waveform)

        def still_serving(chunked: bool = False) -> None:
            request = json.dumps({"dataframe_split": {"columns": ["wav"], "data": [[b64(wav_bytes(PCM))]]}})
            response = server.invoke(
                iter([request[:100].encode(), request[100:].encode()]) if chunked else request
            )
            assert response.status_code == 200, response.text[:500]
            _assert_matches(response.json()["predictions"][0], expected)

        def refused(response, what: str) -> None:
            assert response.status_code == 413, (response.status_code, response.text[:500])
            body = response.json()
            assert body["error_code"] == "REQUEST_LIMIT_EXCEEDED"
            assert what in body["message"], body["message"]
            assert f"the limit is {MAX_BYTES} bytes (serving.max_request_bytes)" in body["message"]

        still_serving()  # the model has run once before memory is measured
        rss_before = server.rss_bytes()
        # The probe's request: 600 s of float samples as JSON (~77 MB). Refused on its Content-Length,
        # the body read and thrown away (never parsed, never held), the worker free at once.
        big = ('{"inputs": [' + ", ".join(["0.0123"] * (600 * RATE)) + "]}").encode()
        request_started = time.monotonic()
        refused(server.invoke(big), f"the request body is {len(big)} bytes")
        refuse_s = time.monotonic() - request_started
        assert refuse_s < 5, refuse_s
        still_serving()
        # Chunked (no Content-Length): refused once past the limit.
        chunks = (big[i : i + 2**20] for i in range(0, 8 * 2**20, 2**20))
        refused(server.invoke(chunks), "the request body (chunked) is at least")
        still_serving(chunked=True)  # a chunked body under the limit reaches MLflow's app whole
        # Expect: 100-continue (as curl sends for large bodies): the 413 comes before any body is sent.
        with socket.create_connection((LOOPBACK, server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: scoring\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        growth = server.rss_bytes() - rss_before
        assert growth < 50 * 2**20, f"the server grew by {growth / 2**20:.0f} MB"
        # Under the limit, the body reaches MLflow's app and the model's own limits: 400 naming them.
        under = ('{"inputs": [' + ", ".join(["0.0123"] * ((MAX_BYTES - 100) // 8)) + "]}").encode()
        assert len(under) <= MAX_BYTES
        response = server.invoke(under)
        assert response.status_code == 400 and "the limit is 2 s (serving.max_duration_s)" in response.text
        response = server.invoke({"inputs": [0.1]})
        assert response.status_code == 400 and "the minimum is 0.1 s" in response.json()["message"]
        still_serving()
        print(
            f"\nsermtl serve ready in {boot_s:.1f}s; {len(big) / 1e6:.1f} MB refused in {refuse_s:.2f}s, "
            f"server RSS {growth / 2**20:+.1f} MB after the refusals"
        )
    finally:
        stop_process_group(server.process)
