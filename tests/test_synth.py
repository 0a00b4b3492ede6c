"""The synthetic corpus must look exactly like IEMOCAP_full_release to a strict parser, be
reproducible byte for byte, and carry learnable but not trivial acoustic cues of the labels."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.stats import spearmanr

from sermtl.data import synth, synth_audio, synth_model, synth_plan
from sermtl.data.corpus import parse_emo_evaluation
from sermtl.data.synth import synthesize
from sermtl.fsutil import OUTPUT_MARKER, OutputFolderError
from sermtl.params import SynthParams

HEADER_RE = re.compile(
    r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(Ses0[1-5][FM]_\S+)\t([a-z]{3})\t"
    r"\[(\d\.\d{4}), (\d\.\d{4}), (\d\.\d{4})\]$"
)
RATER_RE = re.compile(r"^A-(E\d|[FM]1):\tval (\d); act (\d); dom {1,2}(\d);\t\(\)$")
CATEGORICAL_RE = re.compile(r"^C-(E\d|[FM]1):\t((?:[A-Z][a-z]+(?: state)?; ?)+)\t\([a-z]*\)$")
TRANSCRIPT_RE = re.compile(r"^(\S+) \[(\d{3,}\.\d{4})-(\d{3,}\.\d{4})\]: \S.*$")
TABLE_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
REQUIRED_DIALOGS = {
    3: ["Ses03M_impro05a", "Ses03M_impro05b", "Ses03M_impro08a", "Ses03M_impro08b"],
    5: ["Ses05M_script01_1", "Ses05M_script01_1b"],
}
CATEGORIES = {"neu", "hap", "exc", "sad", "ang", "fru", "sur", "fea", "dis", "oth", "xxx"}


@dataclass
class Block:
    uid: str
    session: int
    dialog: str
    letter: str
    start: str
    end: str
    category: str
    vad: tuple[float, float, float]
    external: list[tuple[int, int, int]]
    self_rating: tuple[int, int, int] | None
    raw: list[str]


def read_blocks(root: Path) -> list[Block]:
    """A strict reader of every EmoEvaluation file: any unexpected line fails the test."""
    blocks: list[Block] = []
    for path in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        text = path.read_text()
        assert text.startswith(TABLE_HEADER + "\n\n"), path
        chunks = text[len(TABLE_HEADER) + 2 :].rstrip("\n").split("\n\n")
        for chunk in chunks:
            lines = chunk.split("\n")
            match = HEADER_RE.match(lines[0])
            assert match, f"{path}: bad header line {lines[0]!r}"
            external, own = [], None
            for line in lines[1:]:
                if line.startswith("C-"):
                    assert CATEGORICAL_RE.match(line), f"{path}: bad categorical line {line!r}"
                    continue
                rater = RATER_RE.match(line)
                assert rater, f"{path}: bad rater line {line!r}"
                # Parse by name: the order inside a line is val, act, dom (not the bracket order).
                values = {k: int(v) for k, v in re.findall(r"(val|act|dom) +(\d)", line)}
                triple = (values["val"], values["act"], values["dom"])
                if rater[1].startswith("E"):
                    external.append(triple)
                else:
                    own = triple
            uid = match[3]
            dialog, last = uid.rsplit("_", 1)
            assert dialog == path.stem
            blocks.append(
                Block(
                    uid=uid,
                    session=int(uid[4]),
                    dialog=dialog,
                    letter=last[0],
                    start=match[1],
                    end=match[2],
                    category=match[4],
                    vad=(float(match[5]), float(match[6]), float(match[7])),
                    external=external,
                    self_rating=own,
                    raw=lines,
                )
            )
    return blocks


def class_of(value: float) -> int:
    return 0 if value <= 2.0 else 2 if value >= 4.0 else 1


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    made = {
        "medium": (200, 0, 1.5),
        "small": (60, 1, 1.0),
        "small_again": (60, 1, 1.0),
        "small_other_seed": (60, 2, 1.0),
    }
    out = {}
    for name, (utterances, seed, mean) in made.items():
        root = base / name / "IEMOCAP_full_release"
        summary = synthesize(root, utterances=utterances, seed=seed, mean_duration_s=mean)
        assert summary.out_dir == root
        assert summary.utterances == utterances
        out[name] = root
    return out


@pytest.fixture(scope="module")
def medium(corpora) -> Path:
    return corpora["medium"]


@pytest.fixture(scope="module")
def medium_blocks(medium) -> list[Block]:
    return read_blocks(medium)


def wav_of(root: Path, block: Block) -> Path:
    return root / f"Session{block.session}/sentences/wav/{block.dialog}/{block.uid}.wav"


def test_layout_and_file_count(medium, medium_blocks):
    # Beside the sessions only the marker of `sermtl synth` (ingestion and .dvcignore leave it out).
    assert sorted(p.name for p in medium.iterdir()) == [OUTPUT_MARKER] + [f"Session{n}" for n in range(1, 6)]
    assert len(medium_blocks) == 200
    assert len({b.uid for b in medium_blocks}) == 200
    all_files = [p for p in medium.rglob("*") if p.is_file()]
    assert [p for p in all_files if p.name.startswith(".")] == [medium / OUTPUT_MARKER]
    wavs = sorted(p for p in all_files if p.suffix == ".wav")
    assert wavs == sorted(wav_of(medium, b) for b in medium_blocks)
    dialogs = defaultdict(set)
    for b in medium_blocks:
        dialogs[b.session].add(b.dialog)
    for session, names in dialogs.items():
        s = medium / f"Session{session}"
        assert sorted(p.name for p in s.iterdir()) == ["dialog", "sentences"]
        emo = s / "dialog/EmoEvaluation"
        assert {p.stem for p in emo.glob("*.txt")} == names
        subfolders = sorted(p.name for p in emo.iterdir() if p.is_dir())
        assert subfolders == ["Attribute", "Categorical", "Self-evaluation"]
        assert {p.name for p in (emo / "Attribute").iterdir()} == {f"{d}_atr.txt" for d in names}
        assert {p.name for p in (emo / "Categorical").iterdir()} == {f"{d}_cat.txt" for d in names}
        assert {p.name for p in (emo / "Self-evaluation").iterdir()} == {f"{d}.anvil" for d in names}
        assert {p.name for p in (s / "dialog/transcriptions").iterdir()} == {f"{d}.txt" for d in names}
        assert {p.name for p in (s / "sentences/wav").iterdir()} == names
        impro = sum("_impro" in d for d in names)
        assert 0.3 <= impro / len(names) <= 0.7
    # File count: per dialog 1 EmoEvaluation + 3 decoys + 1 transcription, plus one wav per utterance,
    # plus the marker.
    n_dialogs = sum(len(v) for v in dialogs.values())
    assert len(all_files) == 5 * n_dialogs + 200 + 1
    # No temporary or set-aside folders are left next to the corpus.
    assert [p.name for p in medium.parent.iterdir()] == ["IEMOCAP_full_release"]


@pytest.mark.parametrize("utterances", [60, 61, 137, 400, 1234, 10039])
def test_plan_distributes_exactly_the_requested_number(utterances):
    dialogs, speakers = synth_plan.plan(utterances, np.random.default_rng(0), 4.45, 16000)
    assert sum(len(d.utts) for d in dialogs) == utterances
    assert sorted(speakers) == [(s, g) for s in range(1, 6) for g in "FM"]
    per_session = defaultdict(int)
    for d in dialogs:
        per_session[d.session] += 1
        assert {u.letter for u in d.utts} == {"F", "M"}, d.name  # both speakers in every dialog
    if utterances == 400:
        assert all(6 <= n <= 10 for n in per_session.values()), per_session
    if utterances == 10039:
        assert len(dialogs) == 151
        counts = defaultdict(int)
        for d in dialogs:
            counts[d.session] += len(d.utts)
        assert [counts[s] for s in range(1, 6)] == [1819, 1811, 2136, 2103, 2170]


def test_same_seed_gives_identical_bytes_other_seed_differs(corpora):
    a, b, c = corpora["small"], corpora["small_again"], corpora["small_other_seed"]
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    wavs_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*.wav")}
    wavs_c = {p.relative_to(c): p.read_bytes() for p in c.rglob("*.wav")}
    shared = set(wavs_a) & set(wavs_c)
    assert all(wavs_a[k] != wavs_c[k] for k in shared)
    labels_a = [p.read_bytes() for p in sorted(a.glob("Session1/dialog/EmoEvaluation/*.txt"))]
    labels_c = [p.read_bytes() for p in sorted(c.glob("Session1/dialog/EmoEvaluation/*.txt"))]
    assert labels_a and labels_a != labels_c


def test_wavs_are_16k_pcm16_mono_not_silent_not_clipped(medium, medium_blocks):
    for block in medium_blocks:
        path = wav_of(medium, block)
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        pcm, _ = sf.read(path, dtype="int16")
        peak = int(np.max(np.abs(pcm.astype(np.int32))))
        assert 0 < peak <= int(0.9 * 32767) + 1
        rms_db = 20 * np.log10(np.sqrt(np.mean((pcm / 32768.0) ** 2)))
        assert rms_db > -60.0


def test_durations_follow_the_requested_mean(medium, medium_blocks):
    seconds = np.array([sf.info(wav_of(medium, b)).frames / 16000 for b in medium_blocks])
    low, high = synth_plan.duration_bounds(1.5)
    assert seconds.min() >= low - 1e-3 and seconds.max() <= high + 1e-3
    assert 1.2 <= seconds.mean() <= 1.9


def test_header_lines_are_strict_and_block_structure_exact(medium):
    for path in sorted(medium.glob("Session*/dialog/EmoEvaluation/*.txt")):
        lines = path.read_text().split("\n")
        assert lines[0] == TABLE_HEADER and lines[1] == ""
        assert lines[-1] == "" and lines[-2] == ""  # ends with a blank line, like the real files
        body = lines[2:-1]
        headers = [i for i, line in enumerate(body) if line.startswith("[")]
        assert headers[0] == 0
        for i in headers[1:]:
            assert body[i - 1] == "" and body[i - 2] != ""  # exactly one blank line between blocks
        for line in body:
            assert line == "" or line.startswith(("[", "C-", "A-"))
            assert line == line.strip() or "\t" in line
            if line.startswith("["):
                assert HEADER_RE.match(line), line


def test_project_parser_reads_every_file(medium, medium_blocks):
    parsed = []
    for path in sorted(medium.glob("Session*/dialog/EmoEvaluation/*.txt")):
        parsed += parse_emo_evaluation(path.read_text(), path.relative_to(medium).as_posix())
    assert [a.uid.utterance_id for a in parsed] == [b.uid for b in medium_blocks]
    assert [(a.valence, a.arousal, a.dominance) for a in parsed] == [b.vad for b in medium_blocks]
    assert all(a.uid.speaker_letter == b.letter for a, b in zip(parsed, medium_blocks, strict=True))


def test_header_is_mean_of_external_raters_by_name(medium_blocks):
    self_changes_mean = 0
    for b in medium_blocks:
        assert len(b.external) == 2, b.uid
        mean = tuple(float(np.mean([r[i] for r in b.external])) for i in range(3))
        assert mean == b.vad, (b.uid, mean, b.vad)
        if b.self_rating is not None:
            with_self = tuple(float(np.mean([r[i] for r in [*b.external, b.self_rating]])) for i in range(3))
            self_changes_mean += with_self != b.vad
    assert self_changes_mean > len(medium_blocks) // 3  # a parser averaging self-ratings would be caught
    assert any(b.self_rating is None for b in medium_blocks)


def test_rater_names_and_self_rater_is_the_speaker(medium_blocks):
    for b in medium_blocks:
        a_names = [line.split(":")[0] for line in b.raw if line.startswith("A-")]
        c_names = [line.split(":")[0] for line in b.raw if line.startswith("C-")]
        assert [n for n in a_names if n[2] != "E"] in ([], [f"A-{b.letter}1"])
        assert [n for n in c_names if n[2] != "E"] == [f"C-{b.letter}1"]
        assert len([n for n in c_names if n[2] == "E"]) == 3


def test_ratings_on_half_grid_within_scale(medium_blocks):
    values = np.array([b.vad for b in medium_blocks])
    assert np.all((values >= 1.0) & (values <= 5.0))
    assert np.all(values * 2 == np.round(values * 2))
    assert len(np.unique(values)) > 5


def test_categories_are_known_and_xxx_kept(medium_blocks):
    cats = [b.category for b in medium_blocks]
    assert set(cats) <= CATEGORIES
    assert 0.1 <= cats.count("xxx") / len(cats) <= 0.3
    assert len(set(cats)) >= 6
    for b in medium_blocks:
        votes = [line.split("\t")[1] for line in b.raw if line.startswith("C-E")]
        if b.category == "xxx":
            assert len(set(votes)) == len(votes)  # no majority among the external raters
        else:
            name = synth.CATEGORY_NAMES[b.category]
            assert sum(v.startswith(name + ";") for v in votes) >= 2


def test_suffixed_dialogs_exist_with_their_own_wav_folders(corpora):
    for root in (corpora["small"], corpora["medium"]):
        for session, names in REQUIRED_DIALOGS.items():
            for name in names:
                emo = root / f"Session{session}/dialog/EmoEvaluation/{name}.txt"
                assert emo.is_file(), emo
                folder = root / f"Session{session}/sentences/wav/{name}"
                wavs = sorted(p.name for p in folder.iterdir())
                assert wavs and all(w.rsplit("_", 1)[0] == name for w in wavs)
                ids = [HEADER_RE.match(x)[3] for x in emo.read_text().splitlines() if x.startswith("[")]
                assert sorted(f"{i}.wav" for i in ids) == wavs


def test_speakers_both_in_every_session_indices_contiguous(medium_blocks):
    by_dialog: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for b in medium_blocks:
        by_dialog[b.dialog][b.letter].append(int(b.uid.rsplit("_", 1)[1][1:]))
    for dialog, speakers in by_dialog.items():
        assert set(speakers) == {"F", "M"}, dialog
        for idx in speakers.values():
            assert idx == list(range(len(idx)))
    sessions = defaultdict(set)
    for b in medium_blocks:
        sessions[b.session].add(b.letter)
    assert all(sessions[s] == {"F", "M"} for s in range(1, 6))
    # The mocap token differs from the speaker for a large share (trap: speaker from `Ses01F`).
    mismatched = sum(b.uid[5] != b.letter for b in medium_blocks)
    assert 0.25 <= mismatched / len(medium_blocks) <= 0.75


@pytest.mark.parametrize("name", ["small", "medium"])
def test_every_class_of_every_dimension_in_every_session(corpora, name):
    blocks = read_blocks(corpora[name])
    for session in range(1, 6):
        vads = [b.vad for b in blocks if b.session == session]
        for dim in range(3):
            assert {class_of(v[dim]) for v in vads} == {0, 1, 2}, (name, session, dim)


def test_double_space_dominance_variant_present(medium_blocks):
    lines = [line for b in medium_blocks for line in b.raw if line.startswith("A-")]
    double = sum("dom  " in line for line in lines)
    assert 0.1 < double / len(lines) < 0.6


def test_times_match_wav_durations_and_are_sequential(medium, medium_blocks):
    last_end: dict[str, int] = {}
    for b in medium_blocks:
        start, end = round(float(b.start) * 10_000), round(float(b.end) * 10_000)
        frames = sf.info(wav_of(medium, b)).frames
        assert (end - start) * 16000 == frames * 10_000, b.uid  # exact to the 4th decimal
        assert abs((float(b.end) - float(b.start)) - frames / 16000) < 5e-5
        assert start > last_end.get(b.dialog, 0)
        last_end[b.dialog] = end


def test_transcriptions_match_annotations(medium, medium_blocks):
    by_uid = {b.uid: b for b in medium_blocks}
    seen = []
    for path in sorted(medium.glob("Session*/dialog/transcriptions/*.txt")):
        for line in path.read_text().splitlines():
            match = TRANSCRIPT_RE.match(line)
            assert match, line
            b = by_uid[match[1]]
            assert (float(match[2]), float(match[3])) == (float(b.start), float(b.end))
            seen.append(match[1])
    assert sorted(seen) == sorted(by_uid)


def test_attribute_decoys_use_the_other_order(medium, medium_blocks):
    first_rater = {b.uid: b.external[0] for b in medium_blocks}
    for path in medium.glob("Session*/dialog/EmoEvaluation/Attribute/*_atr.txt"):
        for line in path.read_text().splitlines():
            match = re.match(r"^(\S+) :act (\d); :val (\d); :dom (\d); \(\)$", line)
            assert match, line
            v, a, d = first_rater[match[1]]
            assert (int(match[2]), int(match[3]), int(match[4])) == (a, v, d)


def _features(x: np.ndarray, sr: int) -> tuple[float, float, float]:
    """RMS energy (dB), spectral tilt (high/low band energy) and centroid over the louder frames."""
    rms_db = 20 * np.log10(np.sqrt(np.mean(x**2)))
    frame, hop = 512, 256
    n = 1 + (len(x) - frame) // hop
    frames = np.stack([x[i * hop : i * hop + frame] for i in range(n)]) * np.hanning(frame)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    energy = power.sum(axis=1)
    spectrum = power[energy >= np.quantile(energy, 0.7)].sum(axis=0)
    freqs = np.fft.rfftfreq(frame, 1 / sr)
    tilt = np.log(spectrum[(freqs > 1000) & (freqs < 4000)].sum() / spectrum[freqs < 1000].sum())
    centroid = float((freqs * spectrum).sum() / spectrum.sum())
    return float(rms_db), float(tilt), centroid


def test_audio_cues_are_learnable_but_not_trivial(medium, medium_blocks):
    feats = np.array([_features(*sf.read(wav_of(medium, b))) for b in medium_blocks])
    labels = np.array([b.vad for b in medium_blocks])
    rho = np.array([[spearmanr(feats[:, j], labels[:, i])[0] for i in range(3)] for j in range(3)])
    assert rho[0, 1] > 0.3  # energy <-> arousal
    assert rho[1, 0] > 0.2  # spectral tilt <-> valence
    assert rho[2, 0] > 0.1  # brighter (higher centroid) <-> valence
    assert np.all(np.abs(rho) < 0.95), rho  # no single trivial feature predicts a label
    durations = np.array([sf.info(wav_of(medium, b)).frames for b in medium_blocks])
    assert all(abs(spearmanr(durations, labels[:, i])[0]) < 0.3 for i in range(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"utterances": 59}, "too small"),
        ({"utterances": 0}, "too small"),
        ({"utterances": True}, "integer"),
        ({"utterances": 60.0}, "integer"),
        ({"mean_duration_s": 0.0}, "mean_duration_s"),
        ({"mean_duration_s": -1.0}, "mean_duration_s"),
        ({"mean_duration_s": float("nan")}, "mean_duration_s"),
        ({"mean_duration_s": float("inf")}, "mean_duration_s"),
        ({"mean_duration_s": 100.0}, "mean_duration_s"),
        ({"seed": -1}, "seed"),
        ({"sample_rate": 100}, "sample_rate"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "IEMOCAP_full_release", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_replaces_an_existing_corpus_atomically(tmp_path, monkeypatch):
    root = tmp_path / "IEMOCAP_full_release"
    synthesize(root, utterances=60, seed=3, mean_duration_s=0.8)
    (root / "Session1" / "stale.txt").write_text("left over")
    first = sorted(p.relative_to(root) for p in root.rglob("*.wav"))
    synthesize(root, utterances=60, seed=3, mean_duration_s=0.8)
    assert not (root / "Session1" / "stale.txt").exists()
    assert sorted(p.relative_to(root) for p in root.rglob("*.wav")) == first
    assert [p.name for p in tmp_path.iterdir()] == ["IEMOCAP_full_release"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth_audio, "render", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthesize(root, utterances=60, seed=4, mean_duration_s=0.8)
    assert [p.name for p in tmp_path.iterdir()] == ["IEMOCAP_full_release"]  # temp folder removed
    assert sorted(p.relative_to(root) for p in root.rglob("*.wav")) == first  # old corpus intact


def test_refuses_to_replace_what_is_not_a_corpus(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match="refusing to replace it"):
        synthesize(target, utterances=60)
    assert (target / "precious.txt").read_text() == "keep me"
    # A real corpus has the same layout: without the marker of `sermtl synth` it is never replaced.
    real = tmp_path / "IEMOCAP_full_release"
    for name in ("Session1/sentences/wav", "Documentation"):
        (real / name).mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="may be a real corpus"):
        synthesize(real, utterances=60)
    assert sorted(p.name for p in real.iterdir()) == ["Documentation", "Session1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthesize(empty, utterances=60, mean_duration_s=0.8).utterances == 60


def test_worker_processes_write_the_same_bytes(corpora, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "PARALLEL_MIN_UTTERANCES", 0)
    monkeypatch.setattr(synth, "_worker_count", lambda utterances: 2)
    root = tmp_path / "IEMOCAP_full_release"
    synthesize(root, utterances=60, seed=1, mean_duration_s=1.0, progress=True)
    assert "synth" in capsys.readouterr().err  # the progress bar goes to stderr
    reference = corpora["small"]
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_other_sample_rate_and_numpy_integers(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    summary = synthesize(
        root, utterances=np.int64(60), seed=np.int64(5), mean_duration_s=0.8, sample_rate=8000
    )
    assert summary.utterances == 60
    blocks = read_blocks(root)
    for b in blocks:
        info = sf.info(wav_of(root, b))
        assert (info.samplerate, info.subtype) == (8000, "PCM_16")
        start, end = round(float(b.start) * 10_000), round(float(b.end) * 10_000)
        assert (end - start) * 8000 == info.frames * 10_000
    assert abs(summary.audio_seconds - sum(sf.info(wav_of(root, b)).duration for b in blocks)) < 1e-6


# --- effect settings (cue_span, cue_sharing, null_labels): the defaults are the generator before them ---

# sha256 over (relative path, sha256 of bytes) of every file but the marker, recorded with the generator
# before the effect settings existed (commit 685a79c): the defaults must keep reproducing these bytes.
GOLDEN_DIGESTS = {
    "small": "d0be5503a51a639685a58c05bf1cb86876b70ba450f712893540b1360e4f5f91",  # 60, seed 1, 1.0 s
    "medium": "49e6927f7f13a08bf3250406326b2347dafe147ca9a47a98629a6b1e88b65be0",  # 200, seed 0, 1.5 s
}


def corpus_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(GOLDEN_DIGESTS))
def test_default_settings_reproduce_the_recorded_corpus(corpora, name):
    assert corpus_digest(corpora[name]) == GOLDEN_DIGESTS[name]


def test_params_defaults_are_the_generator_defaults():
    defaults = {k: v.default for k, v in inspect.signature(synthesize).parameters.items()}
    settings = SynthParams()
    for name in ("cue_span", "cue_sharing", "null_labels"):
        assert getattr(settings, name) == defaults[name], name
    assert (defaults["cue_span"], defaults["cue_sharing"], defaults["null_labels"]) == (0.5, 0.5, False)


@pytest.fixture(scope="module")
def effect_corpora(tmp_path_factory) -> dict[str, Path]:
    """1,000 short utterances (about 15 min of audio, ~2 s to write), with and without null labels."""
    base = tmp_path_factory.mktemp("effects")
    out = {}
    for name, null_labels in (("default", False), ("null", True)):
        root = base / name / "IEMOCAP_full_release"
        synthesize(root, utterances=1000, seed=0, mean_duration_s=0.8, null_labels=null_labels)
        out[name] = root
    return out


def _feature_label_correlations(root: Path) -> np.ndarray:
    """Pearson r of (RMS dB, tilt, centroid) x (valence, arousal, dominance label)."""
    blocks = read_blocks(root)
    feats = np.array([_features(*sf.read(wav_of(root, b))) for b in blocks])
    labels = np.array([b.vad for b in blocks])
    return np.array([[np.corrcoef(feats[:, j], labels[:, i])[0, 1] for i in range(3)] for j in range(3)])


def test_null_labels_are_independent_of_the_audio(effect_corpora):
    default, null = effect_corpora["default"], effect_corpora["null"]
    # The audio (and the transcripts) are exactly those of the default corpus; only the labels change.
    wavs = sorted(p.relative_to(default) for p in default.rglob("*.wav"))
    assert wavs == sorted(p.relative_to(null) for p in null.rglob("*.wav"))
    assert all((default / w).read_bytes() == (null / w).read_bytes() for w in wavs)
    for path in default.glob("Session*/dialog/transcriptions/*.txt"):
        assert path.read_bytes() == (null / path.relative_to(default)).read_bytes()
    labels_default = {b.uid: b.vad for b in read_blocks(default)}
    labels_null = {b.uid: b.vad for b in read_blocks(null)}
    assert labels_default.keys() == labels_null.keys()
    assert sum(labels_default[k] != labels_null[k] for k in labels_default) > 0.8 * len(labels_default)

    rho = _feature_label_correlations(default)
    assert rho[0, 1] > 0.4 and rho[1, 0] > 0.15  # energy <-> arousal, tilt <-> valence
    rho_null = _feature_label_correlations(null)
    assert abs(rho_null[0, 1]) < 0.1, rho_null  # energy says nothing about arousal any more
    assert np.all(np.abs(rho_null) < 0.15), rho_null


def test_null_labels_are_independent_of_the_latent_that_renders_the_audio():
    # Over independent draws, the labels do not follow the latent the audio renders (a single draw's r
    # scatters with sd ~0.025 here: utterances of a speaker or dialog share their offsets).
    correlations = []
    for k in range(10):
        rng, label_rng = np.random.default_rng(k), np.random.default_rng(100 + k)
        dialogs, _ = synth_plan.plan(1500, rng, 2.5, 16000, label_rng=label_rng)
        utts = [u for d in dialogs for u in d.utts]
        labels, audio = np.array([u.header_values() for u in utts]), np.array([u.audio_latent for u in utts])
        correlations.append([np.corrcoef(labels[:, dim], audio[:, dim])[0, 1] for dim in range(3)])
    correlations = np.array(correlations)
    assert np.all(np.abs(correlations.mean(axis=0)) < 0.03) and np.all(np.abs(correlations) < 0.1), (
        correlations
    )
    # Without null labels, the labels follow the rendered latent closely.
    dialogs, _ = synth_plan.plan(1500, np.random.default_rng(0), 2.5, 16000)
    utts = [u for d in dialogs for u in d.utts]
    assert all(u.audio_latent is None for u in utts)
    labels, latent = np.array([u.header_values() for u in utts]), np.array([u.latent for u in utts])
    assert all(np.corrcoef(labels[:, dim], latent[:, dim])[0, 1] > 0.8 for dim in range(3))


@pytest.mark.parametrize("null_labels", [False, True])
@pytest.mark.parametrize("sharing", [0.0, 0.5, 1.0])
def test_every_class_of_every_dimension_in_every_session_in_every_mode(sharing, null_labels):
    for utterances in (60, 137, 400):
        for seed in range(3):
            label_rng = np.random.default_rng(seed + 10) if null_labels else None
            dialogs, _ = synth_plan.plan(
                utterances, np.random.default_rng(seed), 1.0, 16000, cue_sharing=sharing, label_rng=label_rng
            )
            for session in range(1, 6):
                values = [u.header_values() for d in dialogs if d.session == session for u in d.utts]
                for dim in range(3):
                    assert {class_of(v[dim]) for v in values} == {0, 1, 2}, (utterances, seed, session, dim)


def test_null_corpus_holds_every_class_in_every_session(effect_corpora):
    blocks = read_blocks(effect_corpora["null"])
    for session in range(1, 6):
        for dim in range(3):
            assert {class_of(b.vad[dim]) for b in blocks if b.session == session} == {0, 1, 2}


def test_cue_sharing_anchors_and_monotone_weights():
    assert np.array_equal(synth.latent_corr(0.0), np.eye(3))
    assert synth.latent_corr(0.5) is synth.LATENT_CORR  # the default is exactly the generator's
    assert np.array_equal(synth.latent_corr(1.0), synth.SHARED_CORR)
    assert synth.cue_weights(0.5) == {name: w for name, (_, w) in synth.CUE_CHANNELS.items()}
    for name, (own, default) in synth.CUE_CHANNELS.items():
        alone, shared = synth.cue_weights(0.0)[name], synth.cue_weights(1.0)[name]
        assert [i for i in range(3) if alone[i]] == [own], name  # each cue: its own dimension only
        assert all(shared) and shared[own] == default[own], name  # every dimension drives every cue
        previous = alone
        for sharing in (0.25, 0.5, 0.75, 1.0):
            weights = synth.cue_weights(sharing)[name]
            assert all(b >= a for a, b in zip(previous, weights, strict=True)), (name, sharing)
            previous = weights
    for sharing in np.linspace(0.0, 1.0, 9):
        assert np.all(np.linalg.eigvalsh(synth.latent_corr(sharing)) > 0)  # a valid correlation


def _label_correlations(sharing: float) -> np.ndarray:
    dialogs, _ = synth_plan.plan(4000, np.random.default_rng(0), 2.5, 16000, cue_sharing=sharing)
    labels = np.array([u.header_values() for d in dialogs for u in d.utts])
    corr = np.corrcoef(labels.T)
    return np.array([corr[0, 1], corr[0, 2], corr[1, 2]])  # V-A, V-D, A-D


def test_cue_sharing_moves_the_correlation_between_the_dimensions_labels():
    independent, default, shared = (_label_correlations(s) for s in (0.0, 0.5, 1.0))
    assert np.all(np.abs(independent) < 0.06), independent
    assert 0.4 < default[2] < 0.65 and default[0] < 0.25, default  # A-D strong, V-A weak (IEMOCAP-like)
    assert np.all(shared > 0.5), shared
    assert independent.mean() < default.mean() < shared.mean()


SPEAKER = synth_model.Speaker(
    session=1, letter="F", f0=200.0, formant_scale=1.15, gain_db=0.0, rate=4.2, tilt=0.0, breath=0.05,
    offset=(0.0, 0.0, 0.0),
)  # fmt: skip


def _dominance_level_db(seed: int, cue_span: float, cue_sharing: float) -> np.ndarray:
    """Per 20 ms frame, how much louder (dB) an utterance of high dominance is than the same utterance
    (same audio seed) at neutral latent, over the frames where the neutral one is louder than its median."""
    cues = synth_model.make_cues(cue_span, cue_sharing)
    frames = []
    for latent in ((3.0, 3.0, 4.5), (3.0, 3.0, 3.0)):
        utt = synth_model.Utt(utt_id="u", index=0, session=1, letter="F", start_ticks=0, n_samples=3 * 16000)
        utt.latent = np.array(latent)
        pcm = synth_audio.render(utt, SPEAKER, 16000, np.random.default_rng(seed), cues).astype(np.float64)
        frames.append(10 * np.log10(np.mean(pcm.reshape(-1, 320) ** 2, axis=1) + 1e-9))
    high, neutral = frames
    return (high - neutral)[neutral >= np.median(neutral)]


def test_cue_span_one_spreads_the_cues_over_the_whole_utterance():
    tc = np.arange(1500) * 0.002  # 3 s on the 2 ms control grid
    for span, low, high in ((0.5, 0.3, 0.7), (0.2, 0.12, 0.28), (0.9, 0.86, 0.94)):
        rng = np.random.default_rng(0)
        shares = [synth_audio.cue_window(tc, 3.0, span, rng)[2] / 3.0 for _ in range(300)]
        assert low <= min(shares) and max(shares) <= high and abs(np.mean(shares) - span) < 0.02
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    w, s0, length = synth_audio.cue_window(tc, 3.0, 1.0, rng_a)
    assert np.all(w == 1.0) and (s0, length) == (0.0, 3.0)
    synth_audio.cue_window(tc, 3.0, 0.5, rng_b)
    assert rng_a.random() == rng_b.random()  # the same draws whatever the span: the rest is unchanged

    # In the audio: with cue_span 0.5 part of the utterance stays near neutral loudness; with 1.0 the
    # whole utterance is louder (what is left of the contrast comes from the raised pitch).
    concentrated = np.array([np.percentile(_dominance_level_db(s, 0.5, 0.5), [10, 90]) for s in range(4)])
    spread = np.array([np.percentile(_dominance_level_db(s, 1.0, 0.5), [10, 90]) for s in range(4)])
    assert np.all(concentrated[:, 0] < 1.0) and np.all(spread[:, 0] > 2.0), (concentrated, spread)
    assert np.all(spread[:, 1] - spread[:, 0] < 0.6 * (concentrated[:, 1] - concentrated[:, 0]))


def test_cue_sharing_zero_keeps_dominance_out_of_the_energy():
    shared = np.array([np.median(_dominance_level_db(s, 1.0, 0.5)) for s in range(4)])
    alone = np.array([np.median(_dominance_level_db(s, 1.0, 0.0)) for s in range(4)])
    assert np.all(shared > 2.5) and np.all(np.abs(alone) < 0.5), (shared, alone)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cue_span": 0.0}, "cue_span"),
        ({"cue_span": 1.5}, "cue_span"),
        ({"cue_span": float("nan")}, "cue_span"),
        ({"cue_span": True}, "cue_span"),
        ({"cue_sharing": -0.1}, "cue_sharing"),
        ({"cue_sharing": 1.01}, "cue_sharing"),
        ({"null_labels": "yes"}, "null_labels"),
    ],
)
def test_bad_effect_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "IEMOCAP_full_release", utterances=60, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_the_effect_settings_through(tmp_path):
    from typer.testing import CliRunner

    from sermtl.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synth: {utterances: 60, seed: 3, mean_duration_s: 0.8, cue_sharing: 0.0}\n")
    by_cli = tmp_path / "cli" / "IEMOCAP_full_release"
    args = ["synth", "--out", str(by_cli), "--params", str(params), "--cue-span", "1", "--null-labels"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    direct = tmp_path / "direct" / "IEMOCAP_full_release"
    synthesize(
        direct, utterances=60, seed=3, mean_duration_s=0.8, cue_span=1.0, cue_sharing=0.0, null_labels=True
    )
    assert corpus_digest(by_cli) == corpus_digest(direct)
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "bad"), "--cue-span", "2"])
    assert result.exit_code == 2 and "cue_span must be a number in (0, 1]" in result.output


def test_the_generators_defaults_are_the_params_sections():
    """One source of defaults: synthesize(), `sermtl synth` without a params file and data.synth agree, and
    the effect settings default to the generator's anchors."""
    import inspect

    from sermtl.data import synth_model
    from sermtl.params import DataParams, SynthParams

    section, signature = SynthParams(), inspect.signature(synthesize).parameters
    for name in ("utterances", "seed", "mean_duration_s", "cue_span", "cue_sharing", "null_labels"):
        assert signature[name].default == getattr(section, name), name
    assert signature["sample_rate"].default == DataParams().sample_rate
    assert (section.cue_span, section.cue_sharing) == (
        synth_model.DEFAULT_CUE_SPAN,
        synth_model.DEFAULT_CUE_SHARING,
    )
    assert section.mean_duration_s == 4.45  # IEMOCAP's mean utterance duration
