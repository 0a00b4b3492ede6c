"""The synthetic corpus must look exactly like IEMOCAP_full_release to a strict parser, be
reproducible byte for byte, and carry learnable but not trivial acoustic cues of the labels."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.stats import spearmanr

from sermtl import synth
from sermtl.corpus import parse_emo_evaluation
from sermtl.fsutil import OUTPUT_MARKER, OutputFolderError
from sermtl.synth import synthesize

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
    dialogs, speakers = synth._plan(utterances, np.random.default_rng(0), 4.45, 16000)
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
    low, high = synth._duration_bounds(1.5)
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

    monkeypatch.setattr(synth, "_render", broken)
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
